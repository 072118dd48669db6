"""The reference distillation loss: plain PyTorch, readable, float64-capable.

This is the oracle that tests, benchmarks and ``distillkit compare`` check the
fused backends against. It materializes full-vocabulary tensors on purpose:
it is written to be obviously right, not fast. It computes in the dtype it is
given, so pass float64 inputs for a float64 oracle.

Semantics (see README "The math"): for each token, p = softmax(t/T),
q = softmax(s/T),

    forward_kl       KL(p || q)
    reverse_kl       KL(q || p)
    jsd              beta KL(p || m) + (1-beta) KL(q || m),  m = beta p + (1-beta) q
    skew_forward_kl  KL(p || skew p + (1-skew) q)
    skew_reverse_kl  KL(q || (1-skew) p + skew q)
    tvd              1/2 sum |p - q|

D is multiplied by T**2 when temperature_scaling; ce = -log softmax(s)[y] at
temperature 1 where y != ignore_index; loss = kl_weight * D + ce_weight * ce.
With vocab_mismatch="truncate", D compares the distributions over the first
min(V_student, V_teacher) ids and CE keeps the student's whole vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from ._reduce import weigh_and_reduce

__all__ = ["distill_loss", "divergence_per_token", "cross_entropy_per_token", "valid_labels",
           "without_ignored_tokens"]


def _kl_terms(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """sum_j x_j (log x_j - log y_j), with 0 * log 0 = 0 (masked entries) and no NaN in the gradient."""
    present = x > 0
    log_ratio = torch.where(present, log_x - log_y, 0.0)
    return (x * log_ratio).sum(-1)


def _safe_log(m: torch.Tensor) -> torch.Tensor:
    # log(m) where m > 0; where m == 0 every term that uses it is multiplied by 0.
    return torch.log(torch.where(m > 0, m, 1.0))


def _no_distribution(logits: torch.Tensor) -> torch.Tensor:
    """Rows that define no distribution: a NaN or +inf entry, or no finite entry at all."""
    return logits.isnan().any(-1) | logits.isposinf().any(-1) | ~logits.isfinite().any(-1)


def divergence_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                         divergence: str = "forward_kl", beta: float = 0.5, skew: float = 0.1,
                         temperature: float = 1.0) -> torch.Tensor:
    """D for every token (leading shape), not scaled by T**2; NaN where either row defines no distribution."""
    undefined = _no_distribution(student_logits) | _no_distribution(teacher_logits)
    # Such rows are computed on zeros (any finite row would do) so that autograd through them stays
    # finite; _UndefinedRows then gives them their NaN.
    row_undefined = undefined.unsqueeze(-1)
    div = _divergence(torch.where(row_undefined, 0.0, student_logits), torch.where(row_undefined, 0.0, teacher_logits),
                      divergence=divergence, beta=beta, skew=skew, temperature=temperature)
    return _UndefinedRows.apply(div, student_logits, undefined)


class _UndefinedRows(torch.autograd.Function):
    """D = NaN on rows that define no distribution; their student gradient is NaN where the row reaches
    the loss (a non-zero incoming gradient) and 0 where it is weighted out, like eager PyTorch on a
    NaN row and an exact 0 weight."""

    @staticmethod
    def forward(ctx, div, student_logits, undefined):
        ctx.save_for_backward(undefined)
        ctx.student_shape = student_logits.shape
        return torch.where(undefined, float("nan"), div)

    @staticmethod
    def backward(ctx, grad):
        (undefined,) = ctx.saved_tensors
        poisoned = (undefined & (grad != 0)).unsqueeze(-1).expand(ctx.student_shape)
        return torch.where(undefined, 0.0, grad), torch.where(poisoned, float("nan"), 0.0).to(grad.dtype), None


def _divergence(student_logits, teacher_logits, *, divergence, beta, skew, temperature):
    log_p = torch.log_softmax(teacher_logits / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return _kl_terms(p, log_p, log_q)
    if divergence == "reverse_kl":
        return _kl_terms(q, log_q, log_p)
    if divergence == "jsd":
        log_m = _safe_log(beta * p + (1 - beta) * q)
        return beta * _kl_terms(p, log_p, log_m) + (1 - beta) * _kl_terms(q, log_q, log_m)
    if divergence == "skew_forward_kl":
        return _kl_terms(p, log_p, _safe_log(skew * p + (1 - skew) * q))
    if divergence == "skew_reverse_kl":
        return _kl_terms(q, log_q, _safe_log((1 - skew) * p + skew * q))
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def valid_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Labels that take part in the CE term: not ignore_index and inside [0, V)."""
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab_size)


