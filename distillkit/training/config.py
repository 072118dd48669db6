"""`DistillationConfig`: the loss options of a `DistillationTrainer` (and of `distillkit train`'s
`loss:` section). Validated on construction; needs no transformers."""

from __future__ import annotations

import re

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Union

from ..core import _checks
from ..core.modules import _span_index
from ..sparse.topk import TAILS
from .coerce import ConfigError, coerce_fields, coerce_value, field_errors
from .curriculum import CurriculumConfig
from .on_policy import OnPolicyConfig

COMPONENT_MODES = ("auto", "all", "logged_steps", "off")
TOPK_TAILS = ("auto",) + TAILS


def _nested_config(value, cls, key: str):
    """A nested section given as a mapping, built by cls.from_dict with its errors under `key`; None or a cls as it
    is (coerce_fields has already refused any other type, naming the key)."""
    if not isinstance(value, Mapping):
        return value
    try:
        return cls.from_dict(value)
    except ConfigError as exc:
        raise exc.within(key) from None


@dataclass
class DistillationConfig:
    """The loss of a `DistillationTrainer`.

    divergence, temperature, temperature_scaling, beta, skew, alpha_beta: as in `distillkit.distill_loss`.
    span_weights: {span name or id: (kl_weight, ce_weight)}; None = DEFAULT_SPAN_WEIGHTS (KL on reasoning
        and answers, CE on actions, nothing on prompts and observations).
    learnable_span_weights: learn one log-variance per non-zero table entry (uncertainty weighting); the
        parameters join the optimizer (lr span_weight_lr, default the training learning rate, no weight
        decay) and are saved in every checkpoint (distill_loss.safetensors).
    curriculum: a CurriculumConfig (or its dict): per-sample weights from trajectory complexity.
    on_policy: an OnPolicyConfig (or its dict: fraction, max_new_tokens, temperature, span): the share of
        optimizer steps trained on the student's own continuations, scored by the teacher (on_policy.py).
    backend: the fused op's backend. use_logits_free: "auto" (when both models expose a final hidden state
        and a linear LM head), True (required) or False (always logits). chunk_size: token rows per chunk
        of the logits-free op (None: automatic).
    vocab_mismatch: "error" | "truncate" (teacher and student vocabularies of different sizes).
    topk_tail: with a teacher cache, distill_loss_topk's tail; "auto": "student_full" for a sampled cache (an
        unbiased gradient estimate), "bucket" for a top-k cache (keeps the teacher's tail mass).
    log_components: "auto" (every micro-batch on the logits path, where they are free; the micro-batches of
        logged steps on the logits-free path, which computes them with extra passes), "all",
        "logged_steps" or "off".
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    temperature_scaling: bool = True
    beta: float = 0.5
    skew: float = 0.1
    alpha_beta: tuple = (0.5, 0.5)
    span_weights: Optional[dict] = None
    learnable_span_weights: bool = False
    span_weight_lr: Optional[float] = None
    curriculum: Optional[CurriculumConfig] = None
    on_policy: Optional[OnPolicyConfig] = None
    backend: str = "auto"
    use_logits_free: Union[str, bool] = "auto"
    chunk_size: Optional[int] = None
    vocab_mismatch: str = "error"
    ignore_index: int = -100
    check_labels: bool = True
    log_components: str = "auto"
    topk_tail: str = "auto"

    def __post_init__(self):
        # Every field against its type first (YAML's "1e-3" -> 0.001, a quoted 'false' is an error),
        # then the ranges; each failure is a ConfigError naming the field (prefixed "loss." by the CLI).
        for key, value in coerce_fields(DistillationConfig, _init_values(self)).items():
            setattr(self, key, value)
        with field_errors("alpha_beta"):
            if not isinstance(self.alpha_beta, (list, tuple)) or len(self.alpha_beta) != 2:
                raise ValueError(f"must be a pair (alpha, beta); got {self.alpha_beta!r}")
            self.alpha_beta = tuple(coerce_value(v, float, f"alpha_beta[{i}]") for i, v in enumerate(self.alpha_beta))
        for key in ("divergence", "beta", "skew", "alpha_beta", "temperature", "backend"):
            with field_errors(key):
                _checks.check_options(**{**_DEFAULT_OPTIONS, key: getattr(self, key)})
        with field_errors("divergence"):  # the divergence's own constraints on its options
            _checks.check_options(divergence=self.divergence, beta=self.beta, skew=self.skew,
                                  alpha_beta=self.alpha_beta, temperature=self.temperature, reduction="mean",
                                  backend=self.backend)
        self.curriculum = _nested_config(self.curriculum, CurriculumConfig, "curriculum")
        self.on_policy = _nested_config(self.on_policy, OnPolicyConfig, "on_policy")
        if self.span_weights is not None:
            table = {}
            for key, value in dict(self.span_weights).items():
                where = f"span_weights.{key}"
                if isinstance(key, str) and re.fullmatch(r"\d+", key):
                    key = int(key)  # a span id that went through JSON (checkpoint configs)
                with field_errors(where):
                    _span_index(key)
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ConfigError(f"must be a pair (kl_weight, ce_weight); got {value!r}", key=where)
                table[key] = tuple(coerce_value(v, float, f"{where}[{i}]") for i, v in enumerate(value))
            self.span_weights = table
        if isinstance(self.use_logits_free, str):
            mapping = {"auto": "auto", "true": True, "false": False}
            if self.use_logits_free.lower() not in mapping:
                raise ConfigError(f"must be 'auto', true or false; got {self.use_logits_free!r}", key="use_logits_free")
            self.use_logits_free = mapping[self.use_logits_free.lower()]
        if self.log_components not in COMPONENT_MODES:
            raise ConfigError(f"must be one of {COMPONENT_MODES}; got {self.log_components!r}", key="log_components")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"must be >= 1; got {self.chunk_size}", key="chunk_size")
        if self.span_weight_lr is not None and not self.span_weight_lr >= 0:
            raise ConfigError(f"must be >= 0; got {self.span_weight_lr}", key="span_weight_lr")
        if self.topk_tail not in TOPK_TAILS:
            raise ConfigError(f"must be one of {TOPK_TAILS}; got {self.topk_tail!r}", key="topk_tail")
        with field_errors("vocab_mismatch"):
            _checks.check_choice("vocab_mismatch", self.vocab_mismatch, _checks.VOCAB_MISMATCH)

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> "DistillationConfig":
        """From a mapping (the YAML's `loss:` section): unknown keys and ill-typed values raise ConfigError
        with the key."""
        return cls(**coerce_fields(cls, values or {}))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.span_weights is not None:
            out["span_weights"] = {str(k): list(v) for k, v in self.span_weights.items()}
        return out


def _init_values(config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config) if f.init}


# Valid values of every option but one, so that each option is checked on its own and named.
_DEFAULT_OPTIONS = dict(divergence="forward_kl", beta=0.5, skew=0.1, alpha_beta=(0.5, 0.5), temperature=1.0,
                        reduction="mean", backend="auto")

__all__ = ["DistillationConfig", "OnPolicyConfig", "COMPONENT_MODES", "ConfigError"]
