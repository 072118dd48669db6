"""On-policy distillation for `DistillationTrainer` (`loss.on_policy`, docs/TRAINER.md "On-policy distillation").

With probability `fraction` per optimizer step, every micro-batch of the step is replaced by the student's own
continuation of its prompts: the student samples (batched, KV cache, no gradient, eval mode), the teacher then
scores the student's tokens in the ordinary loss, which on these batches is the configured divergence (reverse KL
is the usual choice: mode-seeking, as in GKD and MiniLLM) with weight 1 on every generated span and no CE. The
trainer's hooks: `get_batch_samples` (decide, generate, recount num_items_in_batch exactly as transformers does),
`compute_loss` (`on_policy_loss`: the on-policy span table while the batch is a generated one) and `log`.

A rollout is any `fn(model, prompts, config) -> [(token_ids, span_ids), ...]`: for each prompt (a list of token
ids) the full sequence (the prompt, then what was generated, including any tool observations an agent loop
inserted) and one `distillkit.core.spans.Span` id per token. Tokens of PROMPT and OBSERVATION spans are context
only; the others are trained. `ContinuationRollout` (the default) is the plain continuation.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..core.modules import SpanDistillationLoss
from ..core.spans import NUM_SPANS, PAD_SPAN, SPAN_NAMES, Span
from .coerce import ConfigError, coerce_fields

__all__ = ["OnPolicyConfig", "OnPolicy", "ContinuationRollout", "Rollout", "ON_POLICY", "TRAINED_SPANS",
           "sample_continuations", "prompts_of", "rollout_batch", "on_policy_loss", "with_on_policy_loss",
           "make_on_policy", "parameters_sharded_by"]

ON_POLICY = "on_policy"  # the batch key marking a generated batch (True)
TRAINED_SPANS = (Span.REASON, Span.ACTION, Span.ANSWER)  # generated spans; PROMPT / OBSERVATION are context
Rollout = Callable[[nn.Module, list, "OnPolicyConfig"], Sequence[tuple[Sequence[int], Sequence[int]]]]


@dataclass
class OnPolicyConfig:
    """`loss.on_policy`: fraction (probability that an optimizer step is on-policy; 0 = never), max_new_tokens
    (per prompt), temperature (sampling temperature; 0 = greedy), span (the span name given to generated tokens
    by the default rollout: reason, action or answer)."""

    fraction: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    span: str = "answer"

    def __post_init__(self):
        for key, value in coerce_fields(OnPolicyConfig, asdict(self)).items():
            setattr(self, key, value)
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"must be in [0, 1]; got {self.fraction}", key="fraction")
        if self.max_new_tokens < 1:
            raise ConfigError(f"must be >= 1; got {self.max_new_tokens}", key="max_new_tokens")
        if not 0.0 <= self.temperature < float("inf"):
            raise ConfigError(f"must be >= 0 (0 = greedy); got {self.temperature}", key="temperature")
        trained = [s.name.lower() for s in TRAINED_SPANS]
        if self.span.lower() not in trained:
            raise ConfigError(f"must be one of {trained}; got {self.span!r}", key="span")
        self.span = self.span.lower()

    @property
    def span_id(self) -> int:
        return SPAN_NAMES.index(self.span)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "OnPolicyConfig":
        return cls(**coerce_fields(cls, values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- generation


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


@torch.no_grad()
def sample_continuations(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         temperature: float, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                         vocab_size: Optional[int] = None) -> list[list[int]]:
    """Batched sampling from softmax(logits / temperature) (argmax at 0) with the model's KV cache: the prompts
    left-padded (position ids from the attention mask), at most max_new_tokens per prompt, a row stops after its
    first eos (included). vocab_size: sample among the first ids only (a teacher with a smaller vocabulary).
    Returns the generated ids per prompt. The caller chooses the mode (eval) and the RNG state."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    if width == 0:
        raise ValueError("on-policy generation needs a non-empty prompt per row")
    ids = torch.full((len(prompts), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_key = "cache" if _accepts(model, "cache") else "past_key_values"  # transformers >= 5.x: cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    eos = torch.as_tensor(sorted(set(int(e) for e in eos_token_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps, next_pos = [], positions[:, -1:]
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits = logits[:, :vocab_size]
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(1)
        token = torch.where(finished, torch.full_like(token, -1), token)  # -1: the row had stopped
        steps.append(token)
        finished = finished | torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        next_pos = next_pos + 1
        cache = getattr(out, "cache", None)
        cache = getattr(out, "past_key_values", None) if cache is None else cache
        out = model(input_ids=token.clamp_min(0)[:, None], attention_mask=mask, position_ids=next_pos,
                    use_cache=True, **{cache_key: cache})
    generated = torch.stack(steps, dim=1).tolist()
    return [[t for t in row if t >= 0] for row in generated]


class ContinuationRollout:
    """The default rollout: each prompt continued by the model (sample_continuations), the generated tokens in
    span `config.span`, the prompt in PROMPT."""

    def __init__(self, pad_token_id: int, eos_token_ids: Sequence[int] = (), vocab_size: Optional[int] = None):
        self.pad_token_id, self.eos_token_ids, self.vocab_size = int(pad_token_id), list(eos_token_ids), vocab_size

    def __call__(self, model: nn.Module, prompts: list[list[int]], config: OnPolicyConfig):
        generated = sample_continuations(model, prompts, max_new_tokens=config.max_new_tokens,
                                         temperature=config.temperature, eos_token_ids=self.eos_token_ids,
                                         pad_token_id=self.pad_token_id, vocab_size=self.vocab_size)
        return [(list(p) + g, [int(Span.PROMPT)] * len(p) + [config.span_id] * len(g))
                for p, g in zip(prompts, generated)]


# ---------------------------------------------------------------------------------------------- batches


def prompts_of(batch: Mapping[str, torch.Tensor], ignore_index: int = -100) -> list[list[int]]:
    """Per row: the real tokens (attention_mask, either padding side) before the first labelled position (the
    completion start; at least the first token). A row without labels is a prompt as a whole."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
    prompts = []
    for row in range(ids.shape[0]):
        real = mask[row].nonzero().flatten()
        labelled = ((labels[row] != ignore_index) & mask[row]).nonzero().flatten()
        if len(real) == 0:
            raise ValueError(f"row {row} of the batch has no token (attention_mask all 0)")
        end = max(int(labelled[0]), int(real[0]) + 1) if len(labelled) else ids.shape[1]
        keep = real[real < end]
        prompts.append(ids[row, keep].tolist())
    return prompts


def rollout_batch(rollouts: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                  ignore_index: int = -100, device=None) -> dict[str, Any]:
    """A right-padded batch (as DistillationCollator pads) from the rollouts: labels = the token on trained spans
    (REASON/ACTION/ANSWER), ignore_index on PROMPT/OBSERVATION and padding; marked ON_POLICY."""
    rows = []
    for i, (ids, spans) in enumerate(rollouts):
        ids, spans = [int(t) for t in ids], [int(s) for s in spans]
        if len(ids) != len(spans) or not ids:
            raise ValueError(f"rollout {i}: {len(ids)} token ids and {len(spans)} span ids (one span id per token, "
                             f"at least one token)")
        if any(not 0 <= s < NUM_SPANS for s in spans):
            raise ValueError(f"rollout {i}: span ids must be distillkit.core.spans.Span values; "
                             f"got {sorted(set(spans))}")
        rows.append((ids, spans))
    width = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": torch.full((len(rows), width), int(pad_token_id), dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "labels": torch.full((len(rows), width), ignore_index, dtype=torch.long),
             "span_ids": torch.full((len(rows), width), PAD_SPAN, dtype=torch.long)}
    trained = torch.tensor([int(s) for s in TRAINED_SPANS])
    for row, (ids, spans) in enumerate(rows):
        ids_t, spans_t = torch.tensor(ids), torch.tensor(spans)
        batch["input_ids"][row, :len(ids)] = ids_t
        batch["attention_mask"][row, :len(ids)] = 1
        batch["span_ids"][row, :len(ids)] = spans_t
        batch["labels"][row, :len(ids)] = torch.where(torch.isin(spans_t, trained), ids_t, ignore_index)
    batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
    batch[ON_POLICY] = True
    return batch


# ---------------------------------------------------------------------------------------------- trainer side


def _eos_ids(model: nn.Module, processing_class) -> list[int]:
    found = []
    for source in (processing_class, getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        found.extend(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return sorted(set(int(v) for v in found))


def _vocab(model: nn.Module) -> Optional[int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def parameters_sharded_by(trainer, model: nn.Module) -> Optional[str]:
    """How the student's parameters are sharded across processes (FSDP or DeepSpeed ZeRO-3 through the
    Trainer, FSDP2 / DTensor by hand), or None: the default rollout cannot generate under any of them (each
    process would run its own number of decode steps, and the gathers inside the forward are collectives)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP, from TrainingArguments.fsdp"
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    if getattr(trainer, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", None) == 3:
        return "DeepSpeed ZeRO-3"
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor, Shard

        for name, param in model.named_parameters():
            if isinstance(param, DTensor) and param.device_mesh.size() > 1 \
                    and any(isinstance(p, Shard) for p in param.placements):
                return f"FSDP2 / DTensor: parameter {name!r} is sharded over {param.device_mesh.size()} processes"
    return None


class OnPolicy:
    """The trainer's on-policy state: the decision per optimizer step, the rollout, the on-policy loss table, the
    logging counters (kept in the trainer's logging window, so they are summed over processes)."""

    def __init__(self, trainer, config: OnPolicyConfig, rollout: Optional[Rollout], pad_token_id: Optional[int]):
        cfg = trainer.distill_config
        self.config = config
        if pad_token_id is None:
            raise ValueError("on-policy distillation needs a pad token id (processing_class or model config)")
        self.pad_token_id = int(pad_token_id)
        if rollout is None:
            student = trainer._unwrap(trainer.model)
            sharding = parameters_sharded_by(trainer, student)
            if sharding is not None:
                raise ValueError(
                    f"loss.on_policy: the default rollout generates with the student on each process on its own, "
                    f"which needs its whole parameters, but they are sharded across processes here ({sharding}). "
                    "Train with DDP, or pass on_policy_rollout= a rollout that generates under this sharding.")
            vocabs = [v for v in (_vocab(student), _vocab(trainer.teacher_model)) if v is not None]
            rollout = ContinuationRollout(self.pad_token_id, _eos_ids(student, trainer.processing_class),
                                          min(vocabs) if vocabs else None)
        self.rollout = rollout
        # Generated spans: the divergence with weight 1, no CE (CE on the student's own samples reinforces them).
        self.loss_fn = SpanDistillationLoss(
            {int(s): (1.0, 0.0) for s in TRAINED_SPANS}, cfg.divergence, beta=cfg.beta, skew=cfg.skew,
            alpha_beta=cfg.alpha_beta, temperature=cfg.temperature, temperature_scaling=cfg.temperature_scaling,
            ignore_index=cfg.ignore_index, reduction="mean", backend=cfg.backend, check_labels=cfg.check_labels,
            vocab_mismatch=cfg.vocab_mismatch).to(trainer.args.device)

    def is_on_policy_step(self, seed: int, step: int) -> bool:
        """Bernoulli(fraction) from a Random seeded by (seed, step): the same on every rank and on resume."""
        fraction = self.config.fraction
        if fraction <= 0:
            return False
        return fraction >= 1 or random.Random(f"distillkit.on_policy:{seed}:{step}").random() < fraction

    def replace_batches(self, trainer, batches: list) -> bool:
        """get_batch_samples' hook: on an on-policy step, every micro-batch replaced (in place) by its rollout."""
        on = bool(batches) and self.is_on_policy_step(trainer.args.seed, trainer.state.global_step)
        generated = 0
        if on:
            ignore = trainer.distill_config.ignore_index
            model = trainer._unwrap(trainer.model)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for i, batch in enumerate(batches):
                        device = batch["input_ids"].device
                        prompts = prompts_of(batch, ignore)
                        rollouts = list(self.rollout(model, prompts, self.config))
                        if len(rollouts) != len(prompts):
                            raise ValueError(f"the on-policy rollout returned {len(rollouts)} sequences for "
                                             f"{len(prompts)} prompts (one (token_ids, span_ids) per prompt)")
                        batches[i] = rollout_batch(rollouts, self.pad_token_id, ignore, device)
                        generated += int((batches[i]["labels"] != ignore).sum())
            finally:
                model.train(was_training)
        trainer._record({"on_policy/generated_tokens": torch.tensor(float(generated)),
                         "on_policy/steps": torch.tensor(1.0), "on_policy/on_policy_steps": torch.tensor(float(on))})
        return on

    @staticmethod
    def window_logs(sums: Mapping[str, float]) -> dict[str, float]:
        """on_policy/generated_tokens, on_policy/fraction and on_policy/kl/<span> (per-token means) of a window."""
        logs = {}
        if sums.get("on_policy/steps"):
            logs["on_policy/generated_tokens"] = sums.get("on_policy/generated_tokens", 0.0)
            logs["on_policy/fraction"] = sums.get("on_policy/on_policy_steps", 0.0) / sums["on_policy/steps"]
        for name in SPAN_NAMES:
            count = sums.get(f"on_policy/tokens/{name}", 0.0)
            if f"on_policy/kl/{name}" in sums and count > 0:
                logs[f"on_policy/kl/{name}"] = sums[f"on_policy/kl/{name}"] / count
        return logs


@contextlib.contextmanager
def on_policy_loss(trainer, inputs: Mapping[str, Any]):
    """compute_loss' hook: on a generated batch, the trainer's loss runs with the on-policy span table (no
    curriculum, no learnable weights) and its components are logged as on_policy/kl/<span>."""
    state: Optional[OnPolicy] = getattr(trainer, "on_policy", None)
    if state is None or not inputs.get(ON_POLICY, False):
        yield
        return
    saved = (trainer.loss_fn, trainer._uses_kl, trainer._uses_ce, trainer.curriculum, trainer._window)
    trainer.loss_fn, trainer._uses_kl, trainer._uses_ce, trainer.curriculum = state.loss_fn, True, False, None
    trainer._window = {}
    try:
        yield
    finally:
        recorded = trainer._window
        trainer.loss_fn, trainer._uses_kl, trainer._uses_ce, trainer.curriculum, trainer._window = saved
        trainer._record({f"on_policy/{key}": value for key, value in recorded.items()})


def with_on_policy_loss(compute_loss):
    """Decorates DistillationTrainer.compute_loss: generated batches run under on_policy_loss."""
    @functools.wraps(compute_loss)
    def wrapped(trainer, model, inputs, *args, **kwargs):
        with on_policy_loss(trainer, inputs):
            return compute_loss(trainer, model, inputs, *args, **kwargs)
    return wrapped


def make_on_policy(trainer, rollout: Optional[Rollout]) -> Optional[OnPolicy]:
    """The trainer's OnPolicy, or None without distill_config.on_policy."""
    config = trainer.distill_config.on_policy
    if config is None:
        if rollout is not None:
            raise ValueError("on_policy_rollout needs distill_config.on_policy (its fraction, max_new_tokens, ...)")
        return None
    if trainer.teacher_cache is not None:
        raise ValueError("on-policy distillation needs teacher_model: a teacher cache holds the training set's "
                         "tokens only, not the student's samples")
    if rollout is not None and not callable(rollout):
        raise TypeError(f"on_policy_rollout must be callable (model, prompts, config); got {type(rollout).__name__}")
    pad = getattr(trainer.processing_class, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(trainer._unwrap(trainer.model), "config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(trainer.data_collator, "pad_token_id", None)
    return OnPolicy(trainer, config, rollout, pad)
