"""The 0.2.0 row contract on the C++ CPU kernels: exact softmax at any logit scale, rows that define no
distribution, no subnormal gradient entries, and any scale against float64 (distillkit.reference)."""

from __future__ import annotations

import pytest
import torch
from native_cpu_oracle import (AB, GRAD_TOL, IGNORE, MIX, assert_close, assert_stats, backward, forward,
                                    needs_ext, oracle)

pytestmark = needs_ext

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "alpha_beta"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_exact_at_huge_logits(dtype):
    """lse(s) = 1e8 + log 2 rounds to 1e8 in fp32 (q was [1, 1, 0, 0]); the raw max and the log-sum apart
    keep q = [0.5, 0.5, 0, 0] exact."""
    s = torch.tensor([[1e8, 1e8, 0.0, 0.0]], dtype=dtype)
    t = torch.zeros(1, 4, dtype=dtype)
    dv, _, stats = forward(s, t, None, 1, 1.0, with_ce=False)
    assert stats.shape == (1, 8)
    assert stats[0, 0] == 0 and stats[0, 2] == s[0, 0].float()  # raw maxima
    grad = backward(torch.ones(1), torch.zeros(1), s, t, None, stats, 1, 1.0, with_ce=False)
    assert grad.float().tolist() == [[0.25, 0.25, -0.25, -0.25]]
    ref_d, _, ref_stats, _ = oracle(s, t, None, 1, 1.0, False)
    assert_close(dv, ref_d, 2e-6, 2e-5, "div")
    assert_stats(stats, ref_stats, s, t, 1, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reverse_kl_of_identical_rows_is_exactly_zero(dtype, temperature):
    """c = E_q[x_b - x_a] has no large constant in it: s = t gives D = 0 and a zero gradient, exactly."""
    s = torch.tensor([[1e4, -1e4, 0.5, -3.0]], dtype=dtype)
    dv, _, stats = forward(s, s.clone(), None, 2, temperature, with_ce=False)
    assert dv.item() == 0.0 and stats[0, 4] == 0.0
    grad = backward(torch.ones(1), torch.zeros(1), s, s.clone(), None, stats, 2, temperature, with_ce=False)
    assert torch.equal(grad, torch.zeros_like(grad))


def _non_finite_rows(dtype, vocab=300):
    """Teacher rows: NaN, +inf, all -inf, -inf among finite values (the student too, so reverse KL stays
    finite), a student row with a NaN, and a clean row."""
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, vocab, generator=g) * 2).to(dtype)
    t = (torch.randn(6, vocab, generator=g) * 2).to(dtype)
    t[0, 17] = float("nan")
    t[1, 250] = float("inf")
    t[2] = float("-inf")
    t[3, ::3] = float("-inf")
    s[3, ::3] = float("-inf")
    s[4, 99] = float("nan")
    y = torch.tensor([5, 0, vocab - 1, 1, 7, IGNORE])
    return s, t, y


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", range(1, 8))
def test_non_finite_rows(div, dtype, temperature):
    s, t, y = _non_finite_rows(dtype)
    dv, ce, stats = forward(s, t, y, div, temperature)
    bad = torch.tensor([True, True, True, False, True, False])
    assert dv[bad].isnan().all() and dv[~bad].isfinite().all(), dv
    assert stats[bad][:, [1, 3, 4]].isnan().all()  # ls_a, ls_b, c
    # CE reads only the student: finite except on the row whose student has a NaN
    assert ce[[0, 1, 2, 3]].isfinite().all() and ce[4].isnan() and ce[5] == 0
    assert stats[4, 6].isnan() and stats[[0, 1, 2, 3, 5], 6].isfinite().all()
    ok = ~bad
    ref_d, ref_ce, _, _ = oracle(s[ok], t[ok], y[ok], div, temperature, True)
    assert_close(dv[ok], ref_d, 2e-5, 2e-5, "div")
    assert_close(ce[ok], ref_ce, 2e-6, 2e-5, "ce")
    # grad_div = 0 skips the divergence: no NaN from a broken teacher reaches a CE-only gradient
    gd, gc = torch.zeros(6), torch.ones(6)
    grad = backward(gd, gc, s, t, y, stats, div, temperature)
    assert not grad[[0, 1, 2, 3, 5]].isnan().any()
    _, _, _, ref_grad = oracle(s[[0, 1, 2, 3]], None, y[[0, 1, 2, 3]], 0, temperature, True, gd[:4], gc[:4])
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad[[0, 1, 2, 3]], ref_grad, rtol, atol, "CE-only grad")
    # grad_div != 0 on an undefined row: NaN over the whole row
    grad = backward(torch.ones(6), torch.zeros(6), s, t, y, stats, div, temperature)
    assert grad[bad].isnan().all() and not grad[~bad].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_rows_ce_only(dtype):
    s, _, y = _non_finite_rows(dtype)
    s[2] = float("-inf")
    s[1, 3] = float("inf")
    _, ce, stats = forward(s, None, y, 0, 1.0)
    assert ce[[1, 2, 4]].isnan().all() and ce[[0, 3]].isfinite().all() and ce[5] == 0
    assert stats[[1, 2, 4], 6].isnan().all() and torch.equal(stats[:, :5], torch.zeros(6, 5))


FLT_MIN = torch.finfo(torch.float32).tiny


def _below_flt_min(g):
    return (g != 0) & (g.float().abs() < FLT_MIN)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", range(8))
