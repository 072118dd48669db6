"""Time per step (forward / backward / forward+backward) of every provider, with pytest-benchmark.

CUDA-synchronized on GPU. On CPU, Triton (interpreter) and Liger are skipped with the reason, and
torch.compile is limited to the ops in the matrix's compile_ops (compilation takes ~10 s a graph).
"""

from __future__ import annotations

import pytest
import torch
from bench_helpers import measurable

from distillkit.tools.bench import measure

BENCH_KIND = "time"


def test_time(benchmark, case, provider_name, mode, device, matrix, writer):
    provider = measurable(provider_name, case, mode, device, matrix, writer, "time")
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
        loss = measure.before_step(loss_fn, args, mode)
        measure.sync(device)
        return (loss, *args), {}

    def target(loss, *args):
        measure.step(loss_fn, args, mode, loss)
        measure.sync(device)

    rounds = 10 if device == "cuda" else 3
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is None:  # --benchmark-disable: one unmeasured run
        return
    writer.add(case, provider_name, mode, "time", stats.median * 1e3, "ms",
               note=f"median of {rounds} rounds (min {stats.min * 1e3:.3f} ms); {provider.note}")
