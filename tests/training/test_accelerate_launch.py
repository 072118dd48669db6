"""`distillkit train` under `accelerate launch`: 2 CPU processes, DDP over gloo, offline.

The tested command (docs/DISTRIBUTED.md):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m distillkit.cli train --config run.yaml

`--multi_gpu` is what makes accelerate start one process per rank through torchrun's launcher; `--cpu` would
start ONE process (accelerate's simple launcher: multi-process CPU runs otherwise need mpirun). Without a GPU
each rank's `distillkit train` sets `use_cpu=True` (WORLD_SIZE > 1, no accelerator), so that accelerate sets up
a gloo group and the Trainer wraps the student in DDP. CUDA_VISIBLE_DEVICES="" keeps the test on CPU on a GPU
machine too; HF_HOME points at an empty folder (no user accelerate config), and the Hub is off.

Both ranks took part: the data loader is sharded over 2 ranks (12 examples, 2 per device: 3 steps, where one
process would take 6), each rank logs loading the data, and the checkpoint and the final model exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import free_port

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")
yaml = pytest.importorskip("yaml")

from trainer_helpers import ROOT, make_tiny  # noqa: E402

TIMEOUT_S = 300
EXAMPLES, PER_DEVICE, WORLD = 12, 2, 2


def test_distillkit_train_under_accelerate_launch(tmp_path):
    paths = make_tiny.build_workspace(tmp_path / "tiny", n_trajectories=EXAMPLES)
    out = tmp_path / "run"
    config = {"teacher": {"path": paths["teacher"]}, "student": {"path": paths["student"]},
              "tokenizer": paths["tokenizer"], "data": {"train": paths["data"], "max_length": 128},
              "output_dir": str(out),
              "training": {"num_train_epochs": 1, "per_device_train_batch_size": PER_DEVICE, "logging_steps": 1,
                           "save_strategy": "steps", "save_steps": 3, "seed": 0, "report_to": "none",
                           "disable_tqdm": True},
              "loss": {"divergence": "jsd", "temperature": 2.0, "use_logits_free": True}}
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               "-m", "distillkit.cli", "train", "--config", str(config_path)]
    try:
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"accelerate launch did not finish in {TIMEOUT_S} s:\n{exc.stderr}")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]

    steps = EXAMPLES // (PER_DEVICE * WORLD)  # a single process would take EXAMPLES // PER_DEVICE
    assert f"done: {steps} steps" in log, log[-6000:]
    assert log.count(f"{EXAMPLES} trajectories (0 skipped)") == WORLD, log[-6000:]  # every rank loaded the data
    assert log.count("(logits-free loss)") == 1  # the run's summary line: rank 0 only
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps and state["train_batch_size"] == PER_DEVICE
    for name in ("model.safetensors", "config.json", "distill_loss.safetensors"):
        assert (out / name).is_file(), name
