"""`DistillationTrainer`: a `transformers.Trainer` that distills a frozen teacher into the student.

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=TrainingArguments(...),
        distill_config=DistillationConfig(divergence="jsd", temperature=2.0,
                                          span_weights={"reason": (1.0, 0.0), "action": (0.0, 1.0)}),
        train_dataset=examples, processing_class=tokenizer)     # examples from distillkit.data
    trainer.train()

Per step: the teacher runs under torch.no_grad in eval mode, the logits (or, when both models
expose their final hidden state and a linear LM head, the hidden states and the head weights) are
shifted for next-token prediction, and the span loss of `SpanDistillationLoss` (or the same loss
through `fused_linear_distill_loss`, never materializing the [tokens x vocabulary] logits) is
normalized by `num_items_in_batch`: micro-batches under gradient accumulation add up to exactly the
loss of the whole batch. Loss components (KL and CE per span type) are logged through `self.log`
at the Trainer's logging steps. See docs/TRAINER.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without the [train] extra
    raise ImportError("distillkit.training.trainer needs transformers: pip install 'distillkit[train]'") from exc

from .curriculum import (CompetenceCurriculum, CurriculumConfig, mean_over_mask, reference_scores, token_entropy,
                         token_entropy_from_hidden)
from ..core.dtensor import gathered_linear, through_fsdp_outputs
from ..core.lm_head import forward_hidden, head_problem, head_reproduces_logits, logit_transform
from ..core.modules import DEFAULT_SPAN_WEIGHTS, SpanDistillationLoss, span_token_weights
from ..core.spans import PAD_SPAN, Span
from .cached_teacher import (CACHE_INDEX, CacheIndexed, cached_teacher_loss, check_cache_config,
                             check_cache_matches, open_teacher_cache, resolve_tail)
from .normalization import loss_normalizer, scale_across_devices
from .checkpoint import CONFIG_NAME, LOSS_STATE_NAME, load_loss_state, save_loss_state
from .components import hidden_state_components, window_logs
from .config import COMPONENT_MODES, DistillationConfig  # noqa: F401  (re-exported)
from .on_policy import OnPolicy, make_on_policy, with_on_policy_loss

try:  # the logits-free op; the trainer falls back to logits without it
    from ..core.fused_linear import fused_linear_distill_loss
except ImportError:  # pragma: no cover
    fused_linear_distill_loss = None

logger = logging.getLogger("distillkit.training.trainer")


def _shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    """x[:, 1:] followed by one `fill` column: position i then holds the target of position i's prediction.
    Shifting the targets (not the logits) leaves the logits / hidden states contiguous and uncopied; the last
    position gets weight 0."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


