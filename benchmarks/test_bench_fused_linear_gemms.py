"""Fused-linear loss against its own four GEMMs at realistic logits (standard deviation ~1).

Op "fused_linear_realistic": forward KL + 0.5 CE at T = 1, N=2048 H=512 V=32000 fp32 (the shape of
test_bench_sharp_teacher.py), hidden states and heads drawn so that the logits have a standard deviation
of ~1, as a trained model's do. Rows:

    fused_linear   distillkit.fused_linear_distill_loss, forward + backward (auto backend)
    four_gemms     the two logits GEMMs (student, teacher) and the two gradient GEMMs (grad_hidden,
                   grad_weight): the floor any fused-linear implementation pays
    ratio          fused_linear / four_gemms, medians over the same rounds (goal: <= 1.15 on CPU)

The two are interleaved: before each timed round of the op, pytest-benchmark's setup runs and times the
four GEMMs once, so both medians see the same machine load. Not in --bench-size quick.

    pytest benchmarks/test_bench_fused_linear_gemms.py
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from bench_helpers import fused_linear_problem

from distillkit.core.fused_linear import fused_linear_distill_loss
from distillkit.tools.bench import measure
from distillkit.tools.bench.cases import Case

N, H, V = 2048, 512, 32000
LOGIT_STD = 1.0
ROUNDS = {"cpu": 7, "cuda": 20}


def realistic_case(device: str):
    return fused_linear_problem(device, N, H, V, LOGIT_STD)


def test_fused_linear_over_its_gemms(benchmark, device, writer, request):
    if request.config.getoption("--bench-size") == "quick":
        pytest.skip("not in the quick matrix")
    hidden, weight, t_hidden, t_weight, labels = realistic_case(device)
    grad_logits = torch.softmax(hidden @ weight.T, -1)  # a gradient-shaped [N, V] with no subnormal
    grad_logits = torch.where(grad_logits.abs() < torch.finfo(torch.float32).tiny, 0.0, grad_logits)
    case = Case("fused_linear_realistic", N, V, "fp32", "realistic-logits", N, hidden=H)
    rounds = ROUNDS.get(device, 7)
    benchmark.group = f"fused_linear_realistic {N}x{H}x{V} fp32"

    def step():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fused_linear_distill_loss(h, w, t_hidden, t_weight, labels, kl_weight=1.0, ce_weight=0.5)
        loss.backward()
        measure.sync(device)
        return w.grad

    gemm_seconds = []

    def four_gemms():
        start = time.perf_counter()
        torch.mm(hidden, weight.T)
        torch.mm(t_hidden, t_weight.T)
        torch.mm(grad_logits, weight)
        torch.mm(grad_logits.T, hidden)
        measure.sync(device)
        gemm_seconds.append(time.perf_counter() - start)

    assert torch.isfinite(step()).all()  # warm-up
    four_gemms()
    gemm_seconds.clear()
    benchmark.pedantic(step, setup=four_gemms, rounds=rounds, warmup_rounds=0, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    op_ms, gemm_ms = stats.median * 1e3, statistics.median(gemm_seconds) * 1e3
    best = stats.min / min(gemm_seconds)
    benchmark.extra_info.update(four_gemms_ms=gemm_ms, ratio=op_ms / gemm_ms, ratio_of_minima=best)
    writer.add(case, "distillkit", "forward+backward", "time", op_ms, "ms",
               note=f"logits std {LOGIT_STD}, T=1, forward_kl + 0.5 CE, auto backend; median of {rounds}")
    writer.add(case, "torch.mm", "forward+backward", "time", gemm_ms, "ms",
               note=f"student and teacher logits, grad_hidden, grad_weight (fp32); median of {rounds}, "
                    "each run just before a round of the op")
    writer.add(case, "distillkit", "forward+backward", "time_over_four_gemms", op_ms / gemm_ms, "x",
               note=f"goal <= 1.15 on CPU; ratio of the fastest rounds {best:.3f}")
