"""The C++ CPU kernel's fused row op for the logits-free chunk loop (distillkit/core/fused_linear.py).

`distillkit_ext::rows_forward_backward_` (csrc/distill_cpu.cpp) runs the forward and the backward of each
block of rows back to back and writes the gradient over the student logits: the chunk loop knows the
coefficients (grad_div, grad_ce) before the forward, and its chunk logits are its own scratch. The rows
then cross memory once instead of three times (forward read, backward read, fresh gradient paged in and
written), which on a 2-core CPU was most of the op's time above its GEMMs (docs/PERFORMANCE.md). The values
are those of `rows_forward` + `rows_backward` (the same row functions).

Not a backend of its own: the chunk loop calls it for backend "cpu" when the extension has it, and the
two ops otherwise. Also here: `is_one`, which lets the fused-linear backward skip its [V, H] product on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext
from ._rows import flat_labels

OP = "rows_forward_backward_"


def available(backend: str, device: torch.device) -> bool:
    """The chunk loop will call the fused op: the C++ CPU backend on CPU, an extension built with the op."""
    return backend == "cpu" and device.type == "cpu" and _ext.available() and hasattr(torch.ops.distillkit_ext, OP)


def usable(backend: str, student: Tensor) -> bool:
    """The fused op can take this chunk: available(), and student rows that can hold the gradient."""
    return available(backend, student.device) and student.dim() == 2 and student.is_contiguous()


def forward_backward_(grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Optional[Tensor],
                      labels: Optional[Tensor], divergence: int, param_a: float, param_b: float, temperature: float,
                      ignore_index: int, with_ce: bool, div_vocab: int) -> tuple[Tensor, Tensor]:
    """(div [N], ce [N]) of the rows of `student` [N, V], which then holds d(sum grad_div D + grad_ce ce)/ds."""
    if teacher is not None and teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    return getattr(torch.ops.distillkit_ext, OP)(
        grad_div.float().contiguous(), grad_ce.float().contiguous(), student,
        teacher if divergence != 0 else None, flat_labels(labels, student) if with_ce else None,
        divergence, param_a, param_b, temperature, ignore_index, with_ce, div_vocab)


def is_one(grad_output: Tensor) -> bool:
    """grad_output is exactly 1 (loss.backward()), so a fused-linear op's forward gradients are its input
    gradients as they are. Read only from a plain CPU tensor (no device to synchronize with) outside any tracing
    (no graph to bake the value into) that needs no gradient itself; False otherwise (the product is taken)."""
    g = grad_output
    return (g.device.type == "cpu" and type(g) is torch.Tensor and g.numel() == 1 and not g.requires_grad
            and not torch.compiler.is_compiling() and not _traced(g) and bool(g == 1))


def _traced(g: Tensor) -> bool:
    """A dispatch mode (make_fx, fake tensors) is active or g is a functorch wrapper (vmap, grad)."""
    try:
        return torch._C._len_torch_dispatch_stack() > 0 or torch._C._functorch.is_functorch_wrapped_tensor(g)
    except AttributeError:  # a torch without these: assume tracing, take the product
        return True


if _ext.available() and hasattr(torch.ops.distillkit_ext, OP):
    @torch.library.register_fake(f"distillkit_ext::{OP}")
    def _fake(grad_div, grad_ce, student, teacher, labels, divergence, param_a, param_b, temperature, ignore_index,
              with_ce, div_vocab):
        n = student.shape[0]
        return student.new_empty((n,), dtype=torch.float32), student.new_empty((n,), dtype=torch.float32)
