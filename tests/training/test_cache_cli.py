"""`distillkit cache-teacher` on the tiny workspace (examples/make_tiny.py): end to end, config errors (exit 2
naming the key), a run killed with SIGKILL and finished with --resume, and two processes with torchrun's
environment (gloo) writing one cache."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from helpers import free_port, launch_env, worker_process
from trainer_helpers import make_tiny

from distillkit import cli as dispatcher
from distillkit.sparse.teacher_cache import INDEX_FILE, TeacherCache, load_index
from distillkit.training import cache_cli
from distillkit.training.cli import load_examples, load_tokenizer
from distillkit.training.run_config import load_config

SUMMARY = re.compile(r"cache-teacher: (\d+) examples, (\d+) tokens, ([\d.]+) bytes/token \(k=(\d+), (topk|sample)\), "
                     r"cache size ([\d.]+ (?:B|KiB|MiB|GiB)) in (.+), wall time ([\d.]+) s")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The workspace with its models, and the YAML of `distillkit train` for it."""
    folder = tmp_path_factory.mktemp("tiny")
    paths = make_tiny.build_workspace(folder, n_trajectories=12)
    config = {"teacher": {"path": paths["teacher"]}, "student": {"path": paths["student"]},
              "tokenizer": paths["tokenizer"], "data": {"train": paths["data"], "max_length": 128},
              "output_dir": str(folder / "run"), "training": {"max_steps": 1}}
    return folder, config


def write_config(folder, config, **sections) -> str:
    path = os.path.join(folder, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({**config, **sections}, f)
    return path


def run_cli(capsys, *argv):
    code = cache_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def files_of(path):
    """{name: bytes} of the index and every shard it lists."""
    index = load_index(str(path))
    names = [INDEX_FILE] + [s["file"] for s in index["shards"]]
    return {name: open(os.path.join(path, name), "rb").read() for name in names}


def same_examples(a: TeacherCache, b: TeacherCache) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for i in range(len(a))
                                    for x, y in zip(a.example(i), b.example(i)))


def test_end_to_end(tiny, tmp_path, capsys):
    folder, config = tiny
    yaml_path = write_config(tmp_path, config)
    code, out, err = run_cli(capsys, "--config", yaml_path, "--out", tmp_path / "cache", "--k", 8, "--batch-size", 4)
    assert code == 0, err
    summary = SUMMARY.fullmatch(out.strip().splitlines()[-1])
    assert summary, out
    assert "tok/s" in err  # the progress bar

    resolved = load_config(yaml_path)
    examples = load_examples(resolved["data"], "train", load_tokenizer(resolved["tokenizer"]))
    cache = TeacherCache(str(tmp_path / "cache"))
    assert len(cache) == len(examples) == int(summary[1])
    assert cache.seq_lengths == [len(e["input_ids"]) for e in examples]
    assert int(summary[2]) == sum(cache.seq_lengths) and int(summary[4]) == 8 and summary[5] == "topk"
    assert 4 * 8 <= float(summary[3]) <= 4 * 8 + 8  # 4 K bytes per token, plus the shard headers

    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(config["teacher"]["path"]).eval()
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([examples[3]["input_ids"]])).logits[0]
    assert torch.equal(cache.example(3)[0].long(), logits.log_softmax(-1).topk(8, -1).indices)


def test_out_defaults_to_teacher_cache_and_sample_mode(tiny, tmp_path, capsys):
    folder, config = tiny
    yaml_path = write_config(tmp_path, config, teacher={**config["teacher"], "cache": "cache"})
    code, out, err = run_cli(capsys, "--config", yaml_path, "--k", 4, "--mode", "sample", "--seed", 5)
    assert code == 0, err
    cache = TeacherCache(str(tmp_path / "cache"))  # teacher.cache is relative to the YAML
    assert (cache.mode, cache.seed, cache.k) == ("sample", 5, 4)


