"""Measurements: time, peak memory, traffic, bandwidth and the modeled H100 roofline.

- time: median wall time, CUDA-synchronized on GPU (the pytest suite uses pytest-benchmark; the
  CLI uses ``time_step``).
- peak memory: on GPU the caching allocator's peak above what was allocated before the step; on
  CPU the peak RSS of a fresh subprocess (``peak_rss``) above its RSS before the step: after one
  warm-up step the kernel's high-water mark is reset (/proc/self/clear_refs) so only the measured
  step counts, and glibc is told to give large blocks back (MALLOC_MMAP_THRESHOLD_).
- traffic: ``count_traffic`` (distillkit.tools.traffic) in a subprocess with TRITON_INTERPRET=1 at a small
  N; expressed in units of one [N, V] tensor, which do not depend on N beyond per-row scalars.
- modeled roofline: bytes / 3.35 TB/s (H100 SXM HBM3), labelled modeled wherever no GPU ran.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

from . import providers as P
from .cases import Case, make_inputs

H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM5 HBM3 (the modeled roofline)
# Peak DRAM bandwidth by device-name substring (bytes/s), for "fraction of peak" on a real GPU.
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
                  ("GH200", 4.0e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12),
                  ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("A10", 0.6e12),
                  ("V100", 0.9e12), ("RTX 4090", 1.008e12), ("RTX 3090", 0.936e12), ("T4", 0.32e12)]
TRAFFIC_N = 4  # rows used to count traffic (units are per [N, V] tensor)
RESULT_MARK = "DISTILLKIT_BENCH_RESULT "


def peak_bandwidth(device_name: str) -> Optional[float]:
    for key, bandwidth in PEAK_BANDWIDTH:
        if key in device_name:
            return bandwidth
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- one step of a mode -------------------------------------------------------------------------

def prepare(provider: P.Provider, case: Case, device: str):
    """(loss_fn, inputs) for case on device."""
    return provider.build(case), make_inputs(case, device)


def fresh_student(inputs):
    """The inputs with fresh leaves for the tensors that receive gradients."""
    return tuple(x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.requires_grad else x
                 for x in inputs)


def step(loss_fn, args, mode: str, loss=None):
    """The measured part of one step: backward of the given forward's `loss` ("backward"), or the forward
    (and its backward for "forward+backward")."""
    if mode == "backward":
        loss.backward()
        return loss
    loss = loss_fn(*args)
    if mode == "forward+backward":
        loss.backward()
    return loss


def before_step(loss_fn, args, mode: str):
    """What a step of `mode` starts from: the forward's loss for "backward" (not measured), else None."""
    return loss_fn(*args) if mode == "backward" else None


def run_mode(loss_fn, inputs, mode: str, device: str):
    """Run one step of `mode` outside any timer (warm-up)."""
    args = fresh_student(inputs)
    loss = loss_fn(*args)
    if mode != "forward":
        loss.backward()
    sync(device)
    return loss


def time_step(loss_fn, inputs, mode: str, device: str, *, rounds: int = 5, warmup: int = 1) -> dict:
    """Median / min seconds of one step of `mode` (forward; backward alone; forward+backward)."""
    for _ in range(warmup):
        run_mode(loss_fn, inputs, mode, device)
    times = []
    for _ in range(rounds):
        args = fresh_student(inputs)
        loss = before_step(loss_fn, args, mode)
        sync(device)
        start = time.perf_counter()
        step(loss_fn, args, mode, loss)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "rounds": rounds}


# -- peak memory --------------------------------------------------------------------------------

