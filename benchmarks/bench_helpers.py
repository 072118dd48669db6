"""Shared by the benchmark modules: the skip decision and a measurement that write their own rows, and the
fused-linear problems."""

from __future__ import annotations

import pytest
import torch

from distillkit.tools.bench import measure
from distillkit.tools.bench.providers import get


def measured_peak(provider, case, mode, device, writer) -> float:
    """measure.peak_memory's bytes, or the row written as oom / skipped and the test skipped."""
    result = measure.peak_memory(provider, case, mode, device)
    if "oom" in result:
        writer.add(case, provider.name, mode, "peak_memory", None, "MiB", status="oom", note=result["oom"])
        pytest.skip("out of memory")
    if "error" in result:
        writer.skip(case, provider.name, mode, "peak_memory", result["error"])
        pytest.skip(result["error"])
    return result["extra_bytes"]


def measurable(provider_name, case, mode, device, matrix, writer, metric: str):
    """The provider, after writing a skip row for `metric` ("time", "peak_memory"; the test is skipped) when
    it cannot run this case here: unavailable, or torch.compile outside the matrix's compile_ops."""
    provider = get(provider_name)
    reason = provider.unavailable(case, device, "memory" if metric == "peak_memory" else metric)
    if reason is None and provider.kind == "compile" and case.op not in matrix["compile_ops"]:
        reason = f"torch.compile measured only for {matrix['compile_ops']} at this --bench-size (compile time)"
    if reason:
        writer.skip(case, provider_name, mode, metric, reason)
        pytest.skip(reason)
    return provider


def fused_linear_problem(device: str, n: int, h: int, v: int, logit_std: float):
    """(hidden, weight, teacher hidden, teacher weight, labels) of a fused-linear benchmark whose logits have
    standard deviation logit_std: logits = hidden @ W.T with W ~ N(0, 1/h), so std(logits) = std(hidden)."""
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=gen) * logit_std).to(device)
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(device)
    t_hidden = (torch.randn(n, h, generator=gen) * logit_std).to(device)
    t_weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(device)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, t_hidden, t_weight, labels