@pytest.mark.parametrize("options, teacher, key", [
    pytest.param(["--k", 0], None, "--k: must be an integer >= 1; got 0", id="k-zero"),
    pytest.param(["--k", 100000], None, "--k: must be <= the teacher's vocabulary", id="k-above-vocab"),
    pytest.param(["--k", 4, "--mode", "greedy"], None, "--mode: must be one of ['topk', 'sample']", id="mode"),
    pytest.param(["--k", 4, "--temperature", 0], None, "--temperature: must be a finite number > 0", id="temperature"),
    pytest.param(["--k", 4, "--resume", "--overwrite"], None, "--resume: ", id="resume-and-overwrite"),
    pytest.param(["--k", 4], {"cache": "c"}, "teacher.path: is required: cache-teacher runs the teacher model",
                 id="teacher-cache-only"),
    pytest.param(["--k", 4], {"dtype": "float32"}, "teacher: give exactly one of path", id="teacher-no-model"),
    pytest.param(["--k", 4, "--set", "data.max_length=0"], None, "data.max_length: must be >= 1", id="set"),
    pytest.param(["--k", 4, "--set", "teacher.path=/nonexistent"], None, "teacher.path: /nonexistent does not exist",
                 id="teacher-path-missing"),
])
def test_config_errors_exit_2_naming_the_key(tiny, tmp_path, capsys, options, teacher, key):
    folder, config = tiny
    yaml_path = write_config(tmp_path, config, **({"teacher": teacher} if teacher else {}))
    code, out, err = run_cli(capsys, "--config", yaml_path, "--out", tmp_path / "cache", *options)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("distillkit cache-teacher: error: ")]
    assert len(lines) == 1 and key in lines[0], err
    assert "Traceback" not in err


def test_out_is_required_without_teacher_cache(tiny, tmp_path, capsys):
    code, _, err = run_cli(capsys, "--config", write_config(tmp_path, tiny[1]), "--k", 4)
    assert code == 2 and "--out: is required (or set teacher.cache in the YAML)" in err


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    from distillkit.training import cache_cli

    class KillAfterTwoBatches:  # in place of the progress bar: kill -9 this process mid-write
        def __init__(self):
            self.batches = 0
        def reset(self, total=None):
            pass
        def update(self, tokens):
            self.batches += 1
            if self.batches == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        def close(self):
            pass

    torch.set_num_threads(1)  # as in the test process: the same floating-point sums
    cache_cli.progress_bar = KillAfterTwoBatches
    sys.exit(cache_cli.main(sys.argv[1:]))
""")


def test_killed_run_finished_with_resume_equals_an_uninterrupted_run(tiny, tmp_path, capsys):
    yaml_path = write_config(tmp_path, tiny[1])
    options = ["--config", yaml_path, "--k", 8, "--mode", "sample", "--batch-size", 3, "--tokens-per-shard", 1]
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, *map(str, options), "--out", tmp_path / "cut"],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = load_index(str(tmp_path / "cut"), allow_incomplete=True)
    assert partial["complete"] is False and len(partial["shards"]) == 2  # a shard per batch here

    code, _, err = run_cli(capsys, *options, "--out", tmp_path / "cut")
    assert code == 2 and "--resume" in err
    code, out, err = run_cli(capsys, *options, "--out", tmp_path / "cut", "--resume")
    assert code == 0 and SUMMARY.fullmatch(out.strip()), err
    assert run_cli(capsys, *options, "--out", tmp_path / "whole")[0] == 0
    assert files_of(tmp_path / "cut") == files_of(tmp_path / "whole")

    code, _, err = run_cli(capsys, *options, "--seed", 1, "--out", tmp_path / "cut", "--resume")
    assert code == 2 and "field 'seed': the cache was written with 0, this write asks for 1" in err


def _torchrun_worker(rank, world, port, argv):
    launch_env(rank, world, port)
    with worker_process():
        code = cache_cli.main(argv)
        assert code == 0, f"rank {rank}: exit {code}"


def test_two_processes_write_one_cache(tiny, tmp_path, capsys):
    yaml_path = write_config(tmp_path, tiny[1])
    options = ["--config", yaml_path, "--k", 8, "--batch-size", 2, "--tokens-per-shard", 64]
    mp.spawn(_torchrun_worker, args=(2, free_port(), [*map(str, options), "--out", str(tmp_path / "split")]),
             nprocs=2, join=True)
    assert run_cli(capsys, *options, "--out", tmp_path / "one")[0] == 0
    split, one = TeacherCache(str(tmp_path / "split")), TeacherCache(str(tmp_path / "one"))
    assert {s["file"].split("-")[1] for s in split.index["shards"]} == {"rank00000", "rank00001"}
    assert same_examples(split, one)


def test_distillkit_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        dispatcher.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    description = out.split("\n\n")[1]
    for name in dispatcher.COMMANDS:
        assert name in description and f"distillkit {name}" in out, name
    assert dispatcher.COMMANDS["cache-teacher"][0] == "distillkit.training.cache_cli"
