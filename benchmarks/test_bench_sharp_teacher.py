"""Fused-linear loss against its own four GEMMs, with a sharp (confident) teacher.

Op "fused_linear_sharp": forward KL + 0.5 CE at T = 1, N=2048 H=512 V=32000 fp32 on every device,
hidden states scaled so that the logits have a standard deviation of ~22 (a confident model). There
the softmax underflows for most of the vocabulary, and a gradient that kept those values as
subnormal floats made the GEMMs that consume it (grad_hidden = G W, grad_W = G^T H) ~10x slower on
x86; distillkit stores them as 0. Rows:

    fused_linear   distillkit.fused_linear_distill_loss, forward + backward
    four_gemms     the two logits GEMMs (student, teacher) and the two gradient GEMMs, on a gradient
                   with no subnormal: the floor any fused-linear implementation pays
    ratio          fused_linear / four_gemms (goal: <= 1.5 on CPU)

    pytest benchmarks/test_bench_sharp_teacher.py
"""

from __future__ import annotations

import time

import pytest
import torch
from bench_helpers import fused_linear_problem

from distillkit.core.fused_linear import fused_linear_distill_loss
from distillkit.tools.bench.cases import Case

N, H, V = 2048, 512, 32000
LOGIT_STD = 22.0
ROUNDS = 5


def sharp_case(device: str):
    return fused_linear_problem(device, N, H, V, LOGIT_STD)


@pytest.fixture(scope="module")
def inputs(device):
    return sharp_case(device)


def _row_case():
    return Case("fused_linear_sharp", N, V, "fp32", "sharp-teacher", N, hidden=H)


def _median_ms(benchmark) -> float | None:
    stats = getattr(benchmark.stats, "stats", None)
    return None if stats is None else stats.median * 1e3


_medians: dict[str, float] = {}


def test_fused_linear_sharp_teacher(benchmark, inputs, device, writer):
    hidden, weight, t_hidden, t_weight, labels = inputs
    benchmark.group = f"fused_linear_sharp {N}x{H}x{V} fp32"

    def step():
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        loss = fused_linear_distill_loss(h, w, t_hidden, t_weight, labels, kl_weight=1.0, ce_weight=0.5)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return w.grad

    grad_w = step()  # warm-up
    assert torch.isfinite(grad_w).all()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    median = _median_ms(benchmark)
    if median is not None:
        _medians["fused_linear"] = median
        writer.add(_row_case(), "distillkit", "forward+backward", "time", median, "ms",
                   note=f"logits std {LOGIT_STD}, T=1, forward_kl + 0.5 CE, auto backend; median of {ROUNDS}")


def test_four_gemms(benchmark, inputs, device, writer):
    hidden, weight, t_hidden, t_weight, _ = inputs
    benchmark.group = f"fused_linear_sharp {N}x{H}x{V} fp32"
    grad_logits = torch.softmax(hidden @ weight.T, -1)  # a gradient-shaped [N, V] with no subnormal
    grad_logits = torch.where(grad_logits.abs() < torch.finfo(torch.float32).tiny, 0.0, grad_logits)

    def step():
        torch.mm(hidden, weight.T)
        torch.mm(t_hidden, t_weight.T)
        torch.mm(grad_logits, weight)
        torch.mm(grad_logits.T, hidden)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    median = _median_ms(benchmark)
    if median is None:
        return
    _medians["four_gemms"] = median
    writer.add(_row_case(), "torch.mm", "forward+backward", "time", median, "ms",
               note="student and teacher logits, grad_hidden, grad_weight (fp32, no subnormal)")
    if "fused_linear" in _medians:
        ratio = _medians["fused_linear"] / median
        writer.add(_row_case(), "distillkit", "forward+backward", "time_over_four_gemms", ratio, "x",
                   note="goal <= 1.5 on CPU (subnormal-free gradient)")


def test_gradient_gemms_with_and_without_subnormals(benchmark, inputs, device, writer):
    """Why the flush: the two gradient GEMMs on the same softmax-shaped gradient, once as computed
    (about a quarter of its entries subnormal at this logit scale) and once flushed (one round each:
    the subnormal one takes tens of seconds on x86)."""
    hidden, weight, *_ = inputs
    benchmark.group = f"fused_linear_sharp {N}x{H}x{V} fp32"
    raw = torch.softmax(hidden @ weight.T, -1)
    tiny = torch.finfo(torch.float32).tiny
    share = float(((raw != 0) & (raw.abs() < tiny)).float().mean())
    flushed = torch.where(raw.abs() < tiny, 0.0, raw)
    timings = {}
    for name, grad in (("with_subnormals", raw), ("flushed", flushed)):
        start = time.perf_counter()
        torch.mm(grad, weight)
        torch.mm(grad.T, hidden)
        if device == "cuda":
            torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - start) * 1e3
        writer.add(_row_case(), f"torch.mm ({name})", "backward", "time", timings[name], "ms",
                   note=f"grad_hidden + grad_weight GEMMs; {share:.1%} of the gradient subnormal before the flush")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings above are single runs
    benchmark.extra_info.update(timings)
