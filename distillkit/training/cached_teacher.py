"""Training from a teacher cache: `DistillationTrainer(teacher_cache=DIR)` and `teacher: {cache: DIR}`.

The cache (`distillkit cache-teacher`, `distillkit.sparse.write_teacher_cache`) holds, per example of the
training set and per position, the teacher's top-k or sampled log-probabilities. The teacher itself is
never loaded. The training set is matched to the cache by example: same count, same length per
example, same vocabulary (each mismatch is an error naming which). Every example carries its index
(`cache_index`) through the collator, so that shuffled batches read the right rows of the cache.

The loss is `distill_loss_topk` (or, on the logits-free path, `fused_linear_distill_loss_topk`: the
student's [tokens x vocabulary] logits are never materialized) with the span table's per-token
weights, exactly as the dense path weighs `SpanDistillationLoss`'s terms. The per-span components
(kl/<span>, ce/<span>) take extra passes: by default (log_components="auto") on logged steps only.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch

from ..data.collate import CACHE_INDEX
from ..sparse.teacher_cache import TeacherCache, TeacherCacheError
from ..sparse.topk import TOPK_DIVERGENCES
from .coerce import ConfigError

__all__ = ["CACHE_INDEX", "CacheIndexed", "open_teacher_cache", "check_cache_matches", "check_cache_config",
           "resolve_tail", "cached_teacher_loss"]



class CacheIndexed(torch.utils.data.Dataset):
    """`dataset` whose items also carry their index (`cache_index`), to find their rows in the cache."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"example {index} must be a mapping with input_ids; got {type(item).__name__}")
        return {**item, CACHE_INDEX: index}


def open_teacher_cache(cache: Union[str, os.PathLike, TeacherCache]) -> TeacherCache:
    return cache if isinstance(cache, TeacherCache) else TeacherCache(os.fspath(cache))


def check_cache_matches(cache: TeacherCache, dataset, vocab_size: int, *, what: str = "train_dataset") -> None:
    """The cache was written for `dataset` (count, length of every example) and a `vocab_size` vocabulary;
    otherwise a TeacherCacheError naming the mismatch, the first differing example and the cache."""
    if cache.vocab_size != vocab_size:
        raise TeacherCacheError(f"{cache.path}: vocabulary mismatch: the cache has vocab_size {cache.vocab_size}, the "
                                f"student's LM head has {vocab_size} ids")
    if len(dataset) != len(cache):
        raise TeacherCacheError(f"{cache.path}: example count mismatch: the cache has {len(cache)} examples, {what} "
                                f"has {len(dataset)} (was the cache written from the same data and tokenizer?)")
    for index in range(len(dataset)):
        length = len(dataset[index]["input_ids"])
        if length != cache.seq_lengths[index]:
            raise TeacherCacheError(f"{cache.path}: length mismatch at example {index}: {length} tokens in {what}, "
                                    f"{cache.seq_lengths[index]} in the cache (was it written with the same "
                                    f"tokenizer and data options?)")


def check_cache_config(config) -> None:
    """The loss options a cache supports: a top-k divergence and tail, no teacher entropy in the curriculum."""
    if config.divergence not in TOPK_DIVERGENCES:
        raise ConfigError(f"must be one of {TOPK_DIVERGENCES} with a teacher cache (the cache holds the "
                          f"teacher's top-k or sampled log-probabilities only); got {config.divergence!r}",
                          key="divergence")
    if config.curriculum is not None and config.curriculum.entropy_weight > 0:
        raise ConfigError("the teacher's entropy (entropy_weight > 0) is not available from a teacher cache",
                          key="curriculum.entropy_weight")


def resolve_tail(config, cache: TeacherCache) -> str:
    """topk_tail "auto": "student_full" for a sampled cache (its forward-KL gradient is an unbiased estimate of
    the dense one), "bucket" for a top-k cache (it keeps the teacher's tail mass: with "renormalize", the
    student's mass outside the cached ids is free, and where the divergence is the only term, as on
    reasoning spans, the demo's offline student put it on wrong tokens: docs/SPARSE.md)."""
    if config.topk_tail != "auto":
        return config.topk_tail
    return "student_full" if cache.index.get("mode", "topk") == "sample" else "bucket"


def cached_teacher_loss(trainer, model, inputs: Mapping[str, torch.Tensor], kwargs: dict, targets: torch.Tensor,
                        target_spans: torch.Tensor, sample_weight: Optional[torch.Tensor], normalizer,
                        logits_free: bool) -> torch.Tensor:
    """The span-weighted loss of one batch against the cached teacher (its rows for inputs["cache_index"]);
    records the per-span components on the steps that log them."""
    from .components import cached_teacher_components
    from ..sparse.topk import distill_loss_topk
    cfg, cache = trainer.distill_config, trainer.teacher_cache
    if CACHE_INDEX not in inputs:
        raise KeyError(f"the batch has no {CACHE_INDEX!r}: training from a teacher cache needs the examples of "
                       "the train_dataset the trainer was given (wrapped in CacheIndexed)")
    input_ids = inputs["input_ids"]
    rows = cache.batch(inputs[CACHE_INDEX].tolist(), length=input_ids.shape[1])
    ids, logprobs = rows.ids.to(input_ids.device), rows.logprobs.to(input_ids.device)
    kl_weight, ce_weight = trainer._token_weights(target_spans, sample_weight)
    options = dict(tail=trainer.topk_tail, teacher_temperature=cache.temperature, divergence=cfg.divergence,
                   temperature=cfg.temperature, temperature_scaling=cfg.temperature_scaling, kl_weight=kl_weight,
                   ce_weight=ce_weight, ignore_index=cfg.ignore_index, reduction="mean", normalizer=normalizer,
                   backend=cfg.backend, check_labels=cfg.check_labels,
                   divergence_on_ignored=True)  # span ids decide, as on the dense path
    components = dict(tail=trainer.topk_tail, cache_temperature=cache.temperature, ids=ids, logprobs=logprobs,
                      targets=targets, spans=target_spans)
    if logits_free:
        from ..sparse.fused_linear_topk import fused_linear_distill_loss_topk
        hidden, head, _ = trainer._forward_hidden(model, kwargs)
        loss = fused_linear_distill_loss_topk(hidden, head.weight, ids, logprobs, targets, student_bias=head.bias,
                                              chunk_size=cfg.chunk_size, **options)
        components.update(hidden=hidden, head=head)
    else:
        logits = model(**kwargs).logits
        loss = distill_loss_topk(logits, ids, logprobs, targets, **options)
        components.update(logits=logits)
    mode = cfg.log_components  # extra passes on both paths: "auto" means on logged steps
    if model.training and mode != "off" and (mode == "all" or trainer._is_logged_step()):
        trainer._record(cached_teacher_components(cfg, trainer.loss_fn, **components))
    return loss
