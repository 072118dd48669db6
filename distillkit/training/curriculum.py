"""Curriculum weights for distillation: easy trajectories first, hard ones later.

A sample's *difficulty* is a number in [0, 1]:

    difficulty = (1 - entropy_weight) * cdf(complexity) + entropy_weight * teacher_entropy / log(V)

- ``complexity`` is read from the sample's span ids (no extra data field): the number of
  tool-call steps (``"steps"``, contiguous ACTION runs), of ACTION tokens (``"action_tokens"``),
  of target tokens (``"target_tokens"``: REASON, ACTION, ANSWER) or of tokens (``"tokens"``).
- ``cdf`` is the empirical *strictly-less* distribution over a reference set of scores (the
  training set): the fraction of reference samples that are strictly easier. The easiest samples
  therefore always have difficulty 0 and are never masked, however many ties there are. Without
  a reference, ``min(complexity / max_complexity, 1)`` is used.
- ``teacher_entropy`` (optional) is the teacher's mean next-token entropy over the sample's
  weighted target tokens, normalized by log(V).

The *competence* c(t) grows from ``initial_competence`` to 1 over the first ``warmup`` fraction of
training (Platanios et al., 2019, "Competence-based curriculum learning"):

    sqrt:   c(t) = min(1, sqrt(t * (1 - c0**2) / T + c0**2))
    linear: c(t) = min(1, t * (1 - c0) / T + c0)

and a sample's weight is 1 when difficulty <= c(t), 0 when difficulty >= c(t) + ramp, linear in
between (``ramp=0``: a hard cutoff), floored at ``min_weight``. The weights are passed to
:class:`distillkit.SpanDistillationLoss` as ``sample_weight``: they scale both the KL and the CE
terms of a sample. Everything depends only on the training step and the data, so a resumed run
computes the same weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from ..core.logit_transform import transform_logits
from ..core.spans import PAD_SPAN, Span
from .coerce import ConfigError, coerce_fields

MEASURES = ("steps", "action_tokens", "target_tokens", "tokens")
SCHEDULES = ("sqrt", "linear")
_TARGETS = (Span.REASON, Span.ACTION, Span.ANSWER)


@dataclass
class CurriculumConfig:
    """Competence-based curriculum over trajectory complexity (see the module docstring)."""

    measure: str = "steps"
    initial_competence: float = 0.25
    warmup: float = 0.5  # fraction of the training steps after which competence is 1
    schedule: str = "sqrt"
    ramp: float = 0.0  # width (in difficulty units) of the linear ramp above the competence
    min_weight: float = 0.0  # weight of the samples beyond the ramp
    entropy_weight: float = 0.0  # share of the teacher entropy in the difficulty
    max_complexity: Optional[float] = None  # normalizer when no reference scores are available

    def __post_init__(self):
        for key, value in coerce_fields(CurriculumConfig, asdict(self)).items():
            setattr(self, key, value)
        checks = {
            "measure": (self.measure in MEASURES, f"must be one of {MEASURES}"),
            "schedule": (self.schedule in SCHEDULES, f"must be one of {SCHEDULES}"),
            "initial_competence": (0.0 <= self.initial_competence <= 1.0, "must be in [0, 1]"),
            "warmup": (self.warmup > 0.0, "must be > 0 (a fraction of training)"),
            "ramp": (self.ramp >= 0.0, "must be >= 0"),
            "min_weight": (0.0 <= self.min_weight <= 1.0, "must be in [0, 1]"),
            "entropy_weight": (0.0 <= self.entropy_weight <= 1.0, "must be in [0, 1]"),
            "max_complexity": (self.max_complexity is None or self.max_complexity > 0, "must be > 0"),
        }
        for key, (valid, requirement) in checks.items():
            if not valid:
                raise ConfigError(f"{requirement}; got {getattr(self, key)!r}", key=key)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CurriculumConfig":
        return cls(**coerce_fields(cls, values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- complexity

def complexity_scores(span_ids: torch.Tensor, measure: str = "steps") -> torch.Tensor:
    """[B, L] span ids (PAD_SPAN = -1 for padding) -> [B] float32 complexity per sample."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}; got {measure!r}")
    if span_ids.dim() == 1:
        span_ids = span_ids.unsqueeze(0)
    if measure == "steps":
        action = span_ids == Span.ACTION
        starts = action.clone()
        starts[:, 1:] &= ~action[:, :-1]
        return starts.sum(-1).float()
    if measure == "action_tokens":
        return (span_ids == Span.ACTION).sum(-1).float()
    if measure == "target_tokens":
        return sum((span_ids == s).sum(-1) for s in _TARGETS).float()
    return (span_ids != PAD_SPAN).sum(-1).float()


def example_complexity(span_ids: Sequence[int], measure: str = "steps") -> float:
    """complexity_scores for one unpadded example given as a list of span ids."""
    return float(complexity_scores(torch.as_tensor(list(span_ids), dtype=torch.long), measure)[0])


def reference_scores(examples: Iterable[Mapping[str, Any]], measure: str = "steps") -> torch.Tensor:
    """Sorted complexity scores of a dataset of examples that carry "span_ids"."""
    scores = [example_complexity(example["span_ids"], measure) for example in examples]
    return torch.tensor(sorted(scores), dtype=torch.float32)


# ----------------------------------------------------------------------------- schedule

