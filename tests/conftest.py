"""Test configuration: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before distillkit (and so the kernels) is imported,
since the @triton.jit decorator decides at import time. Shared helpers are in helpers.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
