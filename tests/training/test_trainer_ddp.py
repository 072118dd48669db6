"""DistillationTrainer under data parallelism: 2 processes (DDP, gloo on CPU) x batch B == 1 process x batch 2B.

The workers are started with torch.multiprocessing.spawn; each sets the torchrun environment
(MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) before building its TrainingArguments, so that
accelerate initializes the gloo process group and the Trainer wraps the student in DDP and shards
the data loader (rank r gets batches r, r + 2, ...). With train_sampling_strategy="sequential" and a
dataset ordered by hand, the global batch of step k is the same 2B samples in both runs, and the
two ranks' halves carry very different numbers of label tokens.

Checked, on the logits-free path and on the logits path: the logged losses and loss components, the
student's parameter updates and the learned span weights (log-variances, all-reduced by the trainer
outside DDP) after 3 plain-SGD steps. And that the normalization is global: with
average_tokens_across_devices=False (each rank divides by its own token count) the updates differ.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import free_port, launch_env, spawn_and_wait, worker_process

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

from distillkit.training.curriculum import CurriculumConfig  # noqa: E402
from distillkit.training.trainer import DistillationConfig, DistillationTrainer  # noqa: E402
# Shared with the single-process trainer tests (pytest's default "prepend" import mode puts this folder,
# which has no __init__.py, on sys.path; the spawned workers inherit the parent's sys.path). The
# fixtures `workspace` and `_one_thread` come from conftest.py.
from trainer_helpers import SPAN_WEIGHTS, models, train_logs, training_args  # noqa: E402

WORLD, PER_DEVICE, STEPS = 2, 2, 3
# Trajectory i makes i % 4 tool calls. Rows 4k, 4k + 1 of the order are rank 0's half of step k's
# global batch, rows 4k + 2, 4k + 3 rank 1's: short vs long trajectories (swapped at step 1).
ORDER = [0, 4, 3, 7, 11, 15, 1, 8, 12, 16, 19, 23]
ORDER += [i for i in range(32) if i not in ORDER]
RUNS = {  # name: (use_logits_free, average_tokens_across_devices)
    "logits_free": (True, True),
    "logits": (False, True),
    "per_rank_mean": (True, False),
}
LOG_KEYS = ("loss", "grad_norm", "kl/reason", "kl/answer", "ce/action", "curriculum/mean_weight",
            "span_weight/kl/reason", "span_weight/ce/action")
TIMEOUT_S = 240


def _train(workspace, out, batch_size, logits_free, average_tokens, **extra):
    """STEPS plain-SGD steps on the ordered data; the logs, the parameter updates, the learned log-variances."""
    student, teacher = models(workspace)
    initial = [p.detach().clone() for p in student.parameters()]
    config = DistillationConfig(divergence="jsd", temperature=2.0, span_weights=SPAN_WEIGHTS,
                                learnable_span_weights=True, use_logits_free=logits_free,
                                curriculum=CurriculumConfig(initial_competence=0.4, warmup=1.0, ramp=0.3))
    args = training_args(out, max_steps=STEPS, per_device_train_batch_size=batch_size, learning_rate=0.5,
                         optim="sgd", train_sampling_strategy="sequential",
                         average_tokens_across_devices=average_tokens, **extra)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, distill_config=config,
                                  train_dataset=workspace["examples"], processing_class=workspace["tokenizer"])
    trainer.train()
    return {"logs": train_logs(trainer),
            "updates": [p.detach() - p0 for p, p0 in zip(student.parameters(), initial)],
            "log_vars": trainer.loss_fn.log_vars.detach().clone(),
            "world": trainer.accelerator.num_processes, "path": trainer.last_path,
            "wrapped": type(trainer.model_wrapped).__name__}


def _worker(rank, world, port, tokenizer_path, examples, out_dir):
    launch_env(rank, world, port)
    with worker_process():
        workspace = {"tokenizer": transformers.AutoTokenizer.from_pretrained(tokenizer_path), "examples": examples}
        results = {name: _train(workspace, os.path.join(out_dir, f"rank{rank}", name), PER_DEVICE, *options,
                                ddp_backend="gloo")
                   for name, options in RUNS.items()}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ddp.pt"))


def _run_workers(workspace, out_dir):
    spawn_and_wait(_worker, (WORLD, free_port(), workspace["paths"]["tokenizer"], workspace["ordered"],
                             str(out_dir)), WORLD, TIMEOUT_S, "DDP workers")
    return torch.load(out_dir / "ddp.pt")


def test_ddp_trainer_matches_one_process_with_the_global_batch(workspace, tmp_path):
    examples = workspace["examples"]
    workspace = dict(workspace, ordered=[examples[i] for i in ORDER])
    ddp = _run_workers(workspace, tmp_path)
    single = {"examples": workspace["ordered"], "tokenizer": workspace["tokenizer"]}

    # The halves of every global batch are unbalanced (so a per-rank mean would weigh tokens differently).
    def label_tokens(rows):
        return sum(sum(label != -100 for label in examples[i]["labels"][1:]) for i in rows)
    for step in range(STEPS):
        rows = ORDER[4 * step:4 * step + 4]
        assert abs(label_tokens(rows[:2]) - label_tokens(rows[2:])) > 0.3 * label_tokens(rows)

    for name in ("logits_free", "logits"):
        logits_free, average = RUNS[name]
        one = _train(single, tmp_path / "single" / name, WORLD * PER_DEVICE, logits_free, average)
        two = ddp[name]
        assert (one["world"], two["world"]) == (1, WORLD)
        assert two["wrapped"] == "DistributedDataParallel"
        assert one["path"] == two["path"] == name
        assert len(one["logs"]) == len(two["logs"]) == STEPS
        for a, b in zip(one["logs"], two["logs"]):
            for key in LOG_KEYS:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, a["step"], key)
        # Plain SGD: the updates are the learning rate times the (clipped) global gradients. fp32 sums
        # in a different order (2 x 2 rows + all-reduce vs 4 rows): compare relative to each update's size.
        for i, (a, b) in enumerate(zip(one["updates"], two["updates"])):
            scale = float(a.abs().max())
            assert scale > 0, f"{name}: parameter {i} did not move"
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}, parameter {i}: {m}")
        torch.testing.assert_close(two["log_vars"], one["log_vars"], rtol=1e-4, atol=1e-6)
        assert one["log_vars"].abs().max() > 0  # the span weights did train

        if name == "logits_free":
            # Each rank normalizing by its own token count (the per-rank mean, DDP then averaging the ranks)
            # trains a different model: the global count is what makes the two runs agree.
            local = ddp["per_rank_mean"]
            gap = max(float((b - a).abs().max() / a.abs().max()) for a, b in zip(one["updates"], local["updates"]))
            assert gap > 1e-2, f"the per-rank mean should not match the global batch (relative gap {gap:.1e})"
            assert local["logs"][0]["loss"] != pytest.approx(one["logs"][0]["loss"], rel=1e-3)
