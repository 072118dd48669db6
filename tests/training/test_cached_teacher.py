"""Training from a teacher cache: DistillationTrainer(teacher_cache=...) and `teacher: {cache: DIR}`. The
teacher is never loaded; the cache is matched to the dataset by example; with K = V the cached loss is the
dense loss (up to the cache's fp16 log-probabilities)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

from distillkit.sparse.teacher_cache import TeacherCache, TeacherCacheError, write_teacher_cache  # noqa: E402
from distillkit.training import cli as train_cli  # noqa: E402
from distillkit.training.components import cached_teacher_components  # noqa: E402
from distillkit.training.trainer import DistillationConfig, DistillationTrainer  # noqa: E402

from trainer_helpers import (ROOT, SPAN_WEIGHTS, batch_of, make_tiny, models, num_items,  # noqa: E402
                             train_logs, training_args)

EXAMPLES = 12


def _shift(x, fill):
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def hidden_of(trainer, model, batch):
    hidden, _, _ = trainer._forward_hidden(model, {"input_ids": batch["input_ids"],
                                                   "attention_mask": batch["attention_mask"], "use_cache": False})
    return hidden


@pytest.fixture(scope="module")
def cached(workspace, tmp_path_factory):
    """(examples, teacher, top-8 cache dir, full-vocabulary cache dir) over the first EXAMPLES examples."""
    examples = workspace["examples"][:EXAMPLES]
    _, teacher = models(workspace)
    out = tmp_path_factory.mktemp("caches")
    pad = workspace["tokenizer"].pad_token_id
    vocab = len(workspace["tokenizer"])
    write_teacher_cache(str(out / "top8"), teacher, examples, k=8, pad_token_id=pad)
    write_teacher_cache(str(out / "full"), teacher, examples, k=vocab, pad_token_id=pad, dtype="float16")
    return examples, teacher, str(out / "top8"), str(out / "full")


def _trainer(workspace, out, student, *, cache=None, teacher=None, examples, logits_free=False, **args):
    config = DistillationConfig(divergence="forward_kl", span_weights=SPAN_WEIGHTS, use_logits_free=logits_free)
    return DistillationTrainer(model=student, teacher_model=teacher, teacher_cache=cache,
                               args=training_args(out, **args), distill_config=config, train_dataset=examples,
                               processing_class=workspace["tokenizer"])


def test_a_full_vocabulary_cache_gives_the_dense_loss(workspace, cached, tmp_path):
    examples, teacher, _, full = cached
    student, _ = models(workspace)
    dense = _trainer(workspace, tmp_path / "d", student, teacher=teacher, examples=examples)
    from_cache = _trainer(workspace, tmp_path / "c", student, cache=full, examples=examples)
    assert from_cache.teacher_model is None and from_cache.topk_tail == "bucket"
    batch = batch_of(workspace, range(6))
    batch["cache_index"] = torch.arange(6)
    n = num_items(batch)
    with torch.no_grad():
        want = dense.compute_loss(student, {k: v for k, v in batch.items() if k != "cache_index"},
                                  num_items_in_batch=n)
        got = from_cache.compute_loss(student, batch, num_items_in_batch=n)
    # fp16 log-probabilities in the cache: about 1e-3 relative
    torch.testing.assert_close(got, want, rtol=3e-3, atol=1e-4)


@pytest.mark.parametrize("tail", ["renormalize", "student_full"])
def test_logits_free_and_logits_paths_agree_with_a_cache(workspace, cached, tmp_path, tail):
    examples, _, top8, _ = cached
    student, _ = models(workspace)
    batch = dict(batch_of(workspace, range(6)), cache_index=torch.arange(6))
    results = {}
    for logits_free in (True, False):
        trainer = _trainer(workspace, tmp_path, student, cache=top8, examples=examples, logits_free=logits_free)
        trainer.topk_tail = tail
        student.zero_grad()
        loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items(batch))
        loss.backward()
        assert trainer.last_path == ("logits_free" if logits_free else "logits")
        results[logits_free] = (loss.detach(), [p.grad.clone() for p in student.parameters()])
        with torch.no_grad():  # the components of both paths agree too
            results[logits_free] += (cached_teacher_components(
                trainer.distill_config, trainer.loss_fn, tail, trainer.teacher_cache.temperature,
                *trainer.teacher_cache.batch(range(6), length=batch["input_ids"].shape[1])[:2],
                _shift(batch["labels"], -100), _shift(batch["span_ids"], -1),
                **({"hidden": hidden_of(trainer, student, batch), "head": student.get_output_embeddings()}
                   if logits_free else {"logits": student(input_ids=batch["input_ids"],
                                                          attention_mask=batch["attention_mask"]).logits})),)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for key, value in results[False][2].items():
        torch.testing.assert_close(results[True][2][key], value, rtol=1e-5, atol=1e-5, msg=key)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_from_a_cache_shuffles_by_example_and_learns(workspace, cached, tmp_path):
    examples, _, top8, _ = cached
    student, _ = models(workspace)
    trainer = _trainer(workspace, tmp_path, student, cache=top8, examples=examples, max_steps=5)
    fixed = dict(batch_of(workspace, range(8)), cache_index=torch.arange(8))
    with torch.no_grad():
        before = float(trainer.compute_loss(trainer.model, fixed))
    trainer.train()  # shuffled batches: each example finds its own rows through cache_index
    with torch.no_grad():
        after = float(trainer.compute_loss(trainer.model, fixed))
    logs = train_logs(trainer)
    assert len(logs) == 5 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert after < before
    for entry in logs:  # the per-span components, as on the dense path
        for key in ("kl/reason", "kl/action", "ce/action", "kl/answer", "ce/answer"):
            assert math.isfinite(entry[key]) and entry[key] >= 0, key


def test_the_cache_must_match_the_dataset(workspace, cached, tmp_path):
    examples, _, top8, _ = cached
    student, _ = models(workspace)
    with pytest.raises(TeacherCacheError, match=f"example count mismatch: the cache has {EXAMPLES} examples, "
                                                f"train_dataset has {EXAMPLES - 1}"):
        _trainer(workspace, tmp_path, student, cache=top8, examples=examples[:-1])
    changed = list(examples)
    changed[3] = dict(changed[3], input_ids=changed[3]["input_ids"][:-1], labels=changed[3]["labels"][:-1],
                      span_ids=changed[3]["span_ids"][:-1])
    with pytest.raises(TeacherCacheError, match="length mismatch at example 3"):
        _trainer(workspace, tmp_path, student, cache=top8, examples=changed)
    small = make_tiny.make_model("llama", 50, seed=2)
    with pytest.raises(TeacherCacheError, match="vocabulary mismatch: the cache has vocab_size"):
        _trainer(workspace, tmp_path, small, cache=top8, examples=examples)
    with pytest.raises(ValueError, match="a teacher_model or a teacher_cache"):
        _trainer(workspace, tmp_path, student, examples=examples)
    config = DistillationConfig(divergence="jsd")
    with pytest.raises(ValueError, match="divergence: must be one of"):
        DistillationTrainer(model=student, teacher_cache=top8, args=training_args(tmp_path), distill_config=config,
                            train_dataset=examples, processing_class=workspace["tokenizer"])


def test_train_cli_from_a_cache_never_loads_the_teacher(workspace, cached, tmp_path, monkeypatch):
    make_tiny.build_workspace(tmp_path, n_trajectories=8)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    examples = train_cli.load_examples({"train": str(tmp_path / "trajectories.jsonl"), "format": None,
                                        "errors": "raise", "unknown_keys": "warn", "max_length": 256,
                                        "truncation": "drop_partial_span", "use_chat_template": None,
                                        "add_eos": True}, "train", tokenizer)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    write_teacher_cache(str(tmp_path / "cache"), teacher, examples, k=8, pad_token_id=tokenizer.pad_token_id)
    monkeypatch.setenv("TINY_DIR", str(tmp_path))
    built = []
    real_build = train_cli.build_model
    monkeypatch.setattr(train_cli, "build_model", lambda spec, role, tok: built.append(role) or real_build(spec, role, tok))
    overrides = ["--set", f"teacher={{cache: {tmp_path / 'cache'}}}", "--set", "loss.divergence=forward_kl",
                 "--set", "training.max_steps=1", "--set", "training.disable_tqdm=true",
                 "--set", "training.save_strategy=no"]
    assert train_cli.main(["--config", str(ROOT / "examples" / "train_tiny.yaml"), *overrides]) == 0
    assert built == ["student"]
    assert TeacherCache(str(tmp_path / "cache")).k == 8
    # The same config with a cache of other data fails before any model is built.
    overrides[1] = f"teacher={{cache: {cached[2]}}}"
    assert train_cli.main(["--config", str(ROOT / "examples" / "train_tiny.yaml"), "--dry-run", *overrides]) == 2
