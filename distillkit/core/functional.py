"""The public functional API: argument checks, backend dispatch, weighting and reduction.

`distill_loss` computes, per token, D (the divergence, through the fused op) and
ce (hard-label cross-entropy, fused into the same pass), then combines them as
kl_weight * T**2 * D + ce_weight * ce and reduces. The [tokens x vocabulary]
work happens in `torch.ops.distillkit.distill_rows`; everything here is
O(tokens), with no host-device synchronization (the optional label range check
aside, which `check_labels=False` and `torch.compile` skip).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, backends, divergences
from . import ops  # noqa: F401  (registers torch.ops.distillkit.*)
from ._checks import Weight, is_literal_zero
from .divergences import NO_DIVERGENCE
from ._reduce import LossTerms, mask_ignored_tokens, valid_labels, weigh_and_reduce


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets for logits aligned with the inputs: labels[..., 1:] followed by ignore_index.

    A causal LM's logits at position i predict token i + 1, and Hugging Face labels are the input ids
    (with ignore_index on prompt and padding). ``distill_loss(logits, teacher_logits, shift_labels(labels))``
    then equals TRL's and Liger-Kernel's loss on ``logits[..., :-1, :]`` and ``labels[..., 1:]``: the
    last position gets ignore_index and so takes part in no term, and no [B, S, V] tensor is copied.
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor; got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() == 0:
        raise ValueError("labels must have a sequence dimension; got a 0-dim tensor")
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def loss_terms(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    alpha_beta: tuple[float, float] = (0.5, 0.5),
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    check_labels: bool = True,
    with_divergence: bool = True,
    with_ce: Optional[bool] = None,
    vocab_mismatch: str = "error",
) -> LossTerms:
    """Per-token divergence and cross-entropy from one fused pass (differentiable w.r.t. the student)."""
    options = _checks.check_options(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                                    temperature=temperature, reduction="none", backend=backend)
    with_ce = _checks.check_terms_inputs(student_logits, teacher_logits, labels, with_divergence=with_divergence,
                                         with_ce=with_ce, vocab_mismatch=vocab_mismatch)
    vocab_size = student_logits.shape[-1]
    resolved = backends.resolve(backend, student_logits.device, student_logits.dtype)
    div_id = divergences.IDS[divergence] if with_divergence else NO_DIVERGENCE
    param_a, param_b = divergences.kernel_params(divergence, options)
    div_vocab = min(vocab_size, teacher_logits.shape[-1]) if with_divergence else vocab_size
    teacher = teacher_logits.detach() if with_divergence else None
    if vocab_size == 0:
        raise ValueError("student_logits has an empty vocabulary dimension")
    if with_ce and check_labels and not torch.compiler.is_compiling():
        _checks.check_label_range(labels, vocab_size, ignore_index)
    kernel_labels = labels.long() if with_ce else None
    div, ce, _ = torch.ops.distillkit.distill_rows(
        student_logits, teacher, kernel_labels, div_id, float(param_a), float(param_b), float(temperature),
        int(ignore_index), bool(with_ce), div_vocab, resolved)
    valid = valid_labels(labels, vocab_size, ignore_index) if labels is not None else None
    return LossTerms(div, ce, valid)


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
    kl_weight: Weight = 1.0,
    ce_weight: Weight = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
    check_labels: bool = True,
    vocab_mismatch: str = "error",
    process_group=None,
    vocab_start: Optional[int] = None,
    divergence_on_ignored: bool = False,
) -> torch.Tensor:
    """Fused knowledge-distillation loss between student and teacher logits.

    Logits and labels are aligned position by position: for a causal LM's [B, S, V] logits and
    Hugging Face labels, pass ``distillkit.shift_labels(labels)`` (position i predicts token i + 1),
    exactly as TRL, Liger-Kernel and torchtune expect shifted inputs.

    Args:
        student_logits: [..., V] float32/float16/bfloat16; receives the gradient.
        teacher_logits: [..., V], same shape; treated as a constant (no gradient). May be None when
            kl_weight == 0.0 (CE only); -inf entries (masked vocabulary) are allowed.
        labels: [...] int64 hard labels. A token whose label is ignore_index (or, with check_labels=False,
            out of range) takes part in no term, divergence included, and is not counted by "mean" (as in
            TRL, Liger-Kernel and torchtune); see divergence_on_ignored.
        divergence: "forward_kl" KL(p||q) | "reverse_kl" KL(q||p) | "jsd" (beta = teacher weight) |
            "skew_forward_kl" | "skew_reverse_kl" | "tvd" | "alpha_beta"; p = softmax(t/T), q = softmax(s/T).
            The formulas: distillkit/core/divergences.py, README "The math".
        beta: JSD mixture weight of the teacher, in (0, 1).
        skew: skew-KL mixing weight, in [0, 1).
        alpha_beta: (alpha, beta) of the alpha-beta divergence (ABKD), both >= 0, not both 0; (1, 0) is
            forward KL, (0, 1) reverse KL.
        temperature: T > 0 for the divergence; CE always uses temperature 1.
        temperature_scaling: multiply the divergence by T**2 (Hinton).
        kl_weight, ce_weight: floats, or tensors broadcastable to the leading shape (per-token weights,
            differentiable). loss = kl_weight * D + ce_weight * ce per token.
        reduction: "mean" (sum / active tokens) | "sum" | "none" (leading shape, fp32).
        normalizer: overrides the "mean" denominator (e.g. num_items_in_batch under gradient accumulation).
        backend: "auto" | "triton" | "torch" | "cpu" | "cuda".
        check_labels: verify labels lie in [0, V) (one device sync; skipped under torch.compile). With the
            check off, out-of-range labels count as ignored and are never read out of bounds.
        vocab_mismatch: "error" (default) when the vocabulary sizes differ, or "truncate": the divergence
            compares the distributions over the shared first min(V_student, V_teacher) ids (the extra ids
            get probability 0 on both sides) while CE keeps the student's whole vocabulary.
        process_group: the logits are this rank's shard of the vocabulary across the group (tensor
            parallel); see distillkit.parallel.distill_loss_vocab_parallel. vocab_start is the shard's first
            id (pass it: otherwise the shard sizes are gathered once per group, a host-level collective).
        divergence_on_ignored: False (default): ignored labels mask every term. True: labels mask only the
            CE term and the divergence covers every token (distillkit 0.1's behaviour), for callers that mask
            the divergence themselves with a per-token kl_weight, e.g. to distil on prompt tokens that
            carry no hard label.
    Returns:
        The loss in float32 (the row math is fp32 for every input dtype; float64 inputs run on the
        torch backend in fp32 too: use distillkit.reference for a float64 oracle).
    """
    if process_group is not None:
        # The op core's one reference to the parallel layer (which does not import this module).
        from ..parallel.api import distill_loss_vocab_parallel

        return distill_loss_vocab_parallel(
            student_logits, teacher_logits, labels, process_group=process_group, vocab_start=vocab_start,
            divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta, temperature=temperature,
            temperature_scaling=temperature_scaling, kl_weight=kl_weight, ce_weight=ce_weight,
            ignore_index=ignore_index, reduction=reduction, normalizer=normalizer, backend=backend,
            check_labels=check_labels, vocab_mismatch=vocab_mismatch, divergence_on_ignored=divergence_on_ignored)
    _checks.check_options(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                          temperature=temperature, reduction=reduction, backend=backend)
    _checks.check_loss_inputs(student_logits, labels, kl_weight, ce_weight, normalizer)
    terms = loss_terms(
        student_logits, teacher_logits, labels, divergence=divergence, beta=beta, skew=skew,
        alpha_beta=alpha_beta, temperature=temperature, ignore_index=ignore_index, backend=backend,
        check_labels=check_labels, vocab_mismatch=vocab_mismatch, with_divergence=not is_literal_zero(kl_weight),
        with_ce=labels is not None and not is_literal_zero(ce_weight))
    kl_weight = mask_ignored_tokens(kl_weight, terms.valid_label, divergence_on_ignored)
    return weigh_and_reduce(*terms, kl_weight=kl_weight, ce_weight=ce_weight, temperature=temperature,
                            temperature_scaling=temperature_scaling, reduction=reduction,
                            normalizer=normalizer)
