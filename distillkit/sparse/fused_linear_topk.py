"""Logits-free distillation against a top-k (or sampled) teacher: `distill_loss_topk` straight from the
student's hidden states and LM head, never materializing the [N, V] student logits.

The chunk loop is the dense op's (`distillkit.core.fused_linear.chunk_loop`): per chunk of token rows the
student's logits (one matmul), the top-k row op `distillkit::topk_rows` and its backward against the
chunk's cached teacher rows, and the chunk's contributions to the hidden-state, weight and bias
gradients (two matmuls). As in the dense op, the loss is linear in the per-row terms with coefficients
that do not depend on the logits, so the forward already returns the gradients for grad_output = 1; the
backward scales them (reduction="none" recomputes the chunks with per-row coefficients).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core import _checks
from ..core.fused_linear import (check_linear, chunk_loop, combine_rows, default_chunk_size, fake_outputs,
                                 fused_backward, grad_shapes, loss_coefficients, save_for_fused_backward)
from ..core._checks import Weight
from ..core.dtensor import full_heads
from ..core.row_compaction import active_rows, put_rows, take_rows
from .topk import prepare_topk_terms
from .topk_ops import topk_rows, topk_rows_backward  # noqa: F401  (registers torch.ops.distillkit.topk_rows*)


def topk_row_terms(ids, teacher_lp, teacher_rest, labels, divergence, tail, temperature, ignore_index, with_ce,
                   backend):
    """chunk_loop's row terms against the teacher's top-k rows (ids, log-probabilities, rest [N, ...])."""
    def row_terms(rows: slice, s: Tensor, g_div: Tensor, g_ce: Tensor, need_grad: bool):
        y = labels[rows] if with_ce else None
        opts = (divergence, tail, temperature, ignore_index, with_ce, backend)
        d, e, stats = torch.ops.distillkit.topk_rows(s, ids[rows], teacher_lp[rows], teacher_rest[rows], y, *opts)
        grad = None
        if need_grad:
            grad = torch.ops.distillkit.topk_rows_backward(g_div, g_ce, s, ids[rows], teacher_lp[rows],
                                                           teacher_rest[rows], y, stats, *opts)
        return d, e, grad
    return row_terms


@torch.library.custom_op("distillkit::fused_linear_topk", mutates_args=())
def fused_linear_topk(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, teacher_lp: Tensor, teacher_rest: Tensor,
    labels: Optional[Tensor], coef_div: Tensor, coef_ce: Tensor, divergence: int, tail: int, temperature: float,
    ignore_index: int, with_ce: bool, backend: str, chunk_size: int, reduce: bool, grad_weight_fp32: bool,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, D [N], ce [N], grad_hidden, grad_weight, grad_bias), as distillkit::fused_linear_distill, with the
    teacher given by its rows for distillkit::topk_rows: ids [N, K], teacher_lp [N, K], teacher_rest [N]."""
    grads = reduce and (need_hidden or need_weight or need_bias)
    row_terms = topk_row_terms(ids, teacher_lp, teacher_rest, labels, divergence, tail, temperature, ignore_index,
                               with_ce, backend)
    div, ce, gh, gw, gb = chunk_loop(hidden, weight, bias, row_terms, coef_div, coef_ce, chunk_size, grad_weight_fp32,
                                     grads and need_hidden, grads and need_weight, grads and need_bias)
    return combine_rows(coef_div, div, coef_ce, ce, reduce), div, ce, gh, gw, gb


@fused_linear_topk.register_fake
def _(hidden, weight, bias, ids, teacher_lp, teacher_rest, labels, coef_div, coef_ce, divergence, tail, temperature,
      ignore_index, with_ce, backend, chunk_size, reduce, grad_weight_fp32, need_hidden, need_weight, need_bias):
    return fake_outputs(hidden, weight, reduce, grad_weight_fp32, need_hidden, need_weight, need_bias)