class DistillationTrainer(Trainer):
    """A Trainer whose loss distills `teacher_model` into the trained model (see the module docstring).

    Extra arguments: teacher_model (frozen here: requires_grad False, eval mode, moved to the training
    device unless it has an hf_device_map) and distill_config (a DistillationConfig or its dict). Without
    data_collator, batches are padded by `distillkit.data.DistillationCollator` (pad id from
    processing_class, else from the model config). Batches need input_ids, labels (aligned with input_ids,
    -100 = ignored) and span_ids; without span_ids, labelled tokens count as ANSWER spans. teacher_cache (a
    directory or TeacherCache) replaces teacher_model: training from the cache alone (cached_teacher.py).
    on_policy_rollout: fn(model, prompts, config) -> [(token_ids, span_ids)], with cfg.on_policy (on_policy.py).
    """

    def __init__(self, model=None, teacher_model: Optional[nn.Module] = None, args=None,
                 distill_config: Union[DistillationConfig, Mapping[str, Any], None] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, teacher_cache=None,
                 on_policy_rollout=None, **kwargs):
        if (teacher_model is None) == (teacher_cache is None):
            raise ValueError("DistillationTrainer needs a teacher_model or a teacher_cache (one of them)")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes its own loss: compute_loss_func is not supported")
        if isinstance(distill_config, Mapping) or distill_config is None:
            distill_config = DistillationConfig.from_dict(distill_config)
        self.distill_config: DistillationConfig = distill_config
        self.teacher_cache = self.topk_tail = None
        if teacher_cache is not None:
            self.teacher_cache = open_teacher_cache(teacher_cache)
            check_cache_config(distill_config)
            self.topk_tail = resolve_tail(distill_config, self.teacher_cache)
            if eval_dataset is not None:
                raise ValueError("evaluation needs the teacher's distribution on eval_dataset, which a teacher cache "
                                 "of the training set does not hold: drop eval_dataset or pass teacher_model")
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
            check_cache_matches(self.teacher_cache, train_dataset, vocab)
            train_dataset = CacheIndexed(train_dataset)
        if data_collator is None:
            data_collator = self._default_collator(model, processing_class)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # compute_loss normalizes by num_items_in_batch: have the Trainer count it and not rescale the loss.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True  # the count is taken over labels[..., 1:] (next-token targets)

        cfg = self.distill_config
        self.teacher_model = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        self.loss_fn = SpanDistillationLoss(
            cfg.span_weights, cfg.divergence, learnable=cfg.learnable_span_weights, beta=cfg.beta, skew=cfg.skew,
            alpha_beta=cfg.alpha_beta, temperature=cfg.temperature, temperature_scaling=cfg.temperature_scaling,
            ignore_index=cfg.ignore_index, reduction="mean", backend=cfg.backend, check_labels=cfg.check_labels,
            vocab_mismatch=cfg.vocab_mismatch).to(self.args.device)
        table = self.loss_fn.weight_table
        self._uses_kl = bool((table[:, 0] != 0).any())
        self._uses_ce = bool((table[:, 1] != 0).any())
        self.on_policy: Optional[OnPolicy] = make_on_policy(self, on_policy_rollout)  # None without cfg.on_policy
        self.curriculum: Optional[CompetenceCurriculum] = None
        if cfg.curriculum is not None:
            self.curriculum = CompetenceCurriculum(cfg.curriculum, self._curriculum_reference(train_dataset))
        self._logits_free: Optional[bool] = None  # resolved on the first training step
        self._head_verified: set[int] = set()
        self.last_path: Optional[str] = None  # "logits_free" | "logits", for inspection
        self._window: dict[str, torch.Tensor] = {}  # logged quantities summed since the last log
        self._last_competence: Optional[float] = None

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _default_collator(model, processing_class):
        from ..data import DistillationCollator
        if processing_class is not None and getattr(processing_class, "pad_token_id", None) is not None:
            return DistillationCollator.from_tokenizer(processing_class)
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if pad is None:
            raise ValueError("no data_collator and no pad token: pass processing_class with a pad token, "
                             "a model config with pad_token_id, or a data_collator")
        return DistillationCollator(pad)

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.requires_grad_(False)
        teacher.eval()
        if not getattr(teacher, "hf_device_map", None):  # a dispatched (device_map) teacher stays where it is
            teacher.to(self.args.device)
        return teacher

    def _curriculum_reference(self, dataset) -> Optional[torch.Tensor]:
        measure = self.distill_config.curriculum.measure
        try:
            length = len(dataset)
            first = dataset[0] if length else None
        except (TypeError, KeyError, IndexError, NotImplementedError):
            first = None
        if first is None or not isinstance(first, Mapping) or "span_ids" not in first:
            return None  # CompetenceCurriculum then needs max_complexity
        return reference_scores((dataset[i] for i in range(length)), measure)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in ("span_ids", CACHE_INDEX):  # keep them through remove_unused_columns
            if self._signature_columns is not None and column not in self._signature_columns:
                self._signature_columns.append(column)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        log_vars = self.loss_fn.log_vars
        if log_vars is not None:
            present = any(p is log_vars for group in optimizer.param_groups for p in group["params"])
            if not present:
                lr = self.distill_config.span_weight_lr
                optimizer.add_param_group({"params": [log_vars], "weight_decay": 0.0,
                                           "lr": self.args.learning_rate if lr is None else lr})
                # The Trainer zeroes only the model's gradients; all-reduce (data parallel) before the step
                # and zero after it, so the span weights see exactly one optimizer step's gradient.
                optimizer.register_step_pre_hook(lambda *_: self._sync_span_weight_grads())
                optimizer.register_step_post_hook(lambda *_: self.loss_fn.zero_grad(set_to_none=True))
        return optimizer

    def _sync_span_weight_grads(self):
        grad = self.loss_fn.log_vars.grad
        if grad is None or self.accelerator.num_processes <= 1:
            return
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad /= self.accelerator.num_processes

    # ------------------------------------------------------------------ checkpoints (safetensors only)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            self.save_distill_state(output_dir if output_dir is not None else self.args.output_dir)

    def save_distill_state(self, output_dir: str) -> None:
        """Write the span weight table (and learned log-variances) as safetensors, the config as JSON."""
        save_loss_state(self.loss_fn, self.distill_config, output_dir)

    def load_distill_state(self, checkpoint: str) -> bool:
        """Restore the learned span weights from `checkpoint` (safetensors; nothing is unpickled)."""
        return load_loss_state(self.loss_fn, checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on every resume path (plain, FSDP, DeepSpeed), after the optimizer exists: restore the span
        # weights in place so that the optimizer's state keeps pointing at the same parameter.
        if checkpoint is not None:
            self.load_distill_state(checkpoint)
        return super()._load_optimizer_and_scheduler(checkpoint)

    # ------------------------------------------------------------------ model plumbing

    def _unwrap(self, model: nn.Module) -> nn.Module:
        model = self.accelerator.unwrap_model(model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        return model

    def uses_logits_free(self, model: Optional[nn.Module] = None) -> bool:
        """Whether the loss runs on hidden states + LM-head weights (resolved once, from both models)."""
        if self._logits_free is None:
            mode = self.distill_config.use_logits_free
            if mode is False:
                self._logits_free = False
            else:
                problems = []
                if fused_linear_distill_loss is None:
                    problems.append("distillkit.core.fused_linear is not available")
                student = self._unwrap(model if model is not None else self.model)
                models = [("student", student)]
                if self.teacher_model is not None:  # a cached teacher has no head
                    models.append(("teacher", self._unwrap(self.teacher_model)))
                for name, m in models:
                    problem = head_problem(m)
                    if problem:
                        problems.append(f"{name}: {problem}")
                if not problems and self.teacher_model is not None:
                    student_w = student.get_output_embeddings().weight
                    teacher_w = models[1][1].get_output_embeddings().weight
                    if student_w.device != teacher_w.device:
                        problems.append(f"the LM heads are on different devices ({student_w.device}, "
                                        f"{teacher_w.device})")
                if problems and mode is True:
                    raise ValueError("use_logits_free=True but " + "; ".join(problems))
                if problems:
                    logger.info("logits-free loss not used: %s", "; ".join(problems))
                self._logits_free = not problems
        return self._logits_free

    def _forward_hidden(self, model: nn.Module, kwargs: dict):
        hidden, head, outputs = forward_hidden(model, self._unwrap(model), kwargs)
        # FSDP2: the root's pre-backward hook hangs on its outputs (core/dtensor.py, through_fsdp_outputs).
        return through_fsdp_outputs(model, hidden, getattr(outputs, "logits", None)), head, outputs

    def _verify_head(self, model: nn.Module, hidden: torch.Tensor, head: nn.Linear, outputs) -> bool:
        """Once per model: head(hidden) reproduces the model's own logits (lm_head.head_reproduces_logits)."""
        key = id(self._unwrap(model))
        transform = logit_transform(self._unwrap(model))
        if key not in self._head_verified and head_reproduces_logits(hidden, gathered_linear(head), outputs, transform):
            self._head_verified.add(key)
        return key in self._head_verified

    # ------------------------------------------------------------------ the loss

    def _token_weights(self, spans: torch.Tensor, sample_weight: Optional[torch.Tensor]):
        """Per-token (kl_weight, ce_weight) from the span table, exactly as SpanDistillationLoss builds them."""
        per_token = span_token_weights(self.loss_fn.effective_table().to(spans.device), spans,
                                       check=self.distill_config.check_labels)
        if sample_weight is not None:
            per_token = per_token * sample_weight.reshape(-1, 1, 1).to(per_token.dtype)
        kl = per_token[..., 0] if self._uses_kl else 0.0
        ce = per_token[..., 1] if self._uses_ce else 0.0
        return kl, ce

    def _weighted_positions(self, spans: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: target positions whose span has a non-zero KL or CE weight in the table."""
        # Unchecked: the loss checks the same span ids; padding weighs 0.
        per_token = span_token_weights(self.loss_fn.weight_table.to(spans.device), spans, check=False)
        return (per_token != 0).any(-1)

    def _default_span_ids(self, labels, attention_mask):
        spans = torch.where(labels != self.distill_config.ignore_index, int(Span.ANSWER), int(Span.PROMPT))
        if attention_mask is not None:
            spans = torch.where(attention_mask.bool(), spans, PAD_SPAN)
        return spans

    def _is_logged_step(self) -> bool:
        args, state = self.args, self.state
        strategy = getattr(args.logging_strategy, "value", args.logging_strategy)
        if strategy != "steps":
            return strategy != "no"
        upcoming = state.global_step + 1
        every = state.logging_steps or args.logging_steps
        every = max(int(math.ceil(state.max_steps * every)), 1) if every < 1 else int(every)
        return (args.logging_first_step and upcoming == 1) or upcoming % every == 0 or upcoming >= state.max_steps

    def _record(self, values: Mapping[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            previous = self._window.get(key)
            self._window[key] = value if previous is None else previous + value.to(previous.device)

    def _curriculum_weights(self, span_ids, entropy_fn, vocab_size):
        entropy = entropy_fn() if self.curriculum.needs_entropy else None
        weights, info = self.curriculum.weights(span_ids, self.state.global_step, max(self.state.max_steps, 1),
                                                entropy=entropy, vocab_size=vocab_size)
        self._last_competence = info["competence"]
        self._record({"curriculum/weight_sum": weights.sum(), "curriculum/samples": torch.tensor(weights.numel())})
        return weights.to(span_ids.device)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.on_policy is not None and self.on_policy.replace_batches(self, batches):  # generated in place:
            num_items = self._get_num_items_in_batch(batches, device)  # recounted as transformers counts them
        return batches, num_items

    @with_on_policy_loss  # a generated batch: the on-policy span table (on_policy.py)
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.distill_config
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        attention_mask = inputs.get("attention_mask")
        span_ids = inputs.get("span_ids")
        if span_ids is None:
            span_ids = self._default_span_ids(labels, attention_mask)
        targets = _shift_left(labels, cfg.ignore_index)
        target_spans = _shift_left(span_ids, PAD_SPAN)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "position_ids" in inputs:
            kwargs["position_ids"] = inputs["position_ids"]
        training = model.training
        if self.teacher_cache is not None:
            return self._cached_teacher_loss(model, inputs, kwargs, targets, span_ids, target_spans,
                                             num_items_in_batch, return_outputs)
        if self.teacher_model.training:
            self.teacher_model.eval()
        wants_entropy = training and self.curriculum is not None and self.curriculum.needs_entropy
        need_teacher = self._uses_kl or wants_entropy

        logits_free = not return_outputs and self.uses_logits_free(model)
        outputs = None
        if logits_free:
            hidden, head, outputs = self._forward_hidden(model, kwargs)
            t_hidden = t_head = None
            if need_teacher:
                with torch.no_grad():
                    t_hidden, t_head, t_outputs = self._forward_hidden(self.teacher_model, kwargs)
                    t_head = gathered_linear(t_head)  # a DTensor head (FSDP2) gathered once per step
            verified = self._verify_head(model, hidden, head, outputs) and (
                t_hidden is None or self._verify_head(self.teacher_model, t_hidden, t_head, t_outputs))
            if not verified:
                if cfg.use_logits_free is True:
                    raise RuntimeError("use_logits_free=True but the LM head applied to the captured hidden state "
                                       "does not reproduce the model's logits")
                logger.warning("the LM head applied to the captured hidden state does not reproduce the model's "
                               "logits: using the logits op from now on")
                self._logits_free = False
                logits_free = False
        if not logits_free:
            outputs = model(**kwargs)
            teacher_logits = None
            if need_teacher:
                with torch.no_grad():
                    teacher_logits = self.teacher_model(**kwargs).logits.to(outputs.logits.device)
        self.last_path = "logits_free" if logits_free else "logits"

        sample_weight = None
        if training and self.curriculum is not None:
            active_targets = self._weighted_positions(target_spans)
            if logits_free:
                def entropy_fn():
                    ent = token_entropy_from_hidden(t_hidden, t_head.weight, t_head.bias,
                                                    transform=logit_transform(self._unwrap(self.teacher_model)))
                    return mean_over_mask(ent, active_targets)
                vocab = t_head.weight.shape[0] if t_head is not None else None
            else:
                def entropy_fn():
                    return mean_over_mask(token_entropy(teacher_logits), active_targets)
                vocab = teacher_logits.shape[-1] if teacher_logits is not None else None
            sample_weight = self._curriculum_weights(span_ids, entropy_fn, vocab)

        normalizer, reg_scale = loss_normalizer(num_items_in_batch, targets, self.distill_config.ignore_index,
                                                self.loss_fn.log_vars is not None)
        mode = cfg.log_components
        record = training and mode != "off" and (
            mode == "all" or (mode == "auto" and not logits_free) or self._is_logged_step())

        if logits_free:
            kl_weight, ce_weight = self._token_weights(target_spans, sample_weight)
            t_w = t_head.weight if t_head is not None else None
            t_b = t_head.bias if t_head is not None else None
            (s_scale, s_cap), (t_scale, t_cap) = (logit_transform(self._unwrap(m)) for m in (model, self.teacher_model))
            loss = fused_linear_distill_loss(
                hidden, head.weight, t_hidden, t_w, targets, student_bias=head.bias, teacher_bias=t_b,
                divergence=cfg.divergence, beta=cfg.beta, skew=cfg.skew, alpha_beta=cfg.alpha_beta,
                temperature=cfg.temperature,
                temperature_scaling=cfg.temperature_scaling, kl_weight=kl_weight, ce_weight=ce_weight,
                ignore_index=cfg.ignore_index, reduction="mean", normalizer=normalizer, backend=cfg.backend,
                check_labels=cfg.check_labels, vocab_mismatch=cfg.vocab_mismatch, chunk_size=cfg.chunk_size,
                student_logit_scale=s_scale, student_softcap=s_cap, teacher_logit_scale=t_scale, teacher_softcap=t_cap,
                divergence_on_ignored=True)  # span ids decide, exactly as SpanDistillationLoss
            if self.loss_fn.log_vars is not None:
                loss = loss + reg_scale * self.loss_fn.regularizer()
            if record:
                self._record(hidden_state_components(cfg, self.loss_fn, hidden, head, t_hidden, t_head, targets,
                                                     target_spans, (s_scale, s_cap, t_scale, t_cap)))
        else:
            loss = self.loss_fn(outputs.logits, teacher_logits, targets, target_spans, sample_weight=sample_weight,
                                normalizer=normalizer, regularizer_scale=reg_scale)
            if record:
                self._record(self.loss_fn.last_components)

        loss = scale_across_devices(self, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _cached_teacher_loss(self, model, inputs, kwargs, targets, span_ids, target_spans, num_items_in_batch,
                             return_outputs):
        """compute_loss against the teacher cache (cached_teacher.py): no teacher forward."""
        if return_outputs:
            raise ValueError("a teacher cache holds the training set only: evaluation/prediction is not supported")
        logits_free = self.uses_logits_free(model)
        self.last_path = "logits_free" if logits_free else "logits"
        sample_weight = None
        if model.training and self.curriculum is not None:  # without teacher entropy (check_cache_config)
            sample_weight = self._curriculum_weights(span_ids, None, None)
        normalizer, reg_scale = loss_normalizer(num_items_in_batch, targets, self.distill_config.ignore_index,
                                                self.loss_fn.log_vars is not None)
        loss = cached_teacher_loss(self, model, inputs, kwargs, targets, target_spans, sample_weight, normalizer,
                                   logits_free)
        if self.loss_fn.log_vars is not None:
            loss = loss + reg_scale * self.loss_fn.regularizer()
        return scale_across_devices(self, loss, num_items_in_batch)

    # ------------------------------------------------------------------ logging

    def _reduced_window(self) -> dict[str, float]:
        keys = sorted(self._window)
        if not keys:
            return {}
        stacked = torch.stack([self._window[k].to(self.args.device).float().reshape(()) for k in keys])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        return dict(zip(keys, stacked.tolist()))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and not any(key.startswith("eval_") for key in logs):
            sums = self._reduced_window()
            logs.update(window_logs(sums, self.loss_fn, self._last_competence), **OnPolicy.window_logs(sums))
            self._window = {}
        super().log(logs, *args, **kwargs)


__all__ = ["DistillationTrainer", "DistillationConfig", "CurriculumConfig", "DEFAULT_SPAN_WEIGHTS",
           "LOSS_STATE_NAME", "CONFIG_NAME"]
