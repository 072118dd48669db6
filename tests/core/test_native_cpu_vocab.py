"""div_vocab < V in one call of each op: the divergence over the first div_vocab ids of both rows (a teacher
at least that wide, read in place whatever its row stride), CE over the student's whole vocabulary, and the
student's ids past div_vocab with the CE gradient only."""

from __future__ import annotations

import pytest
import torch
from native_cpu_oracle import (GRAD_TOL, IGNORE, assert_close, assert_stats, backward, forward, needs_ext,
                                    oracle, ops, params, row_grads)

pytestmark = needs_ext


def _inputs(dtype, vocab, teacher_vocab, *, seed=0, reverse_type=False):
    """Row-strided student [6, vocab] and teacher [6, teacher_vocab] (unaligned starts, different strides), -inf
    teacher entries, the student's max past the shared ids (CE's max is not the divergence's)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(6, vocab + 13, generator=g) * 2.5).to(dtype)[:, 5:5 + vocab]
    t = (torch.randn(6, teacher_vocab + 40, generator=g) * 2.5).to(dtype)[:, 3:3 + teacher_vocab]
    shared = min(vocab, teacher_vocab)
    s[:, shared:] += 4.0
    t[1, 1::5] = float("-inf")  # id 0 stays finite: a row with div_vocab = 1 still defines a distribution
    t[2, 1: shared // 2] = float("-inf")
    if reverse_type:
        s[1, 1:shared:5] = float("-inf")
        s[2, 1: shared // 2] = float("-inf")
    y = torch.tensor([0, vocab - 1, IGNORE, shared, shared - 1, 3])  # labels on both sides of div_vocab
    return s, t, y


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab,teacher_vocab,div_vocab", [(1300, 1000, 1000), (1300, 1400, 1111), (700, 2000, 700),
                                                           (600, 600, 1), (513, 520, 512)])
@pytest.mark.parametrize("div", [1, 2, 3, 6, 7])
def test_truncated_rows_match_float64(div, vocab, teacher_vocab, div_vocab, dtype, temperature):
    s, t, y = _inputs(dtype, vocab, teacher_vocab, seed=div, reverse_type=div == 2)
    assert s.stride(0) != t.stride(0) and not s.is_contiguous() and not t.is_contiguous()
    dv, ce, stats = forward(s, t, y, div, temperature, div_vocab=div_vocab)
    gd, gc = row_grads(6)
    gd[5], gc[5] = 1.0, 0.0  # divergence only: zeros past div_vocab
    ref_d, ref_ce, ref_stats, ref_grad = oracle(s, t, y, div, temperature, True, gd, gc, div_vocab=div_vocab)
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    assert_close(ce, ref_ce, 2e-6, 2e-5, "ce")
    assert_stats(stats, ref_stats, s, t, div, temperature, atol=5e-5, div_vocab=div_vocab)
    grad = backward(gd, gc, s, t, y, stats, div, temperature, div_vocab=div_vocab)
    assert grad.shape == s.shape and grad.is_contiguous()
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad, ref_grad, rtol, atol * ref_grad.abs().max().item(), "grad")
    assert torch.equal(grad[5, div_vocab:], torch.zeros_like(grad[5, div_vocab:]))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("div", [1, 2, 3, 7])
def test_one_call_equals_the_two_calls(div, temperature):
    """What native_rows used to emulate with two calls, bit for bit: stats slots 0-4 and 7 and D from the
    divergence over the truncated rows, 5-6 and ce from CE over the whole student."""
    s, t, y = _inputs(torch.float32, 900, 1000, seed=div, reverse_type=div == 2)
    shared = 650
    dv, ce, stats = forward(s, t, y, div, temperature, div_vocab=shared)
    d_only, _, st_d = forward(s[:, :shared], t[:, :shared], None, div, temperature, with_ce=False)
    _, ce_only, st_ce = forward(s, None, y, 0, temperature)
    assert torch.equal(stats[:, [0, 1, 2, 3, 4, 7]], st_d[:, [0, 1, 2, 3, 4, 7]])
    assert torch.equal(stats[:, 5:7], st_ce[:, 5:7])
    assert torch.equal(dv, d_only) and torch.equal(ce, ce_only)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_undefined_rows_are_nan_over_the_divergence_ids_only(dtype):
    s, t, y = _inputs(dtype, 800, 700, seed=4)
    t[0, 10] = float("nan")
    t[3] = float("-inf")
    s[4, 750] = float("nan")  # past div_vocab: CE only sees it
    dv, ce, stats = forward(s, t, y, 3, 1.0, div_vocab=700)
    assert dv[[0, 3]].isnan().all() and dv[[1, 2, 4, 5]].isfinite().all()
    assert ce[4].isnan() and ce[[0, 1, 3, 5]].isfinite().all()
    grad = backward(torch.ones(6), torch.ones(6), s, t, y, stats, 3, 1.0, div_vocab=700)
    assert grad[[0, 3], :700].isnan().all() and grad[4, 700:].isnan().all()
    assert not grad[[0, 3], 700:].isnan().any()  # the CE gradient past div_vocab
    _, _, _, ref_grad = oracle(s[[0, 3]], None, y[[0, 3]], 0, 1.0, True, torch.zeros(2), torch.ones(2))
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad[[0, 3], 700:], ref_grad[:, 700:], rtol, atol, "CE past div_vocab")


@pytest.mark.parametrize("div", [1, 3, 7])
def test_native_rows_one_call_each_way(div, monkeypatch):
    """native_rows hands leading dims, a wider teacher and div_vocab to one rows_forward and one rows_backward
    call, the teacher as a view of the caller's storage (no copy, no slice)."""
    from distillkit.core.backends import native_rows

    g = torch.Generator().manual_seed(div)
    s = torch.randn(2, 3, 700, generator=g) * 3
    t = (torch.randn(2, 3, 760, generator=g) * 3)[..., :720]  # row stride 760, last dim contiguous
    y = torch.tensor([[0, 699, IGNORE], [5, 660, 1]])
    calls, real = [], torch.ops.distillkit_ext

    class Spy:
        def __getattr__(self, name):
            op = getattr(real, name)

            def call(*args):
                calls.append((name, args))
                return op(*args)
            return call

    monkeypatch.setattr(torch.ops, "distillkit_ext", Spy())
    dv, ce, stats = native_rows.forward(s, t, y, div, *params(div), 1.7, IGNORE, True, 650)
    gd, gc = torch.rand(2, 3, generator=g), torch.rand(2, 3, generator=g)
    grad = native_rows.backward(gd, gc, s, t, y, stats, div, *params(div), 1.7, IGNORE, True, 650)
    monkeypatch.undo()
    assert [name for name, _ in calls] == ["rows_forward", "rows_backward"]
    teacher_arg = calls[0][1][1]
    assert teacher_arg.shape == (6, 720) and teacher_arg.data_ptr() == t.data_ptr()
    assert dv.shape == ce.shape == (2, 3) and stats.shape == (2, 3, 8) and grad.shape == s.shape
    s2, t2, y2 = s.reshape(6, 700), t.reshape(6, 720), y.reshape(6)
    ref_d, ref_ce, _, ref_grad = oracle(s2, t2, y2, div, 1.7, True, gd.reshape(6), gc.reshape(6), div_vocab=650)
    assert_close(dv.reshape(6), ref_d, 2e-5, 2e-5, "div")
    assert_close(ce.reshape(6), ref_ce, 2e-6, 2e-5, "ce")
    assert_close(grad.reshape(6, 700), ref_grad, 3e-5, 1e-6 * ref_grad.abs().max().item(), "grad")


def test_ce_only_ignores_div_vocab():
    s, _, y = _inputs(torch.float32, 300, 300)
    out = [ops().rows_forward(s, None, y, 0, 0.0, 0.0, 1.0, IGNORE, True, dv) for dv in (0, 300, 10**9)]
    assert all(torch.equal(a, b) for other in out[1:] for a, b in zip(out[0], other))
