"""The CLI's presentation: `distillkit --help` (one line per command), `distillkit kernels` (full variants,
divergence and tail names) and `distillkit bench --run` (a progress bar; pytest's output only with --verbose
or on failure). No kernel is compiled and the real benchmark suite is not run: the kernel table is checked
on synthetic rows and `--run` on a three-case stand-in suite."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from distillkit import cli
from distillkit.core import divergences
from distillkit.sparse.tails import TAIL_REGISTRY
from distillkit.tools import cuda_report, kernel_report
from distillkit.tools.bench import progress, report

ROOT = Path(__file__).resolve().parents[2]


# -- distillkit --help ---------------------------------------------------------------------------------

def test_help_lists_every_command_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    listing, epilog = out.split("\n\n")[-2:]
    assert set(cli.USAGE) == set(cli.COMMANDS)
    for name, (_, help_text) in cli.COMMANDS.items():
        lines = [line for line in listing.splitlines() if line.split()[:1] == [name]]
        assert len(lines) == 1, (name, listing)
        assert lines[0].split(None, 1)[1] == help_text  # the whole one-liner on the command's line
        assert [line for line in epilog.splitlines() if line.split()[:2] == ["distillkit", name]], (name, epilog)
    assert all(len(line) <= 80 for line in listing.splitlines())
    # every listing line is a command (or the COMMAND heading): nothing wrapped onto a line of its own
    assert {line.split()[0] for line in listing.splitlines()[1:]} <= {"COMMAND", *cli.COMMANDS}


# -- distillkit kernels ------------------------------------------------------------------------------

def _synthetic_rows():
    specs = kernel_report.shipped_specializations()
    rows = [kernel_report.KernelResources(s.kernel, s.variant, f"sm_{a}", 64, 0, 0, 1024, s.num_warps, 0.5)
            for s in specs for a in kernel_report.ARCHS]
    return specs, rows


def test_kernels_table_rows_are_distinct_and_name_divergences_and_tails():
    specs, rows = _synthetic_rows()
    lines = kernel_report.format_table(rows).splitlines()[2:]
    assert len(lines) == len(rows) and len(set(lines)) == len(lines)  # nothing cut: no two rows alike
    for row, line in zip(rows, lines):
        assert cuda_report.readable_variant(row.variant) in line
    text = "\n".join(lines)
    assert not re.search(r"\bDIVERGENCE=\d", text) and not re.search(r"\bTAIL=\d", text)
    for name in divergences.NAMES:
        assert f"DIVERGENCE={name} " in text, name
    topk = [line for line in lines if line.startswith("topk_")]
    for tail in TAIL_REGISTRY:
        assert any(f"TAIL={tail.name} " in line for line in topk), tail.name
    for dtype in kernel_report.DTYPES:  # the dtype part, which a fixed-width column used to cut off
        assert any(f"student={dtype}" in line and "BLOCK_K=1024" in line for line in topk), dtype


def test_cuda_variants_read_names_and_dtypes():
    assert cuda_report.readable_variant("div=7 student=__nv_bfloat16 teacher=float") == \
        "div=alpha_beta student=bf16 teacher=fp32"
    assert cuda_report.readable_variant("div=0 student=__half teacher=__half") == "div=none student=fp16 teacher=fp16"
    assert cuda_report.readable_variant("DIVERGENCE=99 TAIL=99") == "DIVERGENCE=99 TAIL=99"  # unknown: as is
    rows = [{"kernel": "forward_stream_kernel", "variant": f"div={i} student=float teacher=__half", "arch": "sm_90",
             "registers": 40, "spill_stores": 0, "spill_loads": 0, "local_bytes": 0, "shared_bytes": 1536}
            for i in range(divergences.MAX_ID + 1)]
    table = cuda_report.format_table(rows)
    for d in divergences.REGISTRY:
        assert f"div={d.name} student=fp32 teacher=fp16" in table


# -- distillkit bench --run ----------------------------------------------------------------------------

class FakeBar:
    def __init__(self):
        self.total, self.n, self.postfix, self.written, self.closed = None, 0, "", [], False

    def refresh(self):
        pass

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s

    def update(self, n=1):
        self.n += n

    def write(self, s, file=None):
        self.written.append(s)

    def close(self):
        self.closed = True


def _report(nodeid, when, outcome):
    return SimpleNamespace(nodeid=nodeid, when=when, failed=outcome == "failed", skipped=outcome == "skipped")


def test_progress_plugin_events_move_the_bar(tmp_path, monkeypatch):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.ENV, str(events))
    progress.pytest_configure(None)
    progress.pytest_collection_finish(SimpleNamespace(items=[1, 2, 3]))
    for nodeid, phases in [("a.py::test_ok", ["passed"] * 3), ("a.py::test_skip", ["skipped"]),
                           ("a.py::test_bad[x]", ["passed", "failed", "passed"])]:
        progress.pytest_runtest_logstart(nodeid, None)
        for when, outcome in zip(("setup", "call", "teardown"), phases):
            progress.pytest_runtest_logreport(_report(nodeid, when, outcome))
        progress.pytest_runtest_logfinish(nodeid, None)
    progress.pytest_unconfigure(None)
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[0] == {"total": 3} and [e["outcome"] for e in lines if "done" in e] == ["passed", "skipped", "failed"]

    bar = FakeBar()
    follower = progress.Follower(events, bar)
    follower.poll()
    assert (bar.total, bar.n, bar.postfix) == (3, 3, "test_bad[x]")
    assert bar.written == ["FAILED test_bad[x]"]
    assert follower.summary() == "1 failed, 1 passed, 1 skipped"
    with open(events, "a") as f:
        f.write('{"start": "a.py::test_half')  # a line still being written is left for the next poll
    follower.poll()
    assert bar.postfix == "test_bad[x]"


STAND_IN_CONFTEST = """
    import os
    from distillkit.tools.bench.cases import Case
    from distillkit.tools.bench.rows import RowWriter

    def pytest_addoption(parser):
        parser.addoption("--bench-size", default="default")
        parser.addoption("--bench-dir", default="bench-results")

    def pytest_sessionfinish(session, exitstatus):
        writer = RowWriter("cpu")
        writer.add(Case("forward_kl", 8, 16, "fp32", "small", 8), "eager", "forward+backward", "time", 1.5, "ms")
        writer.write(session.config.getoption("--bench-dir"))
