"""Backends of the fused op. Each module exposes the same two functions:

    forward(student, teacher, labels, divergence, mix, temperature, ignore_index, with_ce)
        -> (div [...] fp32, ce [...] fp32, stats [..., 8] fp32; slots named in _rows.py)
    backward(grad_div, grad_ce, student, teacher, labels, stats,
             divergence, mix, temperature, ignore_index, with_ce) -> grad_student

with the contract of docs/DESIGN.md. ``resolve`` turns the user's ``backend``
argument into one of them at call time (never at import time).
"""

from __future__ import annotations

import importlib
import os

import torch

_MODULES = {"triton": "triton_rows", "torch": "torch_rows", "cpu": "native_rows", "cuda": "native_rows"}


# Constant for torch.compile: traced once, eagerly (the extension import cannot be traced).
@torch.compiler.assume_constant_result
def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors only under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def native_usable(device: torch.device) -> bool:
    try:
        from .. import _ext
    except ImportError:  # a source tree without the extension's Python side
        return False
    if device.type == "cpu":
        return _ext.available()
    return device.type == "cuda" and _ext.cuda_built()


def resolve(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The concrete backend for `backend` on `device`; raises a ValueError naming the problem."""
    if backend == "auto":
        if dtype == torch.float64:
            return "torch"  # the kernels compute in fp32 and take fp32/fp16/bf16 only
        if device.type == "cuda":
            return "triton"
        return "cpu" if native_usable(device) else "torch"
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"the logits are on {device}")
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend={backend!r} needs {backend} tensors; the logits are on {device}")
        if not native_usable(device):
            raise ValueError(f"backend={backend!r} needs the compiled extension, which is not available here "
                             "(see `distillkit env`)")
    return backend


def module(backend: str):
    return importlib.import_module(f".{_MODULES[backend]}", __name__)
