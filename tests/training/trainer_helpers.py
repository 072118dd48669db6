"""Helpers of the trainer tests (test_trainer.py, test_trainer_ddp.py): examples/make_tiny.py, models from
configs, trainer construction. The fixtures (the tiny workspace, one thread) are in conftest.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

from distillkit.data import DistillationCollator  # noqa: E402
from distillkit.training.trainer import DistillationConfig, DistillationTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPAN_WEIGHTS = {"reason": (1.0, 0.0), "action": (0.5, 1.0), "answer": (1.0, 0.2)}


def _make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny", ROOT / "examples" / "make_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_tiny = _make_tiny()


def models(workspace, kind="llama", dtype=torch.float32):
    tok = workspace["tokenizer"]
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    teacher = make_tiny.make_model(kind, len(tok), seed=1, hidden=48, ffn=96, **ids).to(dtype)
    student = make_tiny.make_model(kind, len(tok), seed=2, **ids).to(dtype)
    return student, teacher


def training_args(out, **overrides):
    options = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                   lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                   disable_tqdm=True, seed=0, use_cpu=True, dataloader_pin_memory=False)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def make_trainer(workspace, out, student, teacher, *, config=None, collator=None, **args):
    config = config or DistillationConfig(divergence="jsd", temperature=2.0, span_weights=SPAN_WEIGHTS)
    return DistillationTrainer(model=student, teacher_model=teacher, args=training_args(out, **args),
                               distill_config=config, train_dataset=workspace["examples"],
                               processing_class=workspace["tokenizer"], data_collator=collator)


def batch_of(workspace, indices, pad_to=None):
    collate = DistillationCollator.from_tokenizer(workspace["tokenizer"], pad_to_multiple_of=pad_to)
    return collate([workspace["examples"][i] for i in indices])


def num_items(batch):
    return (batch["labels"][:, 1:] != -100).sum()


def train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ----------------------------------------------------------------------------- training