def test_no_subnormal_gradient_entries(div, dtype, temperature):
    """A sharp teacher (and student) puts gradient entries far below FLT_MIN: every store path (fp32 in place,
    bf16 and fp16 conversions; divergence only, CE only, both) writes them as 0. float16 keeps its own
    subnormals (2^-24..2^-14), which mean-reduced gradients need."""
    from distillkit.core.tolerances import TOLERANCES

    g = torch.Generator().manual_seed(div)
    vocab = 4000
    s = (torch.randn(6, vocab, generator=g) * 30).to(dtype)
    t = (torch.randn(6, vocab, generator=g) * 60).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    gd = torch.tensor([1e-3, 0.0, 1e-3, 1.0, 1e-6, 0.0])
    gc = torch.tensor([0.0, 1e-3, 1e-3, 1.0, 1e-6, 0.0])
    _, _, stats = forward(s, t, y, div, temperature)
    grad = backward(gd, gc, s, t, y, stats, div, temperature)
    assert not _below_flt_min(grad).any(), grad[_below_flt_min(grad)][:8]
    if dtype == torch.float16:  # kept: the fp32 values below 2^-14 but above FLT_MIN round to fp16 subnormals
        assert ((grad != 0) & (grad.float().abs() < 6.103515625e-05)).any()
    assert not grad.isnan().any() and torch.equal(grad[5], torch.zeros_like(grad[5]))
    # still the gradient, up to the flushed entries, within the package-wide tolerance (D here reaches ~100,
    # so reverse KL's x_b - x_a - c cancels at that magnitude); atol relative to the row's coefficients, not
    # to its largest entry (near one-hot rows cancel h - q c down to an ulp of c)
    _, _, _, ref_grad = oracle(s, t, y, div, temperature, True, gd, gc)
    tol = TOLERANCES[(dtype, "grad")]
    for row in range(5):
        # + FLT_MIN (the flush) and, for float16, its subnormals' spacing 2^-24 (where row 4's entries lie)
        row_atol = tol.atol * (gd[row].item() / temperature + gc[row].item()) + FLT_MIN
        row_atol += 2.0**-24 if dtype == torch.float16 else 0.0
        assert_close(grad[row], ref_grad[row], tol.rtol, row_atol, f"grad row {row}")


# -- any logit scale against float64 (distillkit.reference on the same fp32 inputs) --------------------------

def _reference_rows(s, t, y, div, temperature, gd, gc, dtype):
    """(D, ce, d(sum gd D + gc ce)/ds) from distillkit.reference computed in `dtype`."""
    from distillkit.core import reference

    s_ = s.to(dtype).requires_grad_()
    d = reference.divergence_per_token(s_, t.to(dtype), divergence=NAMES[div - 1], beta=MIX, skew=MIX,
                                       alpha_beta=AB, temperature=temperature)
    ce = reference.cross_entropy_per_token(s_, y, IGNORE)
    loss = (gd.to(dtype) * d).sum() + (gc.to(dtype) * ce).sum()
    grad = torch.autograd.grad(loss, s_)[0]
    return d.detach(), ce.detach(), grad


@pytest.mark.parametrize("temperature", [0.05, 1.0, 50.0])
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4, 1e8])
@pytest.mark.parametrize("div", range(1, 8))
def test_any_logit_scale_matches_float64(div, scale, temperature):
    from distillkit.core.tolerances import TOLERANCES

    g = torch.Generator().manual_seed(int(scale) % 1000 + div)
    rows, vocab = 6, 1000
    s = torch.randn(rows, vocab, generator=g) * scale
    t = torch.randn(rows, vocab, generator=g) * scale + 0.3 * scale
    s[1] = t[1]  # identical rows (D = 0)
    s[2] = t[2] + 0.01 * scale * torch.randn(vocab, generator=g)  # close rows
    y = torch.tensor([0, 1, IGNORE, vocab - 1, 17, 500])
    gd, gc = torch.rand(rows, generator=g) + 0.1, torch.rand(rows, generator=g) + 0.1
    gd[::2] *= temperature**2  # as with temperature_scaling: at T = 50 the divergence's terms dominate the rows
    dv, ce, stats = forward(s, t, y, div, temperature)
    grad = backward(gd, gc, s, t, y, stats, div, temperature)
    ref_d, ref_ce, ref_grad = _reference_rows(s, t, y, div, temperature, gd, gc, torch.float64)

    loss_tol, grad_tol = TOLERANCES[(torch.float32, "loss")], TOLERANCES[(torch.float32, "grad")]
    scale_g = ref_grad.abs().max().item()
    checks = [("div", dv, ref_d, loss_tol.atol, loss_tol.rtol), ("ce", ce, ref_ce, loss_tol.atol, loss_tol.rtol),
              ("grad", grad, ref_grad, grad_tol.atol * scale_g, grad_tol.rtol)]
    if temperature == 50.0:  # flat distributions: also allowed 2x the error of eager fp32 PyTorch
        eager = _reference_rows(s, t, y, div, temperature, gd, gc, torch.float32)
        checks = [(name, out, ref, max(atol, 2 * (e.double() - ref).abs().max().item()), rtol)
                  for (name, out, ref, atol, rtol), e in zip(checks, eager)]
    for name, out, ref, atol, rtol in checks:
        assert_close(out, ref, rtol, atol, f"{name} (scale {scale:g}, T {temperature:g})")
    if div in (1, 2):  # the KLs of identical rows: exactly 0 at any scale (no large constant cancels)
        assert dv[1] == 0
