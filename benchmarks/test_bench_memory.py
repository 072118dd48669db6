"""Peak memory of one step above what was allocated before it (the inputs, the saved forward).

GPU: the CUDA caching allocator's peak (torch.cuda.max_memory_allocated). CPU: the peak RSS of a
fresh subprocess per measurement, its high-water mark reset after a warm-up step; only the
forward+backward mode on CPU (each mode is a subprocess of a few seconds).
"""

from __future__ import annotations

from bench_helpers import measurable, measured_peak

BENCH_KIND = "memory"


def test_peak_memory(case, provider_name, mode, device, matrix, writer):
    provider = measurable(provider_name, case, mode, device, matrix, writer, "peak_memory")
    unit_mib = case.unit_bytes / 2**20
    extra = measured_peak(provider, case, mode, device, writer)
    where = ("CUDA allocator peak above the level before the step" if device == "cuda"
             else "peak RSS of a fresh subprocess above its RSS before the step")
    writer.add(case, provider_name, mode, "peak_memory", extra / 2**20, "MiB",
               note=f"{where}; one [N, V] tensor = {unit_mib:.1f} MiB")

