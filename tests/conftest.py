"""Test configuration: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before distillkit (and so the kernels) is imported,
since the @triton.jit decorator decides at import time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from distillkit import backends  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def available_backends() -> list[str]:
    names = ["torch"]
    if backends.triton_usable(torch.device("cpu")):
        names.append("triton")
    if backends.native_usable(torch.device("cpu")):
        names.append("cpu")
    return names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
