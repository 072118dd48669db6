"""alpha_beta (id 7) on the C++ CPU kernels: its three forms against the divergence's definition in float64
(per-row D, c, and the student gradient by float64 autograd), and its KL limits against the KL kernels."""

from __future__ import annotations

import pytest
import torch
from native_cpu_oracle import (GRAD_TOL, assert_close, assert_stats, backward, forward, make_inputs,
                                    needs_ext, oracle, row_grads)

pytestmark = needs_ext

AB_PAIRS = [(0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.2, 0.7), (1.5, 0.5)]


@pytest.mark.parametrize("temperature", [1.0, 2.3])
@pytest.mark.parametrize("vocab", [1271, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ab", AB_PAIRS, ids=str)
def test_alpha_beta_matches_its_definition(ab, dtype, vocab, temperature):
    """Rows with -inf teacher entries (row 1: every 5th, row 2: the first half); with alpha = 0 the divergence
    is reverse-type (+inf where only the student has mass), so the student is masked there too."""
    s, t, y = make_inputs(dtype, vocab, 7, seed=vocab % 13 + int(10 * ab[0]), reverse_type=ab[0] == 0)
    dv, ce, stats = forward(s, t, y, 7, temperature, ab=ab)
    gd, gc = row_grads(s.shape[0])
    ref_d, ref_ce, ref_stats, ref_grad = oracle(s, t, y, 7, temperature, True, gd, gc, ab=ab)
    assert dv.isfinite().all()
    assert_close(dv, ref_d, 1e-5, 1e-5, "div")
    assert_close(ce, ref_ce, 2e-6, 2e-5, "ce")
    assert_stats(stats, ref_stats, s, t, 7, temperature, atol=5e-5)  # c: sum of h as a float sum over V

    grad = backward(gd, gc, s, t, y, stats, 7, temperature, ab=ab)
    assert grad.dtype == dtype
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad, ref_grad, rtol, atol * ref_grad.abs().max().item(), "grad")
    assert torch.equal(grad[0], torch.zeros_like(grad[0])) and torch.equal(grad[3], torch.zeros_like(grad[3]))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ab,kl", [((1.0, 0.0), 1), ((0.0, 1.0), 2)], ids=["forward", "reverse"])
def test_kl_limits_equal_the_kl_kernels(ab, kl, dtype, temperature):
    """(1, 0) is forward KL and (0, 1) reverse KL: the same D and student gradient as ids 1 and 2 on the same
    inputs, to fp32 rounding (the KL kernels sum one pass relative to the mode, alpha_beta two passes)."""
    s, t, y = make_inputs(dtype, 3001, kl, seed=kl)
    gd, gc = row_grads(s.shape[0])
    d_ab, ce_ab, st_ab = forward(s, t, y, 7, temperature, ab=ab)
    d_kl, ce_kl, st_kl = forward(s, t, y, kl, temperature)
    assert_close(d_ab, d_kl.double(), 1e-5, 2e-6, "div")
    assert_close(ce_ab, ce_kl.double(), 1e-6, 1e-6, "ce")
    # the same maxima and log-sums (c is -1 for forward KL, relative to the mode for reverse KL; ref is theirs)
    slots = [0, 1, 2, 3, 5, 6]
    assert_close(st_ab[:, slots], st_kl[:, slots].double(), 1e-6, 1e-6, "stats")
    g_ab = backward(gd, gc, s, t, y, st_ab, 7, temperature, ab=ab)
    g_kl = backward(gd, gc, s, t, y, st_kl, kl, temperature)
    rtol, atol = GRAD_TOL[dtype]
    assert_close(g_ab, g_kl.double(), rtol, atol * g_kl.abs().max().item(), "grad")


@pytest.mark.parametrize("ab", AB_PAIRS, ids=str)
def test_alpha_beta_of_identical_rows_is_zero(ab):
    """To fp32 rounding: the three powers of a term cancel (D is of second order in log p - log q), each
    rounded on its own, and (0.2, 0.7) scales them by 1 / (alpha beta) = 7."""
    s = torch.randn(3, 999) * 3
    dv, _, stats = forward(s, s.clone(), None, 7, 1.5, with_ce=False, ab=ab)
    assert dv.abs().max() < 5e-6
    grad = backward(torch.ones(3), torch.zeros(3), s, s.clone(), None, stats, 7, 1.5, with_ce=False, ab=ab)
    assert grad.abs().max() < 1e-6
