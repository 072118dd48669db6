"""The compiled extension `distillkit._C` (csrc/): its availability and the fake
(meta) implementations of its ops, `torch.ops.distillkit_ext.rows_forward` and
`rows_backward`, so they can be traced and opcheck'ed. Importing this module never fails:
without the extension, `available()` is False and `load_error()` says why.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._rows import NUM_STATS

_error: Optional[BaseException] = None
try:
    from ... import _C  # noqa: F401  (registers the ops via static initializers)
except ImportError as e:  # not built, or built against another torch
    _C = None
    _error = e


def available() -> bool:
    """The ops are registered with a CPU implementation."""
    return _C is not None


def cuda_built() -> bool:
    """The CUDA implementations were compiled in (not: a GPU is present)."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key("distillkit_ext::rows_forward", "CUDA")


def load_error() -> Optional[str]:
    """Why the extension could not be imported, or None."""
    return None if _error is None else f"{type(_error).__name__}: {_error}"


def describe() -> str:
    """One line for `distillkit env`."""
    if not available():
        return f"not built ({load_error()})"
    built = "built (cpu" + (", cuda)" if cuda_built() else ")") + f" at {getattr(_C, '__file__', '?')}"
    return built + (f"; cpu loops: {_C.cpu_loops()}" if hasattr(_C, "cpu_loops") else "")


if _C is not None:
    @torch.library.register_fake("distillkit_ext::rows_forward")
    def _rows_forward_fake(student, teacher, labels, divergence, param_a, param_b, temperature, ignore_index,
                           with_ce, div_vocab):
        torch._check(student.dim() == 2, lambda: "student must be 2-D [rows, vocab]")
        n = student.shape[0]
        return (student.new_empty((n,), dtype=torch.float32), student.new_empty((n,), dtype=torch.float32),
                student.new_empty((n, NUM_STATS), dtype=torch.float32))

    @torch.library.register_fake("distillkit_ext::rows_backward")
    def _rows_backward_fake(grad_div, grad_ce, student, teacher, labels, stats, divergence, param_a, param_b,
                            temperature, ignore_index, with_ce, div_vocab):
        torch._check(student.dim() == 2, lambda: "student must be 2-D [rows, vocab]")
        return student.new_empty(student.shape)  # contiguous, student dtype
