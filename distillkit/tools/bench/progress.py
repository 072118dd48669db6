"""Progress of ``distillkit bench --run``: a pytest plugin in the suite's process, a bar in the CLI's.

The CLI runs ``pytest benchmarks/ -p distillkit.tools.bench.progress`` with $DISTILLKIT_BENCH_PROGRESS
naming a file, and sends the suite's own output to a log. The plugin appends one JSON line per event:

    {"total": N}                                after collection (the number of cases)
    {"start": NODEID}                           a case begins
    {"done": NODEID, "outcome": OUTCOME}        it ended: passed, skipped or failed

``run_pytest`` follows that file into a tqdm bar (one step per case) while the suite runs, and returns
the exit code and the log: the caller prints the log on failure, or with ``--verbose``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ENV = "DISTILLKIT_BENCH_PROGRESS"
PLUGIN = __name__

# -- the plugin (inside the pytest process) -----------------------------------------------------------

_state: dict = {"out": None, "outcome": {}}


def _emit(**event) -> None:
    out = _state["out"]
    if out is not None:
        out.write(json.dumps(event) + "\n")
        out.flush()


def pytest_configure(config) -> None:
    path = os.environ.get(ENV)
    _state["out"] = open(path, "a", encoding="utf-8") if path else None
    _state["outcome"] = {}


def pytest_collection_finish(session) -> None:
    _emit(total=len(session.items))


def pytest_runtest_logstart(nodeid, location) -> None:
    _emit(start=nodeid)


def pytest_runtest_logreport(report) -> None:
    outcomes = _state["outcome"]
    if report.failed:
        outcomes[report.nodeid] = "failed"
    elif report.skipped and outcomes.get(report.nodeid) != "failed":
        outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and report.nodeid not in outcomes:
        outcomes[report.nodeid] = "passed"


def pytest_runtest_logfinish(nodeid, location) -> None:
    _emit(done=nodeid, outcome=_state["outcome"].get(nodeid, "passed"))


def pytest_unconfigure(config) -> None:
    if _state["out"] is not None:
        _state["out"].close()
        _state["out"] = None


# -- the CLI side ------------------------------------------------------------------------------------

def case_name(nodeid: str) -> str:
    """`test_time[forward_kl-small-fp32-eager-forward+backward]` from the node id (no file path)."""
    return nodeid.rsplit("::", 1)[-1]


class Follower:
    """Reads the events appended to `path` so far (whole lines only) and moves `bar` (tqdm-like)."""

    def __init__(self, path: Path, bar):
        self.path, self.bar, self.offset, self.counts = Path(path), bar, 0, {}

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            try:
                self._event(json.loads(line))
            except (ValueError, AttributeError):
                continue  # not ours: ignore it

    def _event(self, event: dict) -> None:
        if "total" in event:
            self.bar.total = event["total"] or None  # 0: collected elsewhere (pytest-xdist), count only
            self.bar.refresh()
        elif "start" in event:
            self.bar.set_postfix_str(case_name(event["start"]), refresh=True)
        elif "done" in event:
            outcome = event.get("outcome", "passed")
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if outcome == "failed":
                self.bar.write(f"FAILED {case_name(event['done'])}", file=sys.stderr)
            self.bar.update(1)

    def summary(self) -> str:
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.counts.items())) or "no case ran"


def make_bar(desc: str = "bench", disable: bool = False):
    from tqdm import tqdm

    return tqdm(desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True, mininterval=0.5, disable=disable)


def run_pytest(cmd: list[str], cwd: Optional[str] = None, bar=None, poll_s: float = 0.2) -> tuple[int, str, str]:
    """Run `cmd` (a pytest command line; the plugin is added to it) with its output captured, moving `bar`
    (a tqdm-like object; default a tqdm on stderr) as cases finish. (exit code, output, case summary)."""
    bar = make_bar() if bar is None else bar
    with tempfile.TemporaryDirectory(prefix="distillkit-bench-") as tmp:
        events, log_path = Path(tmp) / "progress.jsonl", Path(tmp) / "pytest.log"
        env = dict(os.environ, **{ENV: str(events)})
        follower = Follower(events, bar)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*cmd, "-p", PLUGIN], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                while proc.poll() is None:
                    follower.poll()
                    time.sleep(poll_s)
            except KeyboardInterrupt:  # the suite got the SIGINT too: let it report, then hand its log back
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            finally:
                follower.poll()
                bar.close()
        output = log_path.read_text(encoding="utf-8", errors="replace")
    return proc.returncode, output, follower.summary()
