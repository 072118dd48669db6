"""Distillation from a sparse teacher: the teacher's top-k ids and log-probabilities per token.

    loss = distillkit.distill_loss_topk(student_logits, topk_ids, topk_logprobs, labels,
                                        tail="bucket", temperature=2.0, kl_weight=0.5, ce_weight=0.5)

The math is in docs/SPARSE.md and `distillkit.sparse.reference` (the oracle); the per-row kernel in
kernels/topk.py. Here: the O(N K) teacher preprocessing and the public function; the custom ops and the Triton launcher
are in topk_ops.py, the chunked-PyTorch backend in topk_torch.py. Per-token weights and reductions go
through `distillkit.core._reduce.weigh_and_reduce`. The tails are the rows of
`distillkit.sparse.tails.TAIL_REGISTRY`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..core import _checks, backends, divergences
from ..core._checks import Weight, is_literal_zero
from ..core._reduce import mask_ignored_tokens, valid_labels, weigh_and_reduce
from ..core.divergences import NO_DIVERGENCE
from .tails import REST_FLOOR, TAILS, TOPK_DIVERGENCES, check_tail, tail_named  # noqa: F401  (TAILS: re-exported)
from .topk_ops import BLOCK_K_SIZES, topk_rows


# -- teacher preprocessing (O(N K), plain tensor ops) ------------------------------------------------

def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and at -inf."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_log_probs(ids: Tensor, logprobs: Tensor, vocab_size: int, *, tail: str,
                      ratio: float) -> tuple[Tensor, Tensor]:
    """fp32 teacher log-probabilities over the categories: ([..., K], rest [...] (0 without a rest category)).
    ratio = T0 / T rescales log-probabilities recorded at temperature T0 to the loss temperature T."""
    present = (ids >= 0) & (ids < vocab_size)
    lp = torch.where(present, logprobs.detach().float(), -math.inf)
    a = lp * ratio
    if not tail_named(tail).rest_category:  # the present ids are the teacher's whole distribution
        lse = torch.logsumexp(a, dim=-1, keepdim=True)
        return a - torch.where(torch.isfinite(lse), lse, 0.0), torch.zeros_like(lp[..., 0])
    recorded = torch.logsumexp(lp, dim=-1).clamp_max(0.0)  # log of the recorded top-k mass at T0
    rest = ratio * _log1mexp(recorded)  # the rest bucket, rescaled like one more category
    z = torch.logaddexp(torch.logsumexp(a, dim=-1), rest)  # finite: rest = 0 when nothing is present
    return a - z[..., None], (rest - z).clamp_min(math.log(REST_FLOOR))


# -- public function ---------------------------------------------------------------------------------

def distill_loss_topk(
    student_logits: Tensor,
    teacher_topk_ids: Optional[Tensor],
    teacher_topk_logprobs: Optional[Tensor],
    labels: Optional[Tensor] = None,
    *,
    tail: str = "renormalize",
    teacher_temperature: Optional[float] = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    temperature_scaling: bool = True,
    kl_weight: Weight = 1.0,
    ce_weight: Weight = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
    check_labels: bool = True,
    divergence_on_ignored: bool = False,
) -> Tensor:
    """Distillation loss against a teacher known only through its top-k log-probabilities per token.

    Args:
        student_logits: [..., V] float32/float16/bfloat16; receives the (dense) gradient.
        teacher_topk_ids: [..., K] int32/int64 distinct ids per token; ids < 0 mark absent entries (padding).
            A token with no present id has no teacher signal: divergence weight 0, not counted by "mean".
        teacher_topk_logprobs: [..., K] log-probabilities of those ids, recorded at teacher_temperature.
        tail: "renormalize" (teacher and student both restricted to the K ids and renormalized) |
            "bucket" (one more category holding the remaining mass on each side: 1 - sum p, 1 - sum q) |
            "student_full" (the teacher renormalized over its present ids is its whole distribution; the
            student is its full-vocabulary softmax read at those ids, as in Axolotl's top-k KD; forward_kl
            only). The gradient of student_full, (q - p) / T, is dense over the vocabulary. With a cache
            that SAMPLED the teacher (k draws per position, the distinct ids stored with log(count / k):
            Sparse Logit Sampling, ACL 2025) it is an unbiased estimate of the dense forward-KL gradient,
            since E[p_hat] = p, provided the loss temperature is the one the cache was sampled at (the
            rescale of an empirical distribution to another temperature is biased). With a top-k cache
            it ignores the teacher's tail mass and pushes the student's off-cache mass toward 0.
        teacher_temperature: T0 the log-probabilities were recorded at (None: 1.0, the raw model); they are
            rescaled to the loss temperature T as p ∝ exp(logprob * T0 / T).
        divergence: "forward_kl" KL(p||q) | "reverse_kl" KL(q||p), over the categories (not with "student_full":
            reverse KL against a teacher that is 0 off its ids is infinite; a ValueError).
        temperature, temperature_scaling, kl_weight, ce_weight, ignore_index, reduction, normalizer,
            check_labels, divergence_on_ignored: as in `distillkit.distill_loss` (CE at temperature 1 over
            the full vocabulary; an ignored label masks every term; check_labels also checks that no id is >= V).
        backend: "auto" (triton on CUDA, torch on CPU) | "triton" | "torch".
    Returns:
        The loss in float32.
    """
    _checks.check_loss_inputs(student_logits, labels, kl_weight, ce_weight, normalizer)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    _checks.check_labels(labels, student_logits)
    terms = prepare_topk_terms(lead, vocab, student_logits.device, student_logits.dtype, teacher_topk_ids,
                               teacher_topk_logprobs, labels, tail=tail, teacher_temperature=teacher_temperature,
                               divergence=divergence, temperature=temperature, kl_weight=kl_weight,
                               ce_weight=ce_weight, ignore_index=ignore_index, reduction=reduction, backend=backend,
                               check_labels=check_labels, divergence_on_ignored=divergence_on_ignored)
    div, ce, _ = topk_rows(student_logits, terms.ids, terms.teacher_lp, terms.teacher_rest, terms.labels,
                           terms.divergence, terms.tail, float(temperature), int(ignore_index), terms.with_ce,
                           terms.backend)
    return weigh_and_reduce(div, ce, terms.valid, kl_weight=terms.kl_weight, ce_weight=terms.ce_weight,
                            temperature=temperature, temperature_scaling=temperature_scaling, reduction=reduction,
                            normalizer=normalizer)


class TopKTerms(NamedTuple):
    """The row op's inputs for one call, prepared from the public arguments (shared by distill_loss_topk and
    distillkit.sparse.fused_linear_topk)."""

    ids: Tensor  # [..., K] int (a [..., 1] of -1 for CE only)
    teacher_lp: Tensor  # [..., K] fp32 teacher log-probabilities over the categories
    teacher_rest: Tensor  # [...] fp32 log-probability of the rest category (0 without one)
    labels: Optional[Tensor]  # int64 when CE is on, else None
    divergence: int  # the divergence id (NO_DIVERGENCE for CE only)
    tail: int  # the tail id
    with_ce: bool
    backend: str  # resolved
    kl_weight: Weight  # masked: 0 for tokens without a teacher id, and (by default) ignored labels
    ce_weight: Weight
    valid: Optional[Tensor]  # labels that are not ignored (None without labels)


def prepare_topk_terms(lead, vocab: int, device, dtype, teacher_topk_ids, teacher_topk_logprobs, labels, *,
                       tail: str, teacher_temperature, divergence: str, temperature: float, kl_weight: Weight,
                       ce_weight: Weight, ignore_index: int, reduction: str, backend: str, check_labels: bool,
                       divergence_on_ignored: bool) -> TopKTerms:
    """Check the options and the teacher tensors for student rows of shape lead + (vocab,); the teacher's
    fp32 log-probabilities over the categories of `tail`. The option checks read no tensor data; the id range
    check (check_labels) is one host-device sync, skipped under torch.compile."""
    _checks.check_options(divergence="forward_kl", beta=0.5, skew=0.1, temperature=temperature,
                          reduction=reduction, backend="auto")
    tail_row = check_tail(tail, divergence)
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary dimension")
    if teacher_temperature is not None and not (isinstance(teacher_temperature, (int, float))
                                                and 0 < teacher_temperature < math.inf):
        raise ValueError(f"teacher_temperature must be None or a finite float > 0; got {teacher_temperature!r}")
    with_div = not is_literal_zero(kl_weight)
    with_ce = labels is not None and not is_literal_zero(ce_weight)
    if labels is None and not is_literal_zero(ce_weight):
        raise ValueError("ce_weight is non-zero but labels is None: pass labels for the CE term")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != lead):
        raise ValueError(f"labels must be an integer tensor of shape {tuple(lead)}")
    resolved = backends.resolve(backend, device, dtype, op="topk")
    if with_div:
        ids, logprobs = teacher_topk_ids, teacher_topk_logprobs
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("teacher_topk_ids must be an int32/int64 tensor [..., K]")
        if not isinstance(logprobs, Tensor) or not logprobs.dtype.is_floating_point:
            raise TypeError("teacher_topk_logprobs must be a floating-point tensor [..., K]")
        if ids.dim() == 0 or ids.shape[:-1] != lead or logprobs.shape != ids.shape:
            raise ValueError(f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs "
                             f"{tuple(logprobs.shape)} must both be {tuple(lead)} + (K,)")
        if ids.shape[-1] > BLOCK_K_SIZES[-1]:
            raise ValueError(f"teacher_topk_ids has K={ids.shape[-1]} entries per token; at most "
                             f"{BLOCK_K_SIZES[-1]} are supported")
        if ids.device != device or logprobs.device != device:
            raise ValueError(f"the top-k tensors must be on {device}, like student_logits")
        if check_labels and not torch.compiler.is_compiling() and bool((ids >= vocab).any()):
            raise ValueError(f"teacher_topk_ids contains ids >= V = {vocab} (a teacher with a larger "
                             "vocabulary?); pass check_labels=False to treat them as absent")
    if with_ce and check_labels and not torch.compiler.is_compiling():
        _checks.check_label_range(labels, vocab, ignore_index)

    if with_div:
        ratio = (1.0 if teacher_temperature is None else float(teacher_temperature)) / temperature
        tlp, trest = teacher_log_probs(ids, logprobs, vocab, tail=tail, ratio=ratio)
        ids_k = ids.detach()
        has_teacher = ((ids >= 0) & (ids < vocab)).any(-1)
        kl_weight = kl_weight * has_teacher.to(torch.float32)
    else:  # CE only: the teacher is not read
        ids_k = torch.full((*lead, 1), -1, dtype=torch.int64, device=device)
        tlp = torch.full((*lead, 1), -math.inf, dtype=torch.float32, device=device)
        trest = torch.zeros(lead, dtype=torch.float32, device=device)
    valid = valid_labels(labels, vocab, ignore_index) if labels is not None else None
    kl_weight = mask_ignored_tokens(kl_weight, valid, divergence_on_ignored)
    return TopKTerms(ids_k, tlp, trest, labels.long() if with_ce else None,
                     divergences.IDS[divergence] if with_div else NO_DIVERGENCE, tail_row.id, bool(with_ce), resolved,
                     kl_weight, ce_weight, valid)
