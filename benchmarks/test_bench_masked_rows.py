"""Masked-row compaction in the fused-linear op: half the rows masked in scattered blocks (as prompts and tool
results are in agent trajectories), against the same call with no row masked and with compaction off.

Op "fused_linear_masked": forward KL + 0.5 CE, T = 1, fp32; N=2048, H=512, V=32000 on CPU (N=8192,
H=4096, V=128256 on GPU). Rows: the time of each variant, and "time_ratio" = variant / unmasked. Not in
--bench-size quick (each call is about 2 s on a 2-core CPU).
"""

from __future__ import annotations

import pytest
import torch

from distillkit.core.fused_linear import fused_linear_distill_loss
from distillkit.tools.bench import measure
from distillkit.tools.bench.cases import Case

CPU_SHAPE, GPU_SHAPE = (2048, 512, 32000), (8192, 4096, 128256)
VARIANTS = {"unmasked": (False, True), "half_masked": (True, True), "half_masked_no_compaction": (True, False)}
_TIMES: dict[str, float] = {}


def _masked_blocks(n: int, block: int = 48) -> torch.Tensor:
    """Every other block of `block` rows masked, the block lengths jittered: about half the rows."""
    gen = torch.Generator().manual_seed(0)
    masked, start, on = torch.zeros(n, dtype=torch.bool), 0, True
    while start < n:
        length = int(block * (0.5 + torch.rand((), generator=gen)))
        masked[start:start + length] = on
        start, on = start + length, not on
    return masked


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_masked_rows_time(benchmark, variant, device, writer, request):
    if request.config.getoption("--bench-size") == "quick":
        pytest.skip("not in the quick matrix")
    n, h, v = CPU_SHAPE if device == "cpu" else GPU_SHAPE
    case = Case("fused_linear_masked", n, v, "fp32", "cpu-linear" if device == "cpu" else "peer", n, hidden=h)
    masked, compact = VARIANTS[variant]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * h ** -0.5).to(device).requires_grad_()
    t_hidden, t_weight = torch.randn(n, h, generator=gen).to(device), (torch.randn(v, h, generator=gen) * h ** -0.5).to(device)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    kl_weight = torch.ones(n, device=device)
    if masked:
        rows = _masked_blocks(n).to(device)
        labels[rows], kl_weight[rows] = -100, 0.0

    def step():
        loss = fused_linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, kl_weight=kl_weight,
                                         ce_weight=0.5, compact_rows=compact)
        loss.backward()
        hidden.grad = weight.grad = None
        measure.sync(device)

    step()  # warm-up
    rounds = 10 if device == "cuda" else 3
    benchmark.group = f"fused_linear_masked {n}x{h}x{v} fp32"
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is None:
        return
    _TIMES[variant] = stats.median
    share = f"{float(_masked_blocks(n).float().mean()):.2f}" if masked else "0"
    writer.add(case, f"distillkit-{variant}", "forward+backward", "time", stats.median * 1e3, "ms",
               note=f"H={h}; masked share {share}; compact_rows={compact}; median of {rounds} rounds")
    if "unmasked" in _TIMES and variant != "unmasked":
        writer.add(case, f"distillkit-{variant}", "forward+backward", "time_ratio", stats.median / _TIMES["unmasked"],
                   "x", note="time / the unmasked call's time")