@torch.library.custom_op("distillkit::fused_linear_topk_backward", mutates_args=())
def fused_linear_topk_backward(
    grad_div: Tensor, grad_ce: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
    teacher_lp: Tensor, teacher_rest: Tensor, labels: Optional[Tensor], divergence: int, tail: int,
    temperature: float, ignore_index: int, with_ce: bool, backend: str, chunk_size: int, grad_weight_fp32: bool,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_r grad_div[r] D[r] + grad_ce[r] ce[r] (recomputes the chunks' logits)."""
    row_terms = topk_row_terms(ids, teacher_lp, teacher_rest, labels, divergence, tail, temperature, ignore_index,
                               with_ce, backend)
    _, _, gh, gw, gb = chunk_loop(hidden, weight, bias, row_terms, grad_div, grad_ce, chunk_size, grad_weight_fp32,
                                  need_hidden, need_weight, need_bias)
    return gh, gw, gb


@fused_linear_topk_backward.register_fake
def _(grad_div, grad_ce, hidden, weight, bias, ids, teacher_lp, teacher_rest, labels, divergence, tail, temperature,
      ignore_index, with_ce, backend, chunk_size, grad_weight_fp32, need_hidden, need_weight, need_bias):
    return grad_shapes(hidden, weight, True, grad_weight_fp32, need_hidden, need_weight, need_bias)


def _setup_context(ctx, inputs, output):
    (*_, divergence, tail, temperature, ignore_index, with_ce, backend, chunk_size, reduce, grad_weight_fp32,
     _need_h, _need_w, _need_b) = inputs
    save_for_fused_backward(ctx, inputs, output, reduce, (divergence, tail, temperature, ignore_index, with_ce,
                                                          backend, chunk_size, grad_weight_fp32))


def _backward(ctx, grad_loss, *_unused):
    return fused_backward(ctx, grad_loss, fused_linear_topk, fused_linear_topk_backward)


fused_linear_topk.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_distill_loss_topk(
    student_hidden: Tensor, student_weight: Tensor, teacher_topk_ids: Optional[Tensor],
    teacher_topk_logprobs: Optional[Tensor], labels: Optional[Tensor] = None, *,
    student_bias: Optional[Tensor] = None, tail: str = "renormalize", teacher_temperature: Optional[float] = None,
    divergence: str = "forward_kl", temperature: float = 1.0, temperature_scaling: bool = True,
    kl_weight: Weight = 1.0, ce_weight: Weight = 0.0, ignore_index: int = -100, reduction: str = "mean",
    normalizer=None, backend: str = "auto", check_labels: bool = True, divergence_on_ignored: bool = False,
    chunk_size: Optional[int] = None, max_chunk_bytes: int = 256 * 2**20, grad_weight_fp32: bool = True,
    compact_rows: bool = True,
) -> Tensor:
    """`distill_loss_topk(student_hidden @ student_weight.T + student_bias, teacher_topk_ids,
    teacher_topk_logprobs, labels, ...)` without materializing the [N, V] student logits.

    Args:
        student_hidden: [..., H] float32/float16/bfloat16; student_weight [V, H] (same dtype), student_bias [V] or
            None: receive gradients.
        teacher_topk_ids, teacher_topk_logprobs, labels, tail, teacher_temperature, divergence, temperature,
        temperature_scaling, kl_weight, ce_weight, ignore_index, reduction, normalizer, backend, check_labels,
        divergence_on_ignored: exactly as in `distillkit.sparse.topk.distill_loss_topk`.
        chunk_size, max_chunk_bytes, grad_weight_fp32, compact_rows: as in `distillkit.fused_linear_distill_loss`
            (rows without an active term are skipped: one host-device synchronization per eager call).
    Returns:
        The loss in float32: a scalar, or the leading shape for reduction="none".
    """
    student_weight, student_bias, *_ = full_heads(student_hidden, student_weight, student_bias)  # DTensor heads
    check_linear("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    lead, hidden_size = student_hidden.shape[:-1], student_hidden.shape[-1]
    vocab, device = student_weight.shape[0], student_hidden.device
    if vocab == 0:
        raise ValueError("student_weight has an empty vocabulary dimension")
    _checks.check_weight("kl_weight", kl_weight, lead, device)
    _checks.check_weight("ce_weight", ce_weight, lead, device)
    _checks.check_normalizer(normalizer)
    terms = prepare_topk_terms(
        lead, vocab, device, student_hidden.dtype, teacher_topk_ids, teacher_topk_logprobs, labels, tail=tail,
        teacher_temperature=teacher_temperature, divergence=divergence, temperature=temperature,
        kl_weight=kl_weight, ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction, backend=backend,
        check_labels=check_labels, divergence_on_ignored=divergence_on_ignored)
    coef_div, coef_ce = loss_coefficients(terms.kl_weight, terms.ce_weight, terms.valid, lead, device,
                                          temperature=temperature, temperature_scaling=temperature_scaling,
                                          reduction=reduction, normalizer=normalizer)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, 0, student_hidden.element_size(), 0, max_chunk_bytes)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    n, k = lead.numel(), terms.ids.shape[-1]
    rows = active_rows(coef_div.reshape(n), coef_ce.reshape(n),
                       terms.valid.reshape(n) if terms.with_ce else None, compact_rows)  # None: every row
    grad_on = torch.is_grad_enabled()
    loss, *_ = fused_linear_topk(
        take_rows(rows, student_hidden.reshape(n, hidden_size)), student_weight, student_bias,
        take_rows(rows, terms.ids.reshape(n, k)), take_rows(rows, terms.teacher_lp.reshape(n, k)),
        take_rows(rows, terms.teacher_rest.reshape(n)),
        take_rows(rows, terms.labels.reshape(n)) if terms.labels is not None else None,
        take_rows(rows, coef_div.reshape(n)), take_rows(rows, coef_ce.reshape(n)),
        terms.divergence, terms.tail, float(temperature), int(ignore_index), terms.with_ce, terms.backend,
        int(chunk_size), reduction != "none", bool(grad_weight_fp32),
        grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad)
    return loss if reduction != "none" else put_rows(rows, loss, n).reshape(lead)