"""
STAND_IN_TESTS = """
    import os
    import pytest

    def test_timed(benchmark):
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)

    def test_skipped():
        pytest.skip("not here")

    def test_maybe_broken():
        assert not os.environ.get("STAND_IN_FAIL"), "the stand-in suite failed on purpose"
"""


@pytest.fixture
def stand_in_suite(tmp_path, monkeypatch):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "conftest.py").write_text(textwrap.dedent(STAND_IN_CONFTEST))
    (bench / "test_stand_in.py").write_text(textwrap.dedent(STAND_IN_TESTS))
    monkeypatch.setattr(report, "benchmarks_dir", lambda: bench)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("COLUMNS", "100")
    return str(tmp_path / "results")


NO_HYPOTHESIS = ["-p", "no:hypothesispytest"]  # passed through to pytest: 1.5 s less to start the stand-in


def test_bench_run_shows_progress_and_only_distillkit_tables(stand_in_suite, capsys):
    assert report.main(["--run", "--results", stand_in_suite, *NO_HYPOTHESIS]) == 0
    out, err = capsys.readouterr()
    assert "forward_kl, fp32, forward+backward, N=8 V=16" in out and "eager" in out  # distillkit's table
    assert "Name (time in" not in out + err and "running:" not in out  # not pytest-benchmark's, nor pytest's
    assert "3/3" in err and "bench: 2 passed, 1 skipped in" in err  # the bar and the summary


def test_bench_run_failure_shows_the_error_and_exits_non_zero(stand_in_suite, capsys, monkeypatch):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    code = report.main(["--run", "--results", stand_in_suite, *NO_HYPOTHESIS])
    out, err = capsys.readouterr()
    assert code == 1
    assert "the stand-in suite failed on purpose" in err and "FAILED test_maybe_broken" in err
    assert "exited 1 (1 failed, 1 passed, 1 skipped)" in err
    assert "Name (time in" not in err  # pytest-benchmark's tables stay quiet, the failure does not
    assert "forward_kl, fp32" not in out  # no tables after a failed run


def test_bench_run_verbose_prints_pytest_output_before_the_tables(stand_in_suite, capsys, monkeypatch):
    seen = {}

    def fake_run(cmd, cwd=None, bar=None, poll_s=0.2):
        seen["cmd"] = cmd
        from distillkit.tools.bench.cases import Case
        from distillkit.tools.bench.rows import RowWriter

        writer = RowWriter("cpu")
        writer.add(Case("jsd", 8, 16, "fp32", "small", 8), "eager", "forward+backward", "time", 1.0, "ms")
        writer.write(stand_in_suite)
        bar.close()
        return 0, "Name (time in ms)   Min   Max\n3 passed", "3 passed"

    monkeypatch.setattr(progress, "run_pytest", fake_run)
    assert report.main(["--run", "--verbose", "--no-progress", "--results", stand_in_suite]) == 0
    out, err = capsys.readouterr()
    assert "--benchmark-quiet" not in seen["cmd"] and "--benchmark-columns=min,median,max,rounds" in seen["cmd"]
    assert out.index("running:") < out.index("Name (time in") < out.index("jsd, fp32, forward+backward")
    assert "|" not in err  # --no-progress: no bar
    quiet = report.suite_command(Path("benchmarks"), "out", "quick", ["--benchmark-columns=mean"], verbose=False)
    assert "--benchmark-quiet" in quiet and quiet[-1] == "--benchmark-columns=mean"
