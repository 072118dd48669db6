"""DistillationTrainer, the curriculum and `distillkit train` on tiny Llama / Qwen2 models (CPU).

Everything is built here: the tokenizer (a byte-level BPE trained on generated trajectories),
the trajectories and the models (from configs, random weights) come from examples/make_tiny.py.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

from distillkit.training.curriculum import (CompetenceCurriculum, CurriculumConfig,  # noqa: E402
                                            competence, complexity_scores, weights_from_difficulty)
from distillkit.core.spans import PAD_SPAN, Span  # noqa: E402
from distillkit.training.trainer import LOSS_STATE_NAME, DistillationConfig  # noqa: E402

from trainer_helpers import (ROOT, SPAN_WEIGHTS, batch_of, make_tiny, make_trainer, models,  # noqa: E402
                             num_items, train_logs)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_models_train_and_log_components(workspace, tmp_path, kind):
    student, teacher = models(workspace, kind)
    trainer = make_trainer(workspace, tmp_path, student, teacher, max_steps=5)
    fixed = batch_of(workspace, range(8))
    with torch.no_grad():
        before = float(trainer.compute_loss(trainer.model, fixed))
    trainer.train()
    with torch.no_grad():
        after = float(trainer.compute_loss(trainer.model, fixed))
    assert after < before
    assert trainer.last_path == "logits_free"
    # The teacher stayed frozen and in eval mode.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    logs = train_logs(trainer)
    assert len(logs) == 5
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for key in ("kl/reason", "kl/action", "ce/action", "kl/answer", "ce/answer"):
            assert math.isfinite(entry[key]) and entry[key] >= 0, key
    # CE of the tool calls starts near log(V) for random models and goes down.
    assert logs[0]["ce/action"] == pytest.approx(math.log(len(workspace["tokenizer"])), rel=0.1)
    assert logs[-1]["ce/action"] < logs[0]["ce/action"]


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_logits_free_and_logits_paths_agree(workspace, tmp_path, divergence):
    student, teacher = models(workspace)
    batch = batch_of(workspace, range(6))
    n = num_items(batch)
    results = {}
    for mode in (True, False):
        config = DistillationConfig(divergence=divergence, temperature=1.5, span_weights=SPAN_WEIGHTS,
                                    use_logits_free=mode)
        trainer = make_trainer(workspace, tmp_path, student, teacher, config=config)
        assert trainer.uses_logits_free() is mode
        for normalizer in (None, n):
            student.zero_grad()
            loss = trainer.compute_loss(student, batch, num_items_in_batch=normalizer)
            loss.backward()
            grads = [p.grad.clone() for p in student.parameters()]
            results[mode, normalizer is None] = (loss.detach(), grads)
        assert trainer.last_path == ("logits_free" if mode else "logits")
    for plain in (True, False):
        (fused, fused_grads), (logits, logits_grads) = results[True, plain], results[False, plain]
        torch.testing.assert_close(fused, logits, rtol=1e-5, atol=1e-6)
        for a, b in zip(fused_grads, logits_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _transforming(model, **config):
    """`model` made to transform its logits after the head, as its config declares (Gemma's soft cap, Cohere's
    scale): the logits-free path must apply the same transform to head(hidden)."""
    forward = model.forward
    for key, value in config.items():
        setattr(model.config, key, value)

    def transformed_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        logits = out.logits * config.get("logit_scale", 1.0)
        cap = config.get("final_logit_softcapping")
        out.logits = cap * torch.tanh(logits / cap) if cap else logits
        return out
    model.forward = transformed_forward
    return model


def test_logits_free_path_applies_the_models_logit_transforms(workspace, tmp_path):
    student, teacher = models(workspace)
    batch = batch_of(workspace, range(4))
    plain = make_trainer(workspace, tmp_path, student, teacher).compute_loss(student, batch)
    _transforming(teacher, final_logit_softcapping=0.05)
    _transforming(student, logit_scale=4.0)
    results = {}
    for mode in (True, False):
        config = DistillationConfig(divergence="jsd", temperature=2.0, span_weights=SPAN_WEIGHTS, use_logits_free=mode)
        trainer = make_trainer(workspace, tmp_path, student, teacher, config=config)
        student.zero_grad()
        loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items(batch))
        loss.backward()
        assert trainer.last_path == ("logits_free" if mode else "logits")
        results[mode] = (loss.detach(), [p.grad.clone() for p in student.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(float(results[True][0]) - float(plain.detach())) > 1e-3 * float(plain.detach())  # transforms matter
    teacher.config.output_multiplier_scale = 2.0  # a transform the logits-free path does not know
    assert not make_trainer(workspace, tmp_path, student, teacher).uses_logits_free()
    config = DistillationConfig(span_weights=SPAN_WEIGHTS, use_logits_free=True)
    with pytest.raises(ValueError, match="output_multiplier_scale"):
        make_trainer(workspace, tmp_path, student, teacher, config=config).uses_logits_free()


def test_head_check_falls_back_when_the_logits_are_transformed(workspace, tmp_path):
    student, teacher = models(workspace)
    forward = teacher.forward

    def scaled_forward(*args, **kwargs):  # logits scaled after the head, invisible to the config checks
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    teacher.forward = scaled_forward
    batch = batch_of(workspace, range(3))
    trainer = make_trainer(workspace, tmp_path, student, teacher)
    assert trainer.uses_logits_free()  # decided from the structure...
    loss = trainer.compute_loss(student, batch)
    assert trainer.last_path == "logits" and not trainer.uses_logits_free()  # ...and corrected by the check
    with torch.no_grad():
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        targets = torch.cat([batch["labels"][:, 1:], torch.full((3, 1), -100)], 1)
        spans = torch.cat([batch["span_ids"][:, 1:], torch.full((3, 1), PAD_SPAN)], 1)
        manual = trainer.loss_fn(student(**kwargs).logits, teacher(**kwargs).logits, targets, spans)
    torch.testing.assert_close(loss.detach(), manual)
    strict = make_trainer(workspace, tmp_path, student, teacher,
                          config=DistillationConfig(span_weights=SPAN_WEIGHTS, use_logits_free=True))
    with pytest.raises(RuntimeError, match="does not reproduce"):
        strict.compute_loss(student, batch)


def test_ce_only_table_skips_the_teacher(workspace, tmp_path):
    student, teacher = models(workspace)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    config = DistillationConfig(span_weights={"action": (0.0, 1.0), "answer": (0.0, 1.0)})
    trainer = make_trainer(workspace, tmp_path, student, teacher, config=config)
    loss = trainer.compute_loss(student, batch_of(workspace, range(3)))
    assert torch.isfinite(loss) and not calls


# ----------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("logits_free,dtype", [(True, torch.float32), (False, torch.float64)])
def test_micro_batches_add_up_to_the_batch(workspace, tmp_path, logits_free, dtype):
    """compute_loss with normalizer=num_items_in_batch: 4 micro-batches of 2 == one batch of 8."""
    student, teacher = models(workspace, dtype=dtype)
    # float64 logits: the torch backend (the compiled CPU kernel takes fp32/bf16/fp16 only).
    config = DistillationConfig(divergence="jsd", temperature=2.0, span_weights=SPAN_WEIGHTS,
                                learnable_span_weights=True, use_logits_free=logits_free,
                                backend="auto" if dtype == torch.float32 else "torch")
    trainer = make_trainer(workspace, tmp_path, student, teacher, config=config)
    with torch.no_grad():
        trainer.loss_fn.log_vars.uniform_(-0.5, 0.5)
    indices = [3, 17, 5, 30, 12, 1, 22, 9]  # 0 to 3 tool calls: different lengths
    params = list(student.parameters()) + [trainer.loss_fn.log_vars]

    def run(groups):
        for p in params:
            p.grad = None
        n = sum(num_items(batch_of(workspace, g)) for g in groups)
        total = 0.0
        for group in groups:
            loss = trainer.compute_loss(student, batch_of(workspace, group), num_items_in_batch=n)
            loss.backward()
            total = total + loss.detach()
        return total, [p.grad.clone() for p in params]

    whole, whole_grads = run([indices])
    parts, part_grads = run([indices[i:i + 2] for i in range(0, 8, 2)])
    assert trainer.last_path == ("logits_free" if logits_free else "logits")
    # The op computes in fp32: the two differ only by the order of fp32 sums (and, in fp32, by the
    # model's matmuls over 2 or 8 rows).
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=0)
    for a, b in zip(part_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8 if dtype == torch.float32 else 1e-10)


def test_gradient_accumulation_in_training_matches_one_batch(workspace, tmp_path):
    """Trainer end to end: batch 8 x 1 step == batch 2 x 4 accumulation steps (same data, same updates).

    Plain SGD, and the comparison is on the parameter updates: Adam divides by sqrt(v), which
    turns the fp32 summation-order noise of a near-zero gradient into an update of order lr."""
    curriculum = CurriculumConfig(initial_competence=0.4, warmup=1.0, ramp=0.3)
    runs = {}
    for bs, ga in ((8, 1), (2, 4)):
        student, teacher = models(workspace)
        initial = [p.detach().clone() for p in student.parameters()]
        config = DistillationConfig(divergence="jsd", temperature=2.0, span_weights=SPAN_WEIGHTS,
                                    learnable_span_weights=True, curriculum=curriculum)
        trainer = make_trainer(workspace, tmp_path / f"bs{bs}", student, teacher, config=config, max_steps=2,
                               per_device_train_batch_size=bs, gradient_accumulation_steps=ga, learning_rate=0.5,
                               optim="sgd")
        trainer.train()
        updates = [p.detach() - p0 for p, p0 in zip(student.parameters(), initial)]
        runs[bs] = (train_logs(trainer), updates, trainer.loss_fn.log_vars.detach().clone())
    (logs8, updates8, lv8), (logs2, updates2, lv2) = runs[8], runs[2]
    for a, b in zip(logs8, logs2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["curriculum/mean_weight"] == pytest.approx(b["curriculum/mean_weight"], rel=1e-6)
        for key in ("kl/reason", "ce/action"):
            assert a[key] == pytest.approx(b[key], rel=1e-5)
    for a, b in zip(updates8, updates2):
        assert a.abs().max() > 0  # every parameter moved
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()))
    torch.testing.assert_close(lv8, lv2, rtol=1e-4, atol=1e-6)
    assert lv8.abs().max() > 0  # the span weights did train


# ----------------------------------------------------------------------------- checkpoints


def test_resume_continues_with_identical_losses(workspace, tmp_path):
    config = DistillationConfig(divergence="forward_kl", temperature=2.0, span_weights=SPAN_WEIGHTS,
                                learnable_span_weights=True, span_weight_lr=5e-2,
                                curriculum=CurriculumConfig(initial_competence=0.3, warmup=0.5, ramp=0.2))
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=3e-3,
                  lr_scheduler_type="linear")
    student, teacher = models(workspace)
    straight = make_trainer(workspace, tmp_path / "a", student, teacher, config=config, **common)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / LOSS_STATE_NAME).is_file() and (checkpoint / "model.safetensors").is_file()
    from safetensors.torch import load_file
    saved = load_file(checkpoint / LOSS_STATE_NAME)
    assert saved["log_vars"].abs().max() > 0  # restoring them matters
    assert json.loads((checkpoint / "distill_config.json").read_text())["divergence"] == "forward_kl"

    student2, teacher2 = models(workspace)
    resumed = make_trainer(workspace, tmp_path / "b", student2, teacher2, config=config, **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    logs_a = {e["step"]: e for e in train_logs(straight)}
    logs_b = {e["step"]: e for e in train_logs(resumed)}
    assert sorted(logs_b) == [1, 2, 3, 4, 5, 6]  # the first three come from the checkpoint's trainer state
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "kl/reason", "ce/action", "span_weight/kl/reason",
                    "curriculum/mean_weight", "curriculum/competence"):
            assert logs_b[step][key] == pytest.approx(logs_a[step][key], rel=1e-6, abs=1e-9), (step, key)
    for a, b in zip(student.parameters(), student2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(straight.loss_fn.log_vars, resumed.loss_fn.log_vars, rtol=1e-6, atol=1e-8)
    # The span weights are in the optimizer (restored state included) and never see a stale gradient.
    group = resumed.optimizer.param_groups[-1]
    assert group["params"][0] is resumed.loss_fn.log_vars and group["initial_lr"] == 5e-2
    assert resumed.loss_fn.log_vars.grad is None


# ----------------------------------------------------------------------------- curriculum


def test_complexity_and_schedule():
    a, r, o, w, p = Span.ACTION, Span.REASON, Span.OBSERVATION, Span.ANSWER, Span.PROMPT
    spans = torch.tensor([[p, r, a, a, o, r, a, o, w, PAD_SPAN], [p, r, w, w, w, PAD_SPAN, PAD_SPAN, PAD_SPAN,
                                                                    PAD_SPAN, PAD_SPAN]])
    assert complexity_scores(spans, "steps").tolist() == [2.0, 0.0]
    assert complexity_scores(spans, "action_tokens").tolist() == [3.0, 0.0]
    assert complexity_scores(spans, "target_tokens").tolist() == [6.0, 4.0]
    assert complexity_scores(spans, "tokens").tolist() == [9.0, 5.0]
    assert competence(0, 100, initial=0.25, warmup=0.5) == pytest.approx(0.25)
    assert competence(50, 100, initial=0.25, warmup=0.5) == 1.0
    assert competence(25, 100, initial=0.2, warmup=0.5, schedule="linear") == pytest.approx(0.6)
    assert competence(25, 100, initial=0.2, warmup=0.5) == pytest.approx(math.sqrt(0.5 * 0.96 + 0.04))
    d = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0])
    assert weights_from_difficulty(d, 0.5).tolist() == [1, 1, 1, 0, 0]
    torch.testing.assert_close(weights_from_difficulty(d, 0.5, ramp=0.4), torch.tensor([1, 1, 1, 0.5, 0]))
    torch.testing.assert_close(weights_from_difficulty(d, 0.5, min_weight=0.1), torch.tensor([1, 1, 1, 0.1, 0.1]))


def test_difficulty_is_the_strictly_easier_fraction():
    # Half of the data has one step: they are not harder than anything, so never masked.
    curriculum = CompetenceCurriculum(CurriculumConfig(), torch.tensor([1.0, 1, 1, 1, 2, 2, 3, 4]))
    torch.testing.assert_close(curriculum.difficulty(torch.tensor([1.0, 2, 3, 4, 0])),
                               torch.tensor([0.0, 0.5, 0.75, 0.875, 0.0]))
    mixed = CompetenceCurriculum(CurriculumConfig(entropy_weight=0.5), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(mixed.difficulty(torch.tensor([2.0]), torch.tensor([math.log(16) / 2]), 16),
                               torch.tensor([0.5]))
    with pytest.raises(ValueError, match="max_complexity"):
        CompetenceCurriculum(CurriculumConfig(), None)
    with pytest.raises(ValueError, match="measure"):
        CurriculumConfig(measure="hops")


@pytest.mark.parametrize("logits_free", [True, False])
def test_curriculum_weights_reach_the_loss(workspace, tmp_path, logits_free):
    student, teacher = models(workspace)
    curriculum = CurriculumConfig(initial_competence=0.3, warmup=0.5)
    config = DistillationConfig(divergence="jsd", span_weights=SPAN_WEIGHTS, curriculum=curriculum,
                                use_logits_free=logits_free)
    trainer = make_trainer(workspace, tmp_path, student, teacher, config=config, max_steps=10)
    trainer.state.max_steps = 10
    indices = [0, 1, 2, 3, 4, 7]  # 0, 1, 2, 3, 0, 3 tool calls
    batch = batch_of(workspace, indices)
    steps = complexity_scores(batch["span_ids"], "steps")
    assert steps.tolist() == [0, 1, 2, 3, 0, 3]
    # Reference: 8 trajectories of each step count -> difficulty 0, .25, .5, .75; competence 0.3 at step 0.
    expected = (steps <= 1).float()
    n = num_items(batch)
    trainer.state.global_step = 0
    loss = trainer.compute_loss(student, batch, num_items_in_batch=n)
    targets = torch.cat([batch["labels"][:, 1:], torch.full((len(indices), 1), -100)], 1)
    spans = torch.cat([batch["span_ids"][:, 1:], torch.full((len(indices), 1), PAD_SPAN)], 1)
    with torch.no_grad():
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        manual = trainer.loss_fn(student(**kwargs).logits, teacher(**kwargs).logits, targets, spans,
                                 sample_weight=expected, normalizer=n)
    torch.testing.assert_close(loss.detach(), manual, rtol=1e-5, atol=1e-7)
    trainer.state.global_step = 5  # warmup over: everything counts
    full = trainer.compute_loss(student, batch, num_items_in_batch=n)
    with torch.no_grad():
        manual_full = trainer.loss_fn(student(**kwargs).logits, teacher(**kwargs).logits, targets, spans,
                                      normalizer=n)
    torch.testing.assert_close(full.detach(), manual_full, rtol=1e-5, atol=1e-7)
    assert trainer._last_competence == 1.0


def test_curriculum_with_teacher_entropy_trains(workspace, tmp_path):
    student, teacher = models(workspace)
    config = DistillationConfig(span_weights=SPAN_WEIGHTS,
                                curriculum=CurriculumConfig(entropy_weight=0.5, initial_competence=0.2, ramp=0.2))
    trainer = make_trainer(workspace, tmp_path, student, teacher, config=config, max_steps=2)
    trainer.train()
    logs = train_logs(trainer)
    assert all(0.0 <= e["curriculum/mean_weight"] <= 1.0 for e in logs)
    assert logs[0]["curriculum/mean_weight"] < 1.0


# ----------------------------------------------------------------------------- config and CLI


def test_train_cli_end_to_end(tmp_path, monkeypatch, capsys, caplog):
    from distillkit.training import cli as train_cli
    paths = make_tiny.build_workspace(tmp_path / "ws", n_trajectories=12)
    monkeypatch.setenv("TINY_DIR", str(tmp_path / "ws"))
    config = str(ROOT / "examples" / "train_tiny.yaml")
    code = train_cli.main(["--config", config, "--set", "training.max_steps=2", "--set", "training.save_steps=2",
                           "--set", "training.disable_tqdm=true", "--set", "training.logging_steps=1"])
    assert code == 0
    run = tmp_path / "ws" / "run"
    for name in ("model.safetensors", LOSS_STATE_NAME, "tokenizer.json", "checkpoint-2/model.safetensors"):
        assert (run / name).is_file(), name
    # Resume from the last checkpoint for one more step.
    code = train_cli.main(["--config", config, "--resume", "--set", "training.max_steps=3",
                           "--set", "training.disable_tqdm=true"])
    assert code == 0
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    # Resuming a finished run trains nothing and says so (no "train loss 0.0000").
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="distillkit.train"):
        assert train_cli.main(["--config", config, "--resume", "--set", "training.max_steps=3"]) == 0
    assert "nothing to train" in caplog.text and "train loss" not in caplog.text
    assert not (run / "checkpoint-4").exists()

    # A student built from a config, a relative tokenizer path, CE + KL.
    yaml_path = tmp_path / "ws" / "from_config.yaml"
    yaml_path.write_text(
        "student:\n  config: {model_type: qwen2, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 4,\n"
        "           num_key_value_heads: 2, intermediate_size: 64}\n"
        "teacher: {path: teacher}\ntokenizer: tokenizer\ndata: {train: trajectories.jsonl, eval: trajectories.jsonl}\n"
        "output_dir: out2\ntraining: {max_steps: 1, per_device_train_batch_size: 2, disable_tqdm: true,\n"
        "           per_device_eval_batch_size: 4}\n"
        "loss: {divergence: forward_kl, span_weights: {reason: [1, 0], action: [0, 1]}}\n")
    assert train_cli.main(["--config", str(yaml_path)]) == 0
    assert (tmp_path / "ws" / "out2" / "model.safetensors").is_file()
    assert paths["teacher"]


def test_train_cli_defaults_to_ddp_on_cpu_under_torchrun(monkeypatch):
    from distillkit.training import cli as train_cli
    config = {"training": {"max_steps": 1}, "seed": 3}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = train_cli.training_defaults(config)
    assert "use_cpu" not in alone and alone["seed"] == 3 and alone["report_to"] == "none"
    monkeypatch.setenv("WORLD_SIZE", "2")
    no_accelerator = not torch.accelerator.is_available()
    assert train_cli.training_defaults(config).get("use_cpu") is (True if no_accelerator else None)
    explicit = {"training": {"use_cpu": False}}
    assert train_cli.training_defaults(explicit)["use_cpu"] is False
    assert config == {"training": {"max_steps": 1}, "seed": 3}  # not modified
