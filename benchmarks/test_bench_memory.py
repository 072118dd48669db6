"""Peak memory of one step above what was allocated before it (the inputs, the saved forward).

GPU: the CUDA caching allocator's peak (torch.cuda.max_memory_allocated). CPU: the peak RSS of a
fresh subprocess per measurement, its high-water mark reset after a warm-up step; only the
forward+backward mode on CPU (each mode is a subprocess of a few seconds).
"""

from __future__ import annotations

import pytest
import torch

from distillkit.tools.bench import measure
from distillkit.tools.bench.providers import get

BENCH_KIND = "memory"


def test_peak_memory(case, provider_name, mode, device, matrix, writer):
    provider = get(provider_name)
    reason = provider.unavailable(case, device, "memory")
    if reason is None and provider.kind == "compile" and case.op not in matrix["compile_ops"]:
        reason = f"torch.compile measured only for {matrix['compile_ops']} at this --bench-size (compile time)"
    if reason:
        writer.skip(case, provider_name, mode, "peak_memory", reason)
        pytest.skip(reason)
    unit_mib = case.unit_bytes / 2**20
    if device == "cuda":
        try:
            loss_fn, inputs = measure.prepare(provider, case, device)
            extra = measure.cuda_peak(loss_fn, inputs, mode)
        except torch.cuda.OutOfMemoryError as exc:
            writer.add(case, provider_name, mode, "peak_memory", None, "MiB", status="oom",
                       note=str(exc).splitlines()[0])
            pytest.skip("out of memory")
        note = f"CUDA allocator peak above the level before the step; one [N, V] tensor = {unit_mib:.1f} MiB"
    else:
        result = measure.peak_rss(provider_name, case, mode)
        if "error" in result:
            writer.skip(case, provider_name, mode, "peak_memory", result["error"])
            pytest.skip(result["error"])
        extra = result["extra_bytes"]
        note = (f"peak RSS of a fresh subprocess above its RSS before the step; one [N, V] tensor = "
                f"{unit_mib:.1f} MiB")
    writer.add(case, provider_name, mode, "peak_memory", extra / 2**20, "MiB", note=note)
