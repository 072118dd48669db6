"""The C++ CPU kernels against the float64 oracle (native_cpu_oracle.py): every divergence id,
dtype, vocabulary size and temperature; with and without CE, mixed dtypes, broadcast and empty rows."""

from __future__ import annotations

import pytest
import torch
from native_cpu_oracle import (DIVERGENCES, GRAD_TOL, assert_close, assert_stats, backward, forward,
                                    make_inputs, needs_ext, oracle, row_grads)

pytestmark = needs_ext


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.3])
@pytest.mark.parametrize("vocab", [1271, 50257, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_rows_match_float64(div, dtype, vocab, temperature):
    s, t, y = make_inputs(dtype, vocab, div, seed=div * 7 + vocab % 13)
    dv, ce, stats = forward(s, t, y, div, temperature)
    gd, gc = row_grads(s.shape[0])
    ref_d, ref_ce, ref_stats, ref_grad = oracle(s, t, y, div, temperature, True, gd, gc)
    assert dv.dtype == ce.dtype == stats.dtype == torch.float32
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    assert_close(ce, ref_ce, 2e-6, 2e-5, "ce")
    assert_stats(stats, ref_stats, s, t, div, temperature)

    grad = backward(gd, gc, s, t, y, stats, div, temperature)
    assert grad.dtype == dtype and grad.shape == s.shape and grad.is_contiguous()
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad, ref_grad, rtol, atol * ref_grad.abs().max().item(), "grad")
    assert torch.equal(grad[0], torch.zeros_like(grad[0])) and torch.equal(grad[3], torch.zeros_like(grad[3]))


@pytest.mark.parametrize("div", [1, 3, 5, 6, 7])
def test_without_ce_and_contiguous(div):
    s, t, y = make_inputs(torch.float32, 3000, div, strided=False)
    dv, ce, stats = forward(s, t, y, div, 1.7, with_ce=False)
    ref_d, _, ref_stats, _ = oracle(s, t, y, div, 1.7, False)
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    assert torch.equal(ce, torch.zeros_like(ce)) and torch.equal(stats[:, 5:7], torch.zeros_like(stats[:, 5:7]))
    assert_stats(stats, ref_stats, s, t, div, 1.7)
    gd, gc = row_grads(s.shape[0])
    grad = backward(gd, gc, s, t, y, stats, div, 1.7, with_ce=False)
    _, _, _, ref_grad = oracle(s, t, y, div, 1.7, False, gd, torch.zeros_like(gc))
    assert_close(grad, ref_grad, 3e-5, 5e-7 * ref_grad.abs().max().item(), "grad")


@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.float32, torch.bfloat16),
                                                         (torch.bfloat16, torch.float32),
                                                         (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("div", [1, 2, 3, 7])
def test_mixed_dtypes(div, student_dtype, teacher_dtype):
    s, t, y = make_inputs(student_dtype, 2053, div, teacher_dtype=teacher_dtype)
    dv, ce, stats = forward(s, t, y, div, 2.0)
    gd, gc = row_grads(s.shape[0])
    ref_d, ref_ce, ref_stats, ref_grad = oracle(s, t, y, div, 2.0, True, gd, gc)
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    assert_stats(stats, ref_stats, s, t, div, 2.0)
    grad = backward(gd, gc, s, t, y, stats, div, 2.0)
    rtol, atol = GRAD_TOL[student_dtype]
    assert_close(grad, ref_grad, rtol, atol * ref_grad.abs().max().item(), "grad")


def test_broadcast_teacher_row_stride_zero():
    s, _, y = make_inputs(torch.float32, 1500, 1, strided=False)
    t = torch.randn(1, 1500).expand(s.shape[0], 1500)  # one teacher row for every student row
    dv, ce, stats = forward(s, t, y, 1, 2.0)
    gd, gc = row_grads(s.shape[0])
    ref_d, _, ref_stats, ref_grad = oracle(s, t, y, 1, 2.0, True, gd, gc)
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    grad = backward(gd, gc, s, t, y, stats, 1, 2.0)
    assert_close(grad, ref_grad, 3e-5, 5e-7 * ref_grad.abs().max().item(), "grad")


def test_ce_only_never_reads_the_teacher():
    s, _, y = make_inputs(torch.bfloat16, 777, 0)
    dv, ce, stats = forward(s, None, y, 0, 1.0, div_vocab=0)  # div_vocab is not read either
    ref_d, ref_ce, ref_stats, _ = oracle(s, None, y, 0, 1.0, True)
    assert torch.equal(dv, torch.zeros_like(dv))
    assert_close(ce, ref_ce, 2e-6, 2e-5, "ce")
    assert_stats(stats, ref_stats, s, None, 0, 1.0)


def test_nan_logits_propagate():
    s, t, y = make_inputs(torch.float32, 2000, 1)
    s[4, 1500] = float("nan")
    dv, ce, stats = forward(s, t, y, 1, 1.0)
    assert dv[4].isnan() and not dv[[0, 1, 3, 5]].isnan().any()


def test_empty_rows():
    s = torch.randn(0, 50)
    y = torch.zeros(0, dtype=torch.long)
    dv, ce, stats = forward(s, s, y, 1, 1.0)
    assert dv.shape == (0,) and stats.shape == (0, 8)
    grad = backward(dv, ce, s, s, y, stats, 1, 1.0)
    assert grad.shape == (0, 50)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_large_enough_for_huge_pages(dtype):
    """A gradient over 8 MB takes the huge-page path (advice + one write per 2 MB block before the rows run)."""
    s, t, y = make_inputs(dtype, 32000, 1, rows=160 if dtype == torch.bfloat16 else 80, strided=False)
    _, _, stats = forward(s, t, y, 1, 1.0)
    gd, gc = row_grads(s.shape[0])
    grad = backward(gd, gc, s, t, y, stats, 1, 1.0)
    assert grad.numel() * grad.element_size() > 8 * 2**20
    _, _, _, ref_grad = oracle(s, t, y, 1, 1.0, True, gd, gc)
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad, ref_grad, rtol, atol * ref_grad.abs().max().item(), "grad")