def cross_entropy_per_token(student_logits: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """-log softmax(s)[y] at temperature 1; 0 where the label is ignored or out of range."""
    valid = valid_labels(labels, student_logits.shape[-1], ignore_index)
    log_q1 = torch.log_softmax(student_logits, dim=-1)
    target = torch.where(valid, labels, 0).long().unsqueeze(-1)
    return torch.where(valid, -log_q1.gather(-1, target).squeeze(-1), 0.0)


def without_ignored_tokens(kl_weight, valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """kl_weight as a tensor that is exactly 0 on tokens whose label is ignored: they take part in no term."""
    return torch.where(valid, torch.as_tensor(kl_weight, dtype=like.dtype, device=like.device), 0.0)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    temperature_scaling: bool = True,
    kl_weight=1.0,
    ce_weight=0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",  # accepted for signature parity; the reference has one implementation
    check_labels: bool = True,
    vocab_mismatch: str = "error",
    divergence_on_ignored: bool = False,
) -> torch.Tensor:
    """Same signature and semantics as :func:`distillkit.distill_loss`, in plain PyTorch autograd."""
    _checks.check_options(divergence=divergence, beta=beta, skew=skew, temperature=temperature,
                          reduction=reduction, backend=backend)
    _checks.check_pair(student_logits, teacher_logits, vocab_mismatch)
    _checks.check_labels(labels, student_logits)
    lead_shape = student_logits.shape[:-1]
    _checks.check_weight("kl_weight", kl_weight, lead_shape, student_logits.device)
    _checks.check_weight("ce_weight", ce_weight, lead_shape, student_logits.device)
    _checks.check_normalizer(normalizer)
    if teacher_logits is None and not (isinstance(kl_weight, (int, float)) and kl_weight == 0):
        raise ValueError("teacher_logits is None: pass teacher logits, or kl_weight=0.0 for a CE-only loss")
    if labels is None and not (isinstance(ce_weight, (int, float)) and ce_weight == 0):
        raise ValueError("ce_weight is non-zero but labels is None: pass labels for the CE term")
    vocab_size = student_logits.shape[-1]
    if labels is not None and check_labels:
        _checks.check_label_range(labels, vocab_size, ignore_index)

    if teacher_logits is None:
        div = torch.zeros(lead_shape, dtype=student_logits.dtype, device=student_logits.device)
    else:
        # "truncate": both distributions live on the shared first ids; the rest get probability 0.
        shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
        div = divergence_per_token(student_logits[..., :shared], teacher_logits.detach()[..., :shared],
                                   divergence=divergence, beta=beta, skew=skew, temperature=temperature)
    if labels is None:
        ce, valid = torch.zeros_like(div), None
    else:
        ce = cross_entropy_per_token(student_logits, labels, ignore_index)
        valid = valid_labels(labels, vocab_size, ignore_index)
        if not divergence_on_ignored:
            kl_weight = without_ignored_tokens(kl_weight, valid, div)
    return weigh_and_reduce(div, ce, valid, kl_weight=kl_weight, ce_weight=ce_weight,
                            temperature=temperature, temperature_scaling=temperature_scaling,
                            reduction=reduction, normalizer=normalizer)
