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
    alpha_beta       -1/(a b) sum (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)),  (a, b) = alpha_beta,
                     with the limits b = 0 and a = 0 (forward KL at (1, 0), reverse KL at (0, 1))

D is multiplied by T**2 when temperature_scaling; ce = -log softmax(s)[y] at
temperature 1 where y != ignore_index; loss = kl_weight * D + ce_weight * ce.
With vocab_mismatch="truncate", D compares the distributions over the first
min(V_student, V_teacher) ids and CE keeps the student's whole vocabulary.

It shares no math with the fused losses: the divergences, the weighting and the "mean" count are
written here again (only the argument checks are common, so that both raise the same errors).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks

__all__ = ["distill_loss", "divergence_per_token", "cross_entropy_per_token", "valid_labels",
           "without_ignored_tokens", "weigh_and_reduce"]


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
                         alpha_beta: tuple[float, float] = (0.5, 0.5), temperature: float = 1.0) -> torch.Tensor:
    """D for every token (leading shape), not scaled by T**2; NaN where either row defines no distribution."""
    undefined = _no_distribution(student_logits) | _no_distribution(teacher_logits)
    # Such rows are computed on zeros (any finite row would do) so that autograd through them stays
    # finite; _UndefinedRows then gives them their NaN.
    row_undefined = undefined.unsqueeze(-1)
    div = _divergence(torch.where(row_undefined, 0.0, student_logits), torch.where(row_undefined, 0.0, teacher_logits),
                      divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta, temperature=temperature)
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


def _power(log_x: torch.Tensor, exponent: float) -> torch.Tensor:
    """x ** exponent from log x: 0 where x = 0 (exponent > 0), with a finite gradient there."""
    return torch.exp(exponent * log_x)


def _alpha_beta(p, q, log_p, log_q, alpha: float, beta: float) -> torch.Tensor:
    """The alpha-beta divergence of Cichocki et al. (ABKD), with its two limits written out."""
    if alpha > 0 and beta > 0:
        total = alpha + beta
        cross = _power(log_p, alpha) * _power(log_q, beta)
        return -(cross - alpha / total * _power(log_p, total) - beta / total * _power(log_q, total)).sum(-1) / (
            alpha * beta)
    if beta == 0:  # 1/a^2 sum (p^a log(p^a / q^a) - p^a + q^a)
        p_a, q_a = _power(log_p, alpha), _power(log_q, alpha)
        return (alpha * _kl_terms(p_a, log_p, log_q) - p_a.sum(-1) + q_a.sum(-1)) / alpha**2
    p_b, q_b = _power(log_p, beta), _power(log_q, beta)  # alpha == 0: 1/b^2 sum (q^b log(q^b / p^b) - q^b + p^b)
    return (beta * _kl_terms(q_b, log_q, log_p) - q_b.sum(-1) + p_b.sum(-1)) / beta**2


def _divergence(student_logits, teacher_logits, *, divergence, beta, skew, alpha_beta, temperature):
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
    if divergence == "alpha_beta":
        return _alpha_beta(p, q, log_p, log_q, float(alpha_beta[0]), float(alpha_beta[1]))
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


def weigh_and_reduce(div: torch.Tensor, ce: torch.Tensor, valid: Optional[torch.Tensor], *, kl_weight, ce_weight,
                     temperature: float, temperature_scaling: bool, reduction: str, normalizer) -> torch.Tensor:
    """Per token kl_weight * T^2 * D + ce_weight * ce (a weight of exactly 0 drops its term, even where the
    term is inf or NaN); "mean" divides by the tokens that carry a loss: kl_weight != 0, or ce_weight != 0
    and a valid label (or by normalizer)."""
    scale = temperature**2 if temperature_scaling else 1.0
    kl_w = torch.as_tensor(kl_weight, dtype=div.dtype, device=div.device).expand(div.shape)
    ce_w = torch.as_tensor(ce_weight, dtype=div.dtype, device=div.device).expand(div.shape)
    loss = torch.where(kl_w != 0, kl_w * (scale * div), 0.0) + torch.where(ce_w != 0, ce_w * ce, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if normalizer is not None:
        return loss.sum() / normalizer
    carries_loss = (kl_w != 0) if valid is None else (kl_w != 0) | ((ce_w != 0) & valid)
    return loss.sum() / carries_loss.sum().clamp_min(1).to(loss.dtype)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha_beta: tuple[float, float] = (0.5, 0.5),
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
    _checks.check_options(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                          temperature=temperature, reduction=reduction, backend=backend)
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
                                   divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                                   temperature=temperature)
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
