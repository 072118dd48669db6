"""`distillkit compare`: the quick sweep passes and prints its table; a broken backend fails it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from distillkit import cli
from distillkit.tools import compare
from distillkit.core.backends import torch_rows


def test_compare_quick_passes_in_process(capsys, tmp_path):
    out = tmp_path / "compare.json"
    code = cli.main(["compare", "--quick", "--no-progress", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "backend" in printed and "grad abs" in printed and "summary:" in printed
    report = json.loads(out.read_text())
    assert report["summary"]["failed"] == 0 and report["summary"]["passed"] == report["summary"]["cases"] > 0
    ran = {r["backend"] for r in report["results"]}
    assert "torch" in ran
    if os.environ.get("TRITON_INTERPRET") == "1":  # tests/conftest.py sets it: Triton runs in the interpreter
        assert "triton" in ran and "Triton interpreter" in printed
    for divergence in compare.QUICK_DIVERGENCES:
        assert any(line.split()[1:2] == [divergence] for line in printed.splitlines()), divergence


def test_compare_fails_on_a_broken_gradient(monkeypatch, capsys):
    original = torch_rows.backward

    def broken_backward(*args, **kwargs):
        grad = original(*args, **kwargs)
        return grad * 1.01  # 1% off: far outside every tolerance

    monkeypatch.setattr(torch_rows, "backward", broken_backward)
    code = cli.main(["compare", "--quick", "--no-progress", "--backend", "torch"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in printed and "grad" in printed
    assert "summary: 0 passed" in printed


def test_compare_fails_on_a_broken_loss(monkeypatch, capsys):
    original = torch_rows.forward

    def broken_forward(*args, **kwargs):
        div, ce, stats = original(*args, **kwargs)
        return div, ce + 1e-3, stats

    monkeypatch.setattr(torch_rows, "forward", broken_forward)
    assert cli.main(["compare", "--quick", "--no-progress", "--backend", "torch"]) == 1
    assert "loss:" in capsys.readouterr().out


def test_compare_console_entry_point_subprocess():
    """`python -m distillkit compare --quick` as a user runs it (torch backend only, to stay small)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "distillkit", "compare", "--quick", "--backend", "torch"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "summary:" in proc.stdout and "0 failed" in proc.stdout
    assert "set TRITON_INTERPRET=1" in proc.stdout  # says why Triton is not in the CPU sweep
    assert "compare" in proc.stderr  # the progress bar


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "compare" in capsys.readouterr().out


def test_cli_missing_subcommand_module_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "env", ("distillkit._no_such_module", "x"))
    assert cli.main(["env"]) == 2
    assert "not available" in capsys.readouterr().err


def test_cuda_device_without_gpu_is_an_error(capsys):
    if torch.cuda.is_available():
        return
    assert cli.main(["compare", "--device", "cuda", "--quick"]) == 2
