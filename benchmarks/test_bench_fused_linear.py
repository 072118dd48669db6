"""Fused-linear JSD (hidden states and LM heads in, loss out): distillkit's logits-free loss, eager
matmuls + reference (materializes the logits) and Liger's chunked loss, on time and peak memory.

Op "fused_linear_jsd": 0.5 * CE + 0.5 * JSD(beta=0.5), T = 1 (Liger's defaults). Shape: the
published Liger shape (N=8192, H=4096, V=128256) on GPU; N=512, H=128, V=16000 on CPU.
"""

from __future__ import annotations

import pytest
import torch
from bench_helpers import measured_peak

from distillkit.tools.bench import measure
from distillkit.tools.bench.cases import make_linear_case
from distillkit.tools.bench.providers import fused_linear_providers

PROVIDERS = [p.name for p in fused_linear_providers()]
PROVIDER = {p.name: p for p in fused_linear_providers()}


@pytest.fixture(params=["fp32"])
def linear_case(request, device):
    return make_linear_case("peer", request.param, device)


def _reason(provider, case, device, metric):
    return provider.unavailable(case, device, metric)


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_fused_linear_time(benchmark, linear_case, provider_name, device, writer):
    provider, case, mode = PROVIDER[provider_name], linear_case, "forward+backward"
    reason = _reason(provider, case, device, "time")
    if reason:
        writer.skip(case, provider_name, mode, "time", reason)
        pytest.skip(reason)
    benchmark.group = f"fused_linear_jsd {case.n}x{case.hidden}x{case.v} {case.dtype}"
    try:
        loss_fn, inputs = measure.prepare(provider, case, device)
        measure.run_mode(loss_fn, inputs, mode, device)
    except torch.cuda.OutOfMemoryError as exc:
        writer.add(case, provider_name, mode, "time", None, "ms", status="oom", note=str(exc).splitlines()[0])
        pytest.skip("out of memory")

    def step():
        loss = loss_fn(*measure.fresh_student(inputs))
        loss.backward()
        measure.sync(device)

    rounds = 10 if device == "cuda" else 3
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None:
        writer.add(case, provider_name, mode, "time", stats.median * 1e3, "ms",
                   note=f"H={case.hidden}; median of {rounds} rounds; {provider.note}")


@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_fused_linear_peak_memory(linear_case, provider_name, device, writer):
    provider, case, mode = PROVIDER[provider_name], linear_case, "forward+backward"
    reason = _reason(provider, case, device, "memory")
    if reason:
        writer.skip(case, provider_name, mode, "peak_memory", reason)
        pytest.skip(reason)
    logits_mib = case.unit_bytes / 2**20
    extra = measured_peak(provider, case, mode, device, writer)
    writer.add(case, provider_name, mode, "peak_memory", extra / 2**20, "MiB",
               note=f"H={case.hidden}; above the inputs; one [N, V] logits tensor = {logits_mib:.0f} MiB")