def competence(step: float, total_steps: float, *, initial: float = 0.25, warmup: float = 0.5,
               schedule: str = "sqrt") -> float:
    """c(step) in [initial, 1]: reaches 1 after warmup * total_steps steps."""
    horizon = max(warmup * max(total_steps, 1), 1e-12)
    t = min(max(step / horizon, 0.0), 1.0)
    if schedule == "sqrt":
        return min(1.0, math.sqrt(t * (1.0 - initial**2) + initial**2))
    if schedule == "linear":
        return min(1.0, t * (1.0 - initial) + initial)
    raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")


def weights_from_difficulty(difficulty: torch.Tensor, competence_value: float, *, ramp: float = 0.0,
                            min_weight: float = 0.0) -> torch.Tensor:
    """1 at or below the competence, 0 past competence + ramp (linear in between), floored at min_weight."""
    if ramp > 0:
        w = (1.0 - (difficulty - competence_value) / ramp).clamp(0.0, 1.0)
    else:
        w = (difficulty <= competence_value).to(difficulty.dtype)
    return min_weight + (1.0 - min_weight) * w


# ----------------------------------------------------------------------------- teacher entropy

def _chunk_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, fp32) of softmax(logits) per row; -inf logits (masked ids) contribute 0."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    log_p = x - lse
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, 0.0).sum(-1)


def _rows_per_chunk(vocab: int, max_chunk_bytes: int) -> int:
    return max(1, max_chunk_bytes // max(1, 16 * vocab))


@torch.no_grad()
def token_entropy(logits: torch.Tensor, *, max_chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """[..., V] logits -> [...] fp32 entropy per token, computed in row chunks (bounded fp32 temporaries)."""
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    step = _rows_per_chunk(vocab, max_chunk_bytes)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = _chunk_entropy(rows[start:start + step])
    return out.reshape(logits.shape[:-1])


@torch.no_grad()
def token_entropy_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                              max_chunk_bytes: int = 64 * 2**20,
                              transform: tuple[float, Optional[float]] = (1.0, None)) -> torch.Tensor:
    """Entropy of softmax(hidden @ weight.T + bias) per token without materializing the [N, V] logits;
    transform: the model's (logit scale, softcap) (distillkit.core.lm_head.logit_transform)."""
    vocab = weight.shape[0]
    rows = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)
    step = _rows_per_chunk(vocab, max_chunk_bytes)
    for start in range(0, rows.shape[0], step):
        chunk = torch.nn.functional.linear(rows[start:start + step], weight, bias)
        out[start:start + step] = _chunk_entropy(transform_logits(chunk, transform[0], transform[1] or 0.0))
    return out.reshape(hidden.shape[:-1])


def mean_over_mask(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] values, [B, L] bool mask -> [B] mean over the masked positions (0 for an empty row)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1)


# ----------------------------------------------------------------------------- the curriculum

class CompetenceCurriculum:
    """Per-sample weights for a batch at a training step.

    reference: sorted complexity scores of the training set (see reference_scores), or None to
    normalize by config.max_complexity.
    """

    def __init__(self, config: CurriculumConfig, reference: Optional[torch.Tensor] = None):
        if reference is None and config.max_complexity is None:
            raise ValueError("the curriculum needs reference complexity scores (a map-style training dataset whose "
                             "examples have 'span_ids') or curriculum.max_complexity")
        self.config = config
        self.reference = None if reference is None else torch.sort(reference.float().flatten()).values
        if self.reference is not None and self.reference.numel() == 0:
            raise ValueError("the curriculum's reference scores are empty (an empty training dataset?)")

    @property
    def needs_entropy(self) -> bool:
        return self.config.entropy_weight > 0

    def difficulty(self, scores: torch.Tensor, entropy: Optional[torch.Tensor] = None,
                   vocab_size: Optional[int] = None) -> torch.Tensor:
        """[B] complexity (and optional [B] mean teacher entropy in nats) -> [B] difficulty in [0, 1]."""
        scores = scores.float()
        if self.reference is not None:
            ref = self.reference.to(scores.device)
            static = torch.searchsorted(ref, scores, side="left").float() / ref.numel()
        else:
            static = (scores / self.config.max_complexity).clamp(0.0, 1.0)
        alpha = self.config.entropy_weight
        if alpha == 0 or entropy is None:
            return static
        if vocab_size is None or vocab_size < 2:
            raise ValueError("vocab_size (>= 2) is needed to normalize the teacher entropy")
        normalized = (entropy.float() / math.log(vocab_size)).clamp(0.0, 1.0).to(static.device)
        return (1 - alpha) * static + alpha * normalized

    def competence(self, step: float, total_steps: float) -> float:
        c = self.config
        return competence(step, total_steps, initial=c.initial_competence, warmup=c.warmup, schedule=c.schedule)

    def weights(self, span_ids: torch.Tensor, step: float, total_steps: float, *,
                entropy: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """([B] fp32 sample weights, {"competence": c}) for span_ids [B, L] at `step` of `total_steps`."""
        scores = complexity_scores(span_ids, self.config.measure)
        difficulty = self.difficulty(scores, entropy, vocab_size)
        c = self.competence(step, total_steps)
        w = weights_from_difficulty(difficulty, c, ramp=self.config.ramp, min_weight=self.config.min_weight)
        return w, {"competence": c}
