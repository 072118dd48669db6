"""Drop-in loss modules on top of :func:`distillkit.distill_loss`."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import nn

from ._checks import Weight
from ._reduce import weigh_and_reduce
from .functional import distill_loss, loss_terms
from .spans import NUM_SPANS, PAD_SPAN, SPAN_NAMES, Span


class DistillationLoss(nn.Module):
    """`distill_loss` with its options fixed at construction.

    forward(student_logits, teacher_logits, labels=None, *, kl_weight=None, ce_weight=None, normalizer=None):
    per-call kl_weight / ce_weight (e.g. per-token tensors) override the constructor's.

    Inputs are aligned position by position: for a causal LM, pass ``distillkit.shift_labels(labels)``.
    A token whose label is ignore_index takes part in no term (divergence_on_ignored=True: only CE
    is masked by labels), as in TRL, Liger-Kernel and torchtune.
    """

    def __init__(self, divergence: str = "forward_kl", *, beta: float = 0.5, skew: float = 0.1,
                 alpha_beta: tuple[float, float] = (0.5, 0.5), temperature: float = 1.0,
                 temperature_scaling: bool = True, kl_weight: Weight = 1.0,
                 ce_weight: Weight = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", check_labels: bool = True, vocab_mismatch: str = "error",
                 divergence_on_ignored: bool = False):
        super().__init__()
        if not isinstance(divergence_on_ignored, bool):
            raise TypeError(f"divergence_on_ignored must be a bool; got {type(divergence_on_ignored).__name__}")
        self.options = dict(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                            temperature=temperature, temperature_scaling=temperature_scaling, ignore_index=ignore_index,
                            reduction=reduction, backend=backend, check_labels=check_labels,
                            vocab_mismatch=vocab_mismatch, divergence_on_ignored=divergence_on_ignored)
        self.kl_weight, self.ce_weight = kl_weight, ce_weight
        # Validate now rather than on the first batch.
        from . import _checks
        _checks.check_options(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                              temperature=temperature, reduction=reduction, backend=backend)

    def forward(self, student_logits, teacher_logits, labels=None, *, kl_weight: Optional[Weight] = None,
                ce_weight: Optional[Weight] = None, normalizer=None):
        return distill_loss(
            student_logits, teacher_logits, labels,
            kl_weight=self.kl_weight if kl_weight is None else kl_weight,
            ce_weight=self.ce_weight if ce_weight is None else ce_weight,
            normalizer=normalizer, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


SpanWeights = Mapping[Union[str, int, Span], tuple[float, float]]

# KL on reasoning and answers, CE on tool calls, nothing on prompt and tool results.
DEFAULT_SPAN_WEIGHTS: dict[str, tuple[float, float]] = {
    "prompt": (0.0, 0.0), "reason": (1.0, 0.0), "action": (0.0, 1.0),
    "observation": (0.0, 0.0), "answer": (1.0, 0.0),
}


def _span_index(key) -> int:
    if isinstance(key, str):
        if key.lower() not in SPAN_NAMES:
            raise ValueError(f"span_weights has unknown span {key!r}; known: {', '.join(SPAN_NAMES)}")
        return SPAN_NAMES.index(key.lower())
    index = int(key)
    if not 0 <= index < NUM_SPANS:
        raise ValueError(f"span_weights has span id {index}, outside [0, {NUM_SPANS})")
    return index


def check_span_ids(span_ids: torch.Tensor) -> None:
    """Raise a ValueError naming span_ids if an id is outside {PAD_SPAN, 0, ..., NUM_SPANS - 1}. One device sync."""
    if not isinstance(span_ids, torch.Tensor) or span_ids.dtype.is_floating_point or span_ids.dtype == torch.bool:
        raise TypeError(f"span_ids must be an integer tensor; got {getattr(span_ids, 'dtype', type(span_ids).__name__)}")
    bad = (span_ids < PAD_SPAN) | (span_ids >= NUM_SPANS)
    if bool(bad.any()):
        raise ValueError(f"span_ids contains {int(span_ids[bad].flatten()[0])}; span ids are {PAD_SPAN} (padding) "
                         f"or 0..{NUM_SPANS - 1} ({', '.join(SPAN_NAMES)})")


def span_token_weights(table: torch.Tensor, span_ids: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """[..., 2] per-token (kl_weight, ce_weight) from a [NUM_SPANS, 2] table; padding and, where the check
    is skipped (torch.compile), unknown ids weigh 0 — never a row picked by negative indexing."""
    if check and not torch.compiler.is_compiling():
        check_span_ids(span_ids)
    known = (span_ids >= 0) & (span_ids < NUM_SPANS)
    per_token = table[torch.where(known, span_ids, 0).long()]
    return torch.where(known.unsqueeze(-1), per_token, 0.0)


class SpanDistillationLoss(nn.Module):
    """Span-level distillation: each token's (kl_weight, ce_weight) comes from its span id.

    span_weights maps span names or ids (see distillkit.Span) to (kl_weight, ce_weight); spans not
    listed get (0, 0), and padding (span id PAD_SPAN = -1) is always 0. One fused call computes the
    whole loss, e.g. KL on reasoning spans, CE on action spans and nothing on observations. The span
    ids alone decide where the divergence applies (labels mask only the CE term here): a reasoning
    span may be distilled without hard labels. Span ids outside {-1, 0, ..., 4} raise a ValueError
    (checked when check_labels is on and not under torch.compile; there they weigh 0).

    learnable=True learns one log-variance s_k per non-zero table entry (uncertainty weighting): the
    effective weight is w_k * exp(-s_k) and s_k is added to the loss, so the weights cannot collapse
    to zero.

    forward(student_logits, teacher_logits, labels, span_ids, *, sample_weight=None, normalizer=None,
    regularizer_scale=1.0) returns the loss; `self.last_components` then holds detached per-span sums
    (kl/<span>, ce/<span>) and token counts for logging. Under gradient accumulation with learnable
    weights, pass each micro-batch's share of the accumulated batch as regularizer_scale (e.g. its
    label tokens / normalizer) so that sum_k s_k is counted once per optimizer step, not per call.
    """

    def __init__(self, span_weights: Optional[SpanWeights] = None, divergence: str = "forward_kl", *,
                 learnable: bool = False, beta: float = 0.5, skew: float = 0.1,
                 alpha_beta: tuple[float, float] = (0.5, 0.5), temperature: float = 1.0,
                 temperature_scaling: bool = True, ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", check_labels: bool = True, vocab_mismatch: str = "error"):
        super().__init__()
        table = torch.zeros(NUM_SPANS, 2)
        for key, (kl, ce) in (DEFAULT_SPAN_WEIGHTS if span_weights is None else span_weights).items():
            table[_span_index(key)] = torch.tensor([float(kl), float(ce)])
        self.register_buffer("weight_table", table)
        # Decided once on the host, so forward never synchronizes to inspect the table.
        self._kl_spans = [span for span in Span if table[span, 0] != 0]
        self._ce_spans = [span for span in Span if table[span, 1] != 0]
        self.learnable = learnable
        self.log_vars = nn.Parameter(torch.zeros(NUM_SPANS, 2)) if learnable else None
        self.term_options = dict(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                                 temperature=temperature,
                                 ignore_index=ignore_index, backend=backend, check_labels=check_labels,
                                 vocab_mismatch=vocab_mismatch)
        self.temperature_scaling, self.reduction = temperature_scaling, reduction
        self.last_components: dict[str, torch.Tensor] = {}
        from . import _checks
        _checks.check_options(divergence=divergence, beta=beta, skew=skew, alpha_beta=alpha_beta,
                              temperature=temperature, reduction=reduction, backend=backend)

    def effective_table(self) -> torch.Tensor:
        """[NUM_SPANS, 2] (kl_weight, ce_weight) per span, after learned scaling."""
        if self.log_vars is None:
            return self.weight_table
        return self.weight_table * torch.exp(-self.log_vars)

    def forward(self, student_logits, teacher_logits, labels, span_ids, *,
                sample_weight: Optional[torch.Tensor] = None, normalizer=None, regularizer_scale=1.0):
        if span_ids.shape != student_logits.shape[:-1]:
            raise ValueError(f"span_ids has shape {tuple(span_ids.shape)} but must match the leading shape "
                             f"{tuple(student_logits.shape[:-1])} of student_logits")
        per_token = span_token_weights(self.effective_table().to(student_logits.device), span_ids,
                                       check=self.term_options["check_labels"])
        if sample_weight is not None:  # e.g. curriculum weights per sequence, [B] or broadcastable
            per_token = per_token * sample_weight.reshape(
                *sample_weight.shape, *([1] * (span_ids.dim() - sample_weight.dim())), 1)
        kl_weight, ce_weight = per_token[..., 0], per_token[..., 1]
        uses_kl, uses_ce = bool(self._kl_spans), bool(self._ce_spans)
        terms = loss_terms(student_logits, teacher_logits, labels, with_divergence=uses_kl,
                           with_ce=uses_ce and labels is not None, **self.term_options)
        loss = weigh_and_reduce(*terms, kl_weight=kl_weight if uses_kl else 0.0,
                                ce_weight=ce_weight if uses_ce else 0.0,
                                temperature=self.term_options["temperature"],
                                temperature_scaling=self.temperature_scaling, reduction=self.reduction,
                                normalizer=normalizer)
        self.last_components = self._components(terms, span_ids)
        if self.log_vars is not None:
            loss = loss + regularizer_scale * self.regularizer()
        return loss

    def regularizer(self) -> torch.Tensor:
        """sum_k s_k over the learned entries (0-dim); added to the loss so weights cannot collapse to 0."""
        if self.log_vars is None:
            raise ValueError("regularizer() needs learnable=True")
        return (self.log_vars * (self.weight_table != 0)).sum()

    @torch.no_grad()
    def _components(self, terms, span_ids) -> dict[str, torch.Tensor]:
        scale = self.term_options["temperature"] ** 2 if self.temperature_scaling else 1.0
        out = {}
        for span in Span:
            out[f"tokens/{span.name.lower()}"] = (span_ids == span).sum()
        for span in self._kl_spans:
            out[f"kl/{span.name.lower()}"] = (terms.divergence * scale * (span_ids == span)).sum()
        for span in self._ce_spans:
            out[f"ce/{span.name.lower()}"] = (terms.cross_entropy * (span_ids == span)).sum()
        return out
