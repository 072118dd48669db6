"""Global-memory traffic per step, in units of one [N, V] logits tensor (N * V * elem bytes).

Counted in a subprocess with TRITON_INTERPRET=1 (distillkit.tools.traffic): Triton kernels lane by lane,
PyTorch ops by the bytes of their input and output tensors, at N = measure.TRAFFIC_N rows and the
case's vocabulary. conftest turns each count into a modeled H100 roofline time (bytes / 3.35 TB/s
at the nominal shape) and, on a GPU, into achieved bandwidth.
"""

from __future__ import annotations

import pytest

from distillkit.tools.bench import measure
from distillkit.tools.bench.cases import make_case
from distillkit.tools.bench.providers import get

BENCH_KIND = "traffic"


def test_traffic(provider_name, device, matrix, writer):
    provider = get(provider_name)
    cases = [make_case(op, shape, dtype, device) for shape in matrix["traffic_shapes"]
             for dtype in matrix["dtypes"] for op in matrix["traffic_ops"]]
    runnable = []
    for case in cases:
        reason = provider.unavailable(case, "cpu", "traffic")
        if reason:
            for mode in ("forward", "backward", "forward+backward"):
                writer.skip(case, provider_name, mode, "traffic_units", reason)
        else:
            runnable.append(case)
    if not runnable:
        pytest.skip(f"{provider_name}: no case to count")
    counted = {c.label: c for c in (case.with_n(min(case.n, measure.TRAFFIC_N)) for case in runnable)}
    results = measure.traffic_in_subprocess(provider_name, list(counted.values()))
    measured = 0
    for label, small in counted.items():
        case = next(c for c in runnable if c.with_n(small.n).label == label)
        result = results.get(label, {"error": "no result"})
        if "error" in result:
            for mode in ("forward", "backward", "forward+backward"):
                writer.skip(case, provider_name, mode, "traffic_units", result["error"])
            continue
        fwd, bwd = result["forward"], result["backward"]
        per_mode = {"forward": fwd["units"], "backward": bwd["units"], "forward+backward": fwd["units"] + bwd["units"]}
        kernel = (fwd["kernel_read"] + fwd["kernel_written"] + bwd["kernel_read"] + bwd["kernel_written"]) / small.unit_bytes
        for mode, units in per_mode.items():
            writer.add(case, provider_name, mode, "traffic_units", units, "units",
                       note=f"counted at N={small.n} (Triton lanes + ATen tensor bytes; forward+backward: "
                            f"{kernel:.3f} units in Triton kernels); {provider.note}")
        measured += 1
    assert measured, f"{provider_name}: every case failed: {results}"
