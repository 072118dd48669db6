"""`DistillationConfig`: the loss options of a `DistillationTrainer` (and of `distillkit train`'s
`loss:` section). Validated on construction; needs no transformers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Union

from ..core import _checks
from .curriculum import CurriculumConfig

COMPONENT_MODES = ("auto", "all", "logged_steps", "off")


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
    backend: the fused op's backend. use_logits_free: "auto" (when both models expose a final hidden state
        and a linear LM head), True (required) or False (always logits). chunk_size: token rows per chunk
        of the logits-free op (None: automatic).
    vocab_mismatch: "error" | "truncate" (teacher and student vocabularies of different sizes).
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
    backend: str = "auto"
    use_logits_free: Union[str, bool] = "auto"
    chunk_size: Optional[int] = None
    vocab_mismatch: str = "error"
    ignore_index: int = -100
    check_labels: bool = True
    log_components: str = "auto"

    def __post_init__(self):
        if isinstance(self.alpha_beta, list):  # from YAML or JSON
            self.alpha_beta = tuple(self.alpha_beta)
        _checks.check_options(divergence=self.divergence, beta=self.beta, skew=self.skew, alpha_beta=self.alpha_beta,
                              temperature=float(self.temperature), reduction="mean", backend=self.backend)
        self.temperature = float(self.temperature)
        if isinstance(self.curriculum, Mapping):
            self.curriculum = CurriculumConfig.from_dict(self.curriculum)
        if self.curriculum is not None and not isinstance(self.curriculum, CurriculumConfig):
            raise TypeError(f"curriculum must be a CurriculumConfig or a dict; got {type(self.curriculum).__name__}")
        if self.span_weights is not None:
            table = {}
            for key, value in dict(self.span_weights).items():
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ValueError(f"span_weights[{key!r}] must be a pair (kl_weight, ce_weight); got {value!r}")
                table[key] = (float(value[0]), float(value[1]))
            self.span_weights = table
        if isinstance(self.use_logits_free, str):
            lowered = self.use_logits_free.lower()
            mapping = {"auto": "auto", "true": True, "false": False}
            if lowered not in mapping:
                raise ValueError(f"use_logits_free must be 'auto', True or False; got {self.use_logits_free!r}")
            self.use_logits_free = mapping[lowered]
        elif not isinstance(self.use_logits_free, bool):
            raise ValueError(f"use_logits_free must be 'auto', True or False; got {self.use_logits_free!r}")
        if self.log_components not in COMPONENT_MODES:
            raise ValueError(f"log_components must be one of {COMPONENT_MODES}; got {self.log_components!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {self.chunk_size}")
        if self.span_weight_lr is not None and not self.span_weight_lr >= 0:
            raise ValueError(f"span_weight_lr must be >= 0; got {self.span_weight_lr}")
        _checks.check_choice("vocab_mismatch", self.vocab_mismatch, _checks.VOCAB_MISMATCH)

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> "DistillationConfig":
        return cls(**_checks.known_options(cls, values or {}, "loss"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.span_weights is not None:
            out["span_weights"] = {str(k): list(v) for k, v in self.span_weights.items()}
        return out


__all__ = ["DistillationConfig", "COMPONENT_MODES"]
