"""Benchmark rows: one per (op, provider, mode, shape, dtype, metric), written as JSON and CSV."""

from __future__ import annotations

import csv
import datetime
import functools
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

from .cases import Case

FIELDS = ["op", "provider", "mode", "shape", "n", "v", "nominal_n", "dtype", "metric", "value", "unit",
          "modeled", "status", "note", "device", "torch", "triton", "commit", "timestamp"]
DEFAULT_DIR = "bench-results"


def _git(*args: str) -> Optional[str]:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    commit = _git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {cpu_name()} ({cores} cores, {torch.get_num_threads()} torch threads)"


@functools.lru_cache(maxsize=None)
def environment(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit()}


class RowWriter:
    """Collects rows; `write` puts results.json and results.csv into a directory."""

    def __init__(self, device: str):
        self.device = device
        self.rows: list[dict] = []

    def add(self, case: Case, provider: str, mode: str, metric: str, value: Any, unit: str, *,
            modeled: bool = False, status: str = "ok", note: str = "") -> dict:
        row = {"op": case.op, "provider": provider, "mode": mode, "shape": case.shape, "n": case.n, "v": case.v,
               "nominal_n": case.nominal_n or case.n, "dtype": case.dtype, "metric": metric, "value": value,
               "unit": unit, "modeled": modeled, "status": status, "note": note,
               **environment(self.device),
               "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.rows.append(row)
        return row

    def skip(self, case: Case, provider: str, mode: str, metric: str, reason: str) -> dict:
        return self.add(case, provider, mode, metric, None, "", status="skipped", note=reason)

    def write(self, directory: str | os.PathLike = DEFAULT_DIR, stem: str = "results") -> tuple[Path, Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
        json_path.write_text(json.dumps({"rows": self.rows}, indent=1) + "\n")
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        return json_path, csv_path


def read_rows(directory: str | os.PathLike = DEFAULT_DIR, stem: str = "results") -> list[dict]:
    path = Path(directory) / f"{stem}.json"
    return json.loads(path.read_text())["rows"]
