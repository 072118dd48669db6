"""Time per step (forward / backward / forward+backward) of every provider, with pytest-benchmark.

CUDA-synchronized on GPU. On CPU, Triton (interpreter) and Liger are skipped with the reason, and
torch.compile is limited to the ops in the matrix's compile_ops (compilation takes ~10 s a graph).
"""

from __future__ import annotations

import pytest
import torch

from distillkit.tools.bench import measure
from distillkit.tools.bench.providers import get

BENCH_KIND = "time"


def test_time(benchmark, case, provider_name, mode, device, matrix, writer):
    provider = get(provider_name)
    reason = provider.unavailable(case, device, "time")
    if reason is None and provider.kind == "compile" and case.op not in matrix["compile_ops"]:
        reason = f"torch.compile timed only for {matrix['compile_ops']} at this --bench-size (compile time)"
    if reason:
        writer.skip(case, provider_name, mode, "time", reason)
        pytest.skip(reason)
    benchmark.group = f"{case.op} {case.n}x{case.v} {case.dtype} {mode}"
    benchmark.extra_info.update(case.as_dict(), provider=provider_name, mode=mode)
    try:
        loss_fn, inputs = measure.prepare(provider, case, device)
        measure.run_mode(loss_fn, inputs, mode, device)  # warm-up (and compilation)
    except torch.cuda.OutOfMemoryError as exc:
        writer.add(case, provider_name, mode, "time", None, "ms", status="oom", note=str(exc).splitlines()[0])
        pytest.skip("out of memory")

    def setup():
        args = measure.fresh_student(inputs)
        if mode == "backward":
            loss = loss_fn(*args)
            measure.sync(device)
            return (loss, *args), {}
        measure.sync(device)
        return (None, *args), {}

    def target(loss, *args):
        if mode == "backward":
            loss.backward()
        else:
            loss = loss_fn(*args)
            if mode == "forward+backward":
                loss.backward()
        measure.sync(device)

    rounds = 10 if device == "cuda" else 3
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is None:  # --benchmark-disable: one unmeasured run
        return
    writer.add(case, provider_name, mode, "time", stats.median * 1e3, "ms",
               note=f"median of {rounds} rounds (min {stats.min * 1e3:.3f} ms); {provider.note}")
