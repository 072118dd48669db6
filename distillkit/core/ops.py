"""The fused op as torch custom ops: registration, fake (meta) implementations, autograd.

`distillkit::distill_rows` returns per-row divergence, cross-entropy and the
statistics its backward needs; `distillkit::distill_rows_backward` turns the
per-row gradients into the student-logits gradient. Both are opaque to
`torch.compile` (no graph break, nothing traced inside), have fake
implementations for shape propagation, and dispatch to a backend at call time.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends._rows import NUM_STATS


@torch.library.custom_op("distillkit::distill_rows", mutates_args=())
def distill_rows(
    student: Tensor, teacher: Optional[Tensor], labels: Optional[Tensor],
    divergence: int, param_a: float, param_b: float, temperature: float, ignore_index: int, with_ce: bool,
    div_vocab: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (D [...], ce [...], stats [..., NUM_STATS]) in fp32; see docs/DESIGN.md. The divergence covers the
    first div_vocab ids of both sides, CE the student's whole vocabulary."""
    return backends.module(backend).forward(student, teacher, labels, divergence, param_a, param_b, temperature,
                                            ignore_index, with_ce, div_vocab)


@distill_rows.register_fake
def _(student, teacher, labels, divergence, param_a, param_b, temperature, ignore_index, with_ce, div_vocab, backend):
    lead = student.shape[:-1]
    return (student.new_empty(lead, dtype=torch.float32), student.new_empty(lead, dtype=torch.float32),
            student.new_empty((*lead, NUM_STATS), dtype=torch.float32))


@torch.library.custom_op("distillkit::distill_rows_backward", mutates_args=())
def distill_rows_backward(
    grad_div: Tensor, grad_ce: Tensor, student: Tensor, teacher: Optional[Tensor], labels: Optional[Tensor],
    stats: Tensor, divergence: int, param_a: float, param_b: float, temperature: float, ignore_index: int,
    with_ce: bool, div_vocab: int, backend: str,
) -> Tensor:
    """grad_student = grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y))."""
    return backends.module(backend).backward(grad_div, grad_ce, student, teacher, labels, stats, divergence,
                                             param_a, param_b, temperature, ignore_index, with_ce, div_vocab)


@distill_rows_backward.register_fake
def _(grad_div, grad_ce, student, teacher, labels, stats, divergence, param_a, param_b, temperature, ignore_index,
      with_ce, div_vocab, backend):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


# -- autograd -----------------------------------------------------------------------------------

def input_gradients(op, **grads) -> tuple:
    """The backward's return value for custom op `op`: one entry per argument of its schema, the given
    gradients by name and None for the rest (no hand-counted tuple of Nones to drift when an argument is added)."""
    names = [arg.name for arg in op._opoverload._schema.arguments]
    unknown = set(grads) - set(names)
    if unknown:
        raise TypeError(f"{op._opoverload} has no argument(s) {sorted(unknown)}")
    return tuple(grads.get(name) for name in names)


def _setup_context(ctx, inputs, output):
    student, teacher, labels, *options = inputs
    _, _, stats = output
    ctx.save_for_backward(student, teacher, labels, stats)
    ctx.options = tuple(options)  # divergence, param_a, param_b, temperature, ignore_index, with_ce, div_vocab, backend
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_div, grad_ce, _grad_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return input_gradients(distill_rows)
    # A row output that did not reach the loss has no gradient: treat it as 0.
    grad_div = torch.zeros_like(stats[..., 0]) if grad_div is None else grad_div
    grad_ce = torch.zeros_like(stats[..., 0]) if grad_ce is None else grad_ce
    grad_student = distill_rows_backward(grad_div, grad_ce, student, teacher, labels, stats, *ctx.options)
    return input_gradients(distill_rows, student=grad_student)


distill_rows.register_autograd(_backward, setup_context=_setup_context)
