"""DistillationTrainer and `distillkit train` on datasets without span ids: plain {input_ids, labels}
lists, a `datasets.Dataset`, and `data.format: tokenized` JSONL. Labelled tokens then count as ANSWER
spans, prompt tokens as PROMPT: the loss equals the one with those span ids given explicitly."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

from distillkit.core.spans import Span  # noqa: E402
from distillkit.data import DistillationCollator  # noqa: E402
from distillkit.training import cli as train_cli  # noqa: E402

from trainer_helpers import ROOT, make_tiny, make_trainer, models, train_logs  # noqa: E402


def _plain(examples):
    return [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in examples]


def _answer_spans(example):
    """The span ids the trainer assumes for a plain example: ANSWER where labelled, PROMPT elsewhere."""
    return [int(Span.ANSWER) if label != -100 else int(Span.PROMPT) for label in example["labels"]]


def test_collator_without_span_ids(workspace):
    collate = DistillationCollator.from_tokenizer(workspace["tokenizer"])
    batch = collate(_plain(workspace["examples"][:3]))
    assert "span_ids" not in batch and batch["input_ids"].shape == batch["labels"].shape
    with pytest.raises(ValueError, match="feature 1 lacks span_ids but feature 0 has them"):
        collate([workspace["examples"][0], _plain(workspace["examples"][1:2])[0]])
    with pytest.raises(ValueError, match="feature 0 lacks labels"):
        collate([{"input_ids": [1, 2]}])


def test_plain_examples_mean_answer_spans(workspace, tmp_path):
    student, teacher = models(workspace)
    plain = _plain(workspace["examples"][:6])
    explicit = [dict(example, span_ids=_answer_spans(example)) for example in plain]
    trainer = make_trainer(workspace, tmp_path, student, teacher)
    collate = DistillationCollator.from_tokenizer(workspace["tokenizer"])
    with torch.no_grad():
        without = trainer.compute_loss(trainer.model, collate(plain))
        given = trainer.compute_loss(trainer.model, collate(explicit))
    assert torch.isfinite(without) and without > 0
    torch.testing.assert_close(without, given, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["list", "datasets.Dataset"])
def test_trainer_trains_on_a_plain_dataset(workspace, tmp_path, kind):
    plain = _plain(workspace["examples"])
    if kind == "datasets.Dataset":
        datasets = pytest.importorskip("datasets")
        plain = datasets.Dataset.from_list(plain)  # remove_unused_columns keeps input_ids and labels
    student, teacher = models(workspace)
    trainer = make_trainer(workspace, tmp_path, student, teacher, max_steps=3)
    trainer.train_dataset = plain
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    assert logs[0]["kl/answer"] > 0 and logs[0].get("kl/reason", 0.0) == 0.0  # every target is an answer


def test_train_cli_on_tokenized_jsonl(tmp_path, monkeypatch):
    make_tiny.build_workspace(tmp_path, n_trajectories=8)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    from distillkit.data import TrajectoryTokenizer, load_trajectories
    examples = TrajectoryTokenizer(tokenizer, max_length=96).tokenize_all(load_trajectories(tmp_path / "trajectories.jsonl"))
    with open(tmp_path / "tokenized.jsonl", "w") as handle:
        for example in _plain(examples):
            handle.write(json.dumps(example) + "\n")
    monkeypatch.setenv("TINY_DIR", str(tmp_path))
    overrides = ["--set", f"data.train={tmp_path / 'tokenized.jsonl'}", "--set", "data.format=tokenized",
                 "--set", "training.max_steps=1", "--set", "training.disable_tqdm=true",
                 "--set", "training.save_strategy=no", "--set", "loss.curriculum=null"]
    assert train_cli.main(["--config", str(ROOT / "examples" / "train_tiny.yaml"), *overrides]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
