"""The backends: one registry row each, and the one place that picks a backend for a call.

Every op resolves its ``backend`` argument here, always with the device and dtype of the logits:
the dense row op (`distillkit::distill_rows`), the top-k op and the vocabulary-parallel shard
passes. A row module implements the dense op's contract (docs/DESIGN.md):

    forward(student, teacher, labels, divergence, param_a, param_b, temperature, ignore_index, with_ce,
            div_vocab) -> (div [...] fp32, ce [...] fp32, stats [..., NUM_STATS] fp32; slots in _rows.py)
    backward(grad_div, grad_ce, student, teacher, labels, stats, divergence, param_a, param_b,
             temperature, ignore_index, with_ce, div_vocab) -> grad_student

Nothing is probed at import time: availability is decided per call (and folded to a constant
under torch.compile).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

OPS = ("rows", "topk")  # the dense op (also under the vocabulary-parallel op) and the top-k op


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
        from . import _ext
    except ImportError:  # a source tree without the extension's Python side
        return False
    if device.type == "cpu":
        return _ext.available()
    return device.type == "cuda" and _ext.cuda_built()


def _always(device: torch.device) -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    name: str
    rows_module: str  # the module under core/backends/ with the dense op's forward and backward
    usable: Callable[[torch.device], bool]  # calls the module's check by name, at call time
    needs: str  # what `usable` needs, for the error message
    device_types: Optional[tuple[str, ...]]  # None: any device
    auto_on: tuple[str, ...]  # device types where backend="auto" picks it (first row wins)
    topk: Optional[str]  # the top-k op's implementation ("triton" | "torch"); None: no top-k kernel
    shard: str  # the shard passes' implementation ("triton" | "torch")
    float64: bool = False  # takes float64 logits (the kernels read fp32/fp16/bf16 only)


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("triton", "triton_rows", lambda device: triton_usable(device),
            "CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)",
            ("cuda", "cpu"), auto_on=("cuda",), topk="triton", shard="triton"),
    Backend("cuda", "native_rows", lambda device: native_usable(device),
            "the compiled extension with its CUDA kernels (see `distillkit env`)",
            ("cuda",), auto_on=(), topk=None, shard="triton"),
    Backend("cpu", "native_rows", lambda device: native_usable(device), "the compiled extension (see `distillkit env`)",
            ("cpu",), auto_on=("cpu",), topk=None, shard="torch"),
    Backend("torch", "torch_rows", _always, "nothing", None, auto_on=("cpu", "cuda"), topk="torch", shard="torch",
            float64=True),
)}
NAMES = ("auto",) + tuple(REGISTRY)


def _serves(b: Backend, op: str) -> bool:
    return op != "topk" or b.topk is not None


def resolve(backend: str, device: torch.device, dtype: torch.dtype, op: str = "rows") -> str:
    """The concrete backend that runs `op` (one of OPS) for the user's `backend` argument on logits of
    this device and dtype; a ValueError naming the problem otherwise."""
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(map(repr, NAMES))}; got {backend!r}")
    if backend == "auto":
        for b in REGISTRY.values():
            if (device.type in b.auto_on and _serves(b, op) and (b.float64 or dtype != torch.float64)
                    and b.usable(device)):
                return b.name
        return "torch"
    b = REGISTRY[backend]
    if not _serves(b, op):
        served = [name for name, row in REGISTRY.items() if _serves(row, op)]
        choices = ", ".join(map(repr, ["auto", *served]))
        raise ValueError(f"backend={backend!r} has no {op} kernel; use one of {choices}")
    if b.device_types is not None and device.type not in b.device_types:
        raise ValueError(f"backend={backend!r} needs {' or '.join(b.device_types)} tensors; the logits are on {device}")
    if not b.usable(device):
        raise ValueError(f"backend={backend!r} needs {b.needs}, which is not available here; the logits are "
                         f"on {device}")
    return backend


def module(backend: str):
    """The row module of a resolved backend."""
    return importlib.import_module(f".{REGISTRY[backend].rows_module}", __name__)


def shard_implementation(backend: str) -> str:
    """The shard passes' implementation next to a resolved backend (Triton beside triton/cuda)."""
    return REGISTRY[backend].shard
