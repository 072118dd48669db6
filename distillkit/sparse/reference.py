"""The reference sparse-teacher (top-k) distillation loss: plain PyTorch autograd, readable, float64-capable.

The oracle for `distillkit.distill_loss_topk` (docs/SPARSE.md). It materializes full-vocabulary
tensors and builds the two categorical distributions explicitly; it computes in the dtype it is given,
so pass float64 student logits for a float64 oracle.

Per token, with T the loss temperature, T0 the temperature the teacher log-probabilities l_k were
recorded at (teacher_temperature, default 1.0) and r = T0 / T:

    teacher   p_k ∝ exp(r * l_k)                                   over the K ids
    student   q = softmax(s / T) over the full vocabulary

    tail="renormalize":  categories = the K ids; p and q both restricted to them and renormalized.
    tail="bucket":       categories = the K ids + one "rest" bucket. Teacher: p_k ∝ exp(r l_k),
                         p_rest ∝ (1 - sum_k exp(l_k))^r; student: q_k (full softmax), q_rest = 1 - sum_k q_k.
                         Both rest masses (at temperature T) are floored at REST_FLOOR = 2**-20, about fp32's
                         resolution of 1 - sum: recorded log-probabilities that sum to 1 after rounding, or a
                         student tail below that resolution, never make the divergence infinite.
    tail="student_full": categories = the K ids; the teacher restricted to them and renormalized (its whole
                         distribution, e.g. the empirical one of a sampled cache), the student's full-vocabulary
                         q_k NOT renormalized (Axolotl's top-k KD). Forward KL only: it is KL(p || q) with q
                         the full softmax; reverse KL against a p that is 0 off the ids is infinite.

    D = KL(p || q) ("forward_kl") or KL(q || p) ("reverse_kl") over the categories, 0 log 0 = 0.

Ids < 0 (padding) or >= V are absent: no category. A token without any present id has no teacher
signal: its divergence weight is 0 (it counts for neither the divergence nor the "mean" denominator).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..core.reference import (_kl_terms, cross_entropy_per_token, valid_labels, weigh_and_reduce,
                              without_ignored_tokens)
from .tails import REST_FLOOR, TAILS, TOPK_DIVERGENCES, check_tail  # noqa: F401  (names only; the math is here)

# -- the oracle --------------------------------------------------------------------------------------


def present_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return (ids >= 0) & (ids < vocab_size)


def _log_normalize(x: torch.Tensor) -> torch.Tensor:
    """x - logsumexp(x) over the last dim; an all -inf row stays all -inf (not NaN)."""
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return x - torch.where(torch.isfinite(lse), lse, 0.0)


def teacher_categories(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, *, tail: str,
                       ratio: float, dtype: torch.dtype) -> torch.Tensor:
    """Teacher log-probabilities over the categories: [..., K] (renormalize, student_full) or [..., K + 1]
    (bucket)."""
    lp = torch.where(present_ids(ids, vocab_size), logprobs.to(dtype), -math.inf)
    if tail in ("renormalize", "student_full"):
        return _log_normalize(ratio * lp)
    if tail != "bucket":
        raise ValueError(f"unknown tail {tail!r}")
    rest = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(0.0)  # mass outside the recorded top-k at T0
    log_p = _log_normalize(torch.cat([ratio * lp, ratio * torch.log(rest)], dim=-1))
    return torch.cat([log_p[..., :-1], log_p[..., -1:].clamp_min(math.log(REST_FLOOR))], dim=-1)


def student_categories(student_logits: torch.Tensor, ids: torch.Tensor, *, tail: str,
                       temperature: float) -> torch.Tensor:
    """Student log-probabilities over the same categories (differentiable)."""
    vocab = student_logits.shape[-1]
    present = present_ids(ids, vocab)
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    gathered = log_q.gather(-1, torch.where(present, ids, 0).long())
    log_q_k = torch.where(present, gathered, -math.inf)
    if tail == "renormalize":
        return _log_normalize(log_q_k)
    if tail == "student_full":
        return log_q_k
    if tail != "bucket":
        raise ValueError(f"unknown tail {tail!r}")
    rest = (1.0 - torch.where(present, gathered.exp(), 0.0).sum(-1, keepdim=True)).clamp_min(REST_FLOOR)
    return torch.cat([log_q_k, torch.log(rest)], dim=-1)


def divergence_per_token(student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, *,
                         tail: str = "renormalize", divergence: str = "forward_kl", temperature: float = 1.0,
                         teacher_temperature: Optional[float] = None) -> torch.Tensor:
    """D for every token (leading shape), not scaled by T**2."""
    check_tail(tail, divergence)
    ratio = (1.0 if teacher_temperature is None else teacher_temperature) / temperature
    log_p = teacher_categories(ids, logprobs.detach(), student_logits.shape[-1], tail=tail, ratio=ratio,
                               dtype=student_logits.dtype)
    log_q = student_categories(student_logits, ids, tail=tail, temperature=temperature)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return _kl_terms(p, log_p, log_q)
    return _kl_terms(q, log_q, log_p)


def distill_loss_topk(
    student_logits: torch.Tensor,
    teacher_topk_ids: Optional[torch.Tensor],
    teacher_topk_logprobs: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    tail: str = "renormalize",
    teacher_temperature: Optional[float] = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    temperature_scaling: bool = True,
    kl_weight=1.0,
    ce_weight=0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",  # signature parity
    check_labels: bool = True,  # signature parity
    divergence_on_ignored: bool = False,
) -> torch.Tensor:
    """Same semantics as :func:`distillkit.distill_loss_topk`, in plain PyTorch autograd."""
    check_tail(tail, divergence)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    with_div = isinstance(kl_weight, torch.Tensor) or kl_weight != 0
    if with_div:
        div = divergence_per_token(student_logits, teacher_topk_ids, teacher_topk_logprobs, tail=tail,
                                   divergence=divergence, temperature=temperature,
                                   teacher_temperature=teacher_temperature)
        has_teacher = present_ids(teacher_topk_ids, vocab).any(-1)
        kl_weight = kl_weight * has_teacher.to(student_logits.dtype)
    else:
        div = torch.zeros(lead, dtype=student_logits.dtype, device=student_logits.device)
    if labels is None:
        ce, valid = torch.zeros_like(div), None
    else:
        ce = cross_entropy_per_token(student_logits, labels, ignore_index)
        valid = valid_labels(labels, vocab, ignore_index)
        if with_div and not divergence_on_ignored:
            kl_weight = without_ignored_tokens(kl_weight, valid, div)
    return weigh_and_reduce(div, ce, valid, kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature,
                            temperature_scaling=temperature_scaling, reduction=reduction, normalizer=normalizer)
