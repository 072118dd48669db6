"""The top-k custom ops `distillkit::topk_rows` / `topk_rows_backward`: fake implementations, autograd,
and the Triton launcher (the math is in kernels/topk.py; the torch backend in topk_torch.py)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.backends._rows import as_rows, flat_labels
from ..core.ops import input_gradients
from .tails import REST_FLOOR, TAIL_REGISTRY, tail_from_id, tail_named
from .topk_torch import _torch_backward, _torch_forward

# The shipped specializations (compiled ahead of time by `distillkit kernels`): one vocabulary block,
# and the top-k entries padded to one of BLOCK_K_SIZES.
BLOCK_V = 4096
BLOCK_K_SIZES = (64, 256, 1024)
NUM_WARPS = 8
# CE only reads no teacher: one specialization, whatever the tail.
CE_ONLY_TAIL = tail_named("renormalize").id
_FULL_SOFTMAX_TAILS = frozenset(t.id for t in TAIL_REGISTRY if t.full_softmax)


def block_k(k: int) -> int:
    return next(size for size in BLOCK_K_SIZES if k <= size)


def kernel_switches(divergence: int, tail: int, with_ce: bool) -> dict:
    """The compile-time switches of the top-k kernels (the launcher's and `distillkit kernels`' one rule).
    The ops check the tail id first; a direct launch with an unknown one meets the kernels' static assert."""
    tail = tail if divergence else CE_ONLY_TAIL
    return dict(DIVERGENCE=divergence, TAIL=tail, WITH_CE=with_ce,
                FULL_PASS=bool(with_ce or (divergence and tail in _FULL_SOFTMAX_TAILS)))


# -- triton backend ----------------------------------------------------------------------------------

def _triton_launch(kernel_name, pre, student, ids, tlp, trest, labels, post, divergence, tail, temperature,
                   ignore_index, with_ce):
    """Launch one program per row; `pre`/`post` are the kernel's tensor arguments before/after the inputs."""
    from ..kernels import topk as K

    vocab, k = student.shape[-1], ids.shape[-1]
    n_rows = student.numel() // max(vocab, 1)
    if n_rows == 0:
        return
    s = as_rows(student)
    getattr(K, kernel_name)[(n_rows,)](
        *pre, s.tensor, ids.reshape(-1, k).long().contiguous(), tlp.reshape(-1, k).float().contiguous(),
        trest.reshape(-1).contiguous(), flat_labels(labels, student), *post, *s.addressing,
        vocab, k, 1.0 / temperature, ignore_index, REST_FLOOR, **kernel_switches(divergence, tail, with_ce),
        BLOCK_V=BLOCK_V, BLOCK_K=block_k(k), num_warps=NUM_WARPS)


# -- custom ops --------------------------------------------------------------------------------------

@torch.library.custom_op("distillkit::topk_rows", mutates_args=())
def topk_rows(student: Tensor, ids: Tensor, teacher_lp: Tensor, teacher_rest: Tensor, labels: Optional[Tensor],
              divergence: int, tail: int, temperature: float, ignore_index: int, with_ce: bool,
              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (D [...], ce [...], stats [..., 4]) in fp32 (kernels/topk.py has the math)."""
    tail_from_id(tail, divergence)  # an unknown tail, or one without this divergence, fails on every backend
    if backend == "torch":
        return _torch_forward(student, ids, teacher_lp, teacher_rest, labels, divergence, tail, temperature,
                              ignore_index, with_ce)
    lead = student.shape[:-1]
    div = torch.empty(lead, dtype=torch.float32, device=student.device)
    ce, stats = torch.empty_like(div), torch.empty((*lead, 4), dtype=torch.float32, device=student.device)
    _triton_launch("topk_forward_kernel", (), student, ids, teacher_lp, teacher_rest, labels, (div, ce, stats),
                   divergence, tail, temperature, ignore_index, with_ce)
    return div, ce, stats


@topk_rows.register_fake
def _(student, ids, teacher_lp, teacher_rest, labels, divergence, tail, temperature, ignore_index, with_ce,
      backend):
    lead = student.shape[:-1]
    return (student.new_empty(lead, dtype=torch.float32), student.new_empty(lead, dtype=torch.float32),
            student.new_empty((*lead, 4), dtype=torch.float32))


@torch.library.custom_op("distillkit::topk_rows_backward", mutates_args=())
def topk_rows_backward(grad_div: Tensor, grad_ce: Tensor, student: Tensor, ids: Tensor, teacher_lp: Tensor,
                       teacher_rest: Tensor, labels: Optional[Tensor], stats: Tensor, divergence: int,
                       tail: int, temperature: float, ignore_index: int, with_ce: bool,
                       backend: str) -> Tensor:
    """The dense student gradient grad_div / T * dD/db + grad_ce * (softmax(s) - onehot(y))."""
    tail_from_id(tail, divergence)
    if backend == "torch":
        return _torch_backward(grad_div, grad_ce, student, ids, teacher_lp, teacher_rest, labels, stats,
                               divergence, tail, temperature, ignore_index, with_ce)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    pre = (grad_div.reshape(-1).float().contiguous(), grad_ce.reshape(-1).float().contiguous())
    _triton_launch("topk_backward_kernel", pre, student, ids, teacher_lp, teacher_rest, labels,
                   (stats.contiguous(), grad), divergence, tail, temperature, ignore_index, with_ce)
    return grad


@topk_rows_backward.register_fake
def _(grad_div, grad_ce, student, ids, teacher_lp, teacher_rest, labels, stats, divergence, tail, temperature,
      ignore_index, with_ce, backend):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _setup_context(ctx, inputs, output):
    student, ids, teacher_lp, teacher_rest, labels, *options = inputs
    ctx.save_for_backward(student, ids, teacher_lp, teacher_rest, labels, output[2])
    ctx.options = tuple(options)
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad_div, grad_ce, _grad_stats):
    student, ids, teacher_lp, teacher_rest, labels, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return input_gradients(topk_rows)
    grad_div = torch.zeros_like(stats[..., 0]) if grad_div is None else grad_div
    grad_ce = torch.zeros_like(stats[..., 0]) if grad_ce is None else grad_ce
    grad = topk_rows_backward(grad_div, grad_ce, student, ids, teacher_lp, teacher_rest, labels, stats,
                              *ctx.options)
    return input_gradients(topk_rows, student=grad)


topk_rows.register_autograd(_backward, setup_context=_setup_context)
