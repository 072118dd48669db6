"""Every entry point spells its options out (so that editors and help() show them), and the same
keyword means the same thing everywhere: one default per shared keyword, and the oracle's signature
is the fused loss's."""

from __future__ import annotations

import inspect

import distillkit
from distillkit.core import divergences, reference
from distillkit.parallel import api as parallel
from distillkit.sparse.fused_linear_topk import fused_linear_distill_loss_topk
from distillkit.training.config import DistillationConfig

ENTRY_POINTS = {
    "distill_loss": distillkit.distill_loss,
    "loss_terms": distillkit.loss_terms,
    "reference.distill_loss": reference.distill_loss,
    "distill_loss_vocab_parallel": parallel.distill_loss_vocab_parallel,
    "vocab_parallel_loss_terms": parallel.vocab_parallel_loss_terms,
    "fused_linear_distill_loss": distillkit.fused_linear_distill_loss,
    "distill_loss_topk": distillkit.distill_loss_topk,
    "fused_linear_distill_loss_topk": fused_linear_distill_loss_topk,
    "DistillationLoss": distillkit.DistillationLoss.__init__,
    "SpanDistillationLoss": distillkit.SpanDistillationLoss.__init__,
}


def _defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_shared_keywords_have_one_default():
    seen: dict[str, tuple[str, object]] = {}
    for entry, fn in ENTRY_POINTS.items():
        for name, default in _defaults(fn).items():
            if name in seen:
                first, value = seen[name]
                assert default == value, f"{name}: {first} defaults to {value!r}, {entry} to {default!r}"
            else:
                seen[name] = (entry, default)


def test_divergence_options_have_the_registry_defaults():
    options = divergences.Options()
    for entry, fn in ENTRY_POINTS.items():
        defaults = _defaults(fn)
        for field in ("beta", "skew", "alpha_beta"):
            if field in defaults:
                assert defaults[field] == getattr(options, field), (entry, field)
    config = DistillationConfig()
    assert (config.beta, config.skew, config.alpha_beta) == (options.beta, options.skew, options.alpha_beta)


def test_the_oracle_takes_the_fused_loss_arguments():
    fused = inspect.signature(distillkit.distill_loss).parameters
    oracle = inspect.signature(reference.distill_loss).parameters
    assert set(fused) - set(oracle) == {"process_group", "vocab_start"}
    assert set(oracle) == set(fused) - {"process_group", "vocab_start"}


def test_the_vocabulary_parallel_loss_takes_the_fused_loss_arguments():
    fused = set(inspect.signature(distillkit.distill_loss).parameters)
    assert set(inspect.signature(parallel.distill_loss_vocab_parallel).parameters) == (
        fused - {"student_logits", "teacher_logits"}) | {"student_shard", "teacher_shard"}
    terms = set(inspect.signature(distillkit.loss_terms).parameters)
    assert set(inspect.signature(parallel.vocab_parallel_loss_terms).parameters) == (
        terms - {"student_logits", "teacher_logits"}) | {"student_shard", "teacher_shard", "process_group",
                                                         "vocab_start"}


def test_the_logits_free_top_k_loss_takes_the_top_k_arguments():
    logits = inspect.signature(distillkit.distill_loss_topk).parameters
    fused = inspect.signature(fused_linear_distill_loss_topk).parameters
    head = {"student_hidden", "student_weight", "student_bias", "chunk_size", "max_chunk_bytes", "grad_weight_fp32",
            "compact_rows"}
    assert set(fused) - head == set(logits) - {"student_logits"}