def cuda_peak(loss_fn, inputs, mode: str) -> float:
    """Peak bytes allocated above the level before the step (after one warm-up)."""
    run_mode(loss_fn, inputs, mode, "cuda")
    args = fresh_student(inputs)
    loss = before_step(loss_fn, args, mode)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(loss_fn, args, mode, loss)
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_step(loss_fn, inputs, mode: str) -> dict:
    """In the child: peak RSS above the RSS before one step (after a warm-up where HWM can be reset)."""
    can_reset = _reset_hwm()
    if can_reset:
        run_mode(loss_fn, inputs, mode, "cpu")
    if mode == "backward" and not can_reset:
        return {"error": "backward-only peak RSS needs /proc/self/clear_refs (high-water mark reset)"}
    args = fresh_student(inputs)
    loss = before_step(loss_fn, args, mode)
    gc.collect()
    if can_reset:
        _reset_hwm()
    base = _status_kib("VmRSS") if can_reset else _status_kib("VmHWM")
    step(loss_fn, args, mode, loss)
    peak = _status_kib("VmHWM")
    return {"base_kib": base, "peak_kib": peak, "extra_bytes": (peak - base) * 1024, "warmed_up": can_reset}


# -- subprocess runner ----------------------------------------------------------------------------

def run_child(spec: dict, *, env: Optional[dict] = None, timeout: float = 600) -> dict:
    """Run distillkit.tools.bench.child with `spec` in a fresh interpreter; its result dict (or {'error': ...})."""
    child_env = dict(os.environ)
    child_env.update({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
                      "PYTHONWARNINGS": "ignore"})
    child_env.update(env or {})
    try:
        proc = subprocess.run([sys.executable, "-m", "distillkit.tools.bench.child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=child_env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"child exited {proc.returncode}: {' | '.join(tail)}"[:400]}


def peak_rss(provider: str, case: Case, mode: str, timeout: float = 600) -> dict:
    """Peak RSS of one step in a fresh CPU subprocess: {'extra_bytes': ..} or {'error': ..}."""
    return run_child({"task": "rss", "provider": provider, "case": case.as_dict(), "mode": mode}, timeout=timeout)


def peak_memory(provider: P.Provider, case: Case, mode: str, device: str) -> dict:
    """Bytes above the inputs at the peak of one step: {'extra_bytes': ..}, or {'oom': message} (CUDA) or
    {'error': message} (the CPU child failed). CUDA: the allocator's peak above the level before the step;
    CPU: the peak RSS of a fresh subprocess above its RSS before the step."""
    if device != "cuda":
        return peak_rss(provider.name, case, mode)
    try:
        loss_fn, inputs = prepare(provider, case, device)
        return {"extra_bytes": cuda_peak(loss_fn, inputs, mode)}
    except torch.cuda.OutOfMemoryError as exc:
        return {"oom": str(exc).splitlines()[0]}


def traffic_in_subprocess(provider: str, cases: list[Case], timeout: float = 900) -> dict:
    """Traffic of each case (forward, backward) counted in a TRITON_INTERPRET=1 subprocess.

    Returns {case.label: {"forward": {...}, "backward": {...}} or {"error": ...}}."""
    spec = {"task": "traffic", "provider": provider, "cases": [c.as_dict() for c in cases]}
    result = run_child(spec, env={"TRITON_INTERPRET": "1"}, timeout=timeout)
    if "error" in result and len(result) == 1:
        return {c.label: {"error": result["error"]} for c in cases}
    return result


def count_case(loss_fn: Callable, case: Case) -> dict:
    """Forward and backward traffic of one CPU step, in bytes and units of one [N, V] tensor."""
    from ..traffic import count_traffic

    args = make_inputs(case, "cpu")
    with count_traffic() as forward:
        loss = loss_fn(*args)
    with count_traffic() as backward:
        loss.backward()
    return {"forward": forward.as_dict(case.unit_bytes), "backward": backward.as_dict(case.unit_bytes),
            "loss": float(loss)}


def modeled_seconds(units: float, case: Case) -> float:
    """Roofline time on an H100 at the case's nominal shape: bytes / 3.35 TB/s (modeled, not measured)."""
    return units * case.nominal_unit_bytes / H100_BANDWIDTH
