"""Test configuration: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before distillkit (and so the kernels) is imported, since the
@triton.jit decorator decides at import time. With a GPU it is left unset, so that the Triton
cases run the compiled kernels on CUDA tensors. Shared helpers are in helpers.py.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
