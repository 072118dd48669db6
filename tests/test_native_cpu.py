"""The C++ CPU kernels (csrc/distill_cpu.cpp) against float64 formulas of docs/DESIGN.md.

Forward: D, ce and the stats (lse(t/T), lse(s/T), c, lse(s)) per row; backward: the
student gradient against autograd of sum(grad_div * D + grad_ce * ce) in float64.
Inputs are quantized to the kernel's dtype first, so the oracle sees the same numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distillkit import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")

IGNORE = -100
MIX = 0.3  # beta for jsd, skew for the skew divergences
DIVERGENCES = range(7)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Gradient tolerances (rtol, atol relative to the largest reference value), tighter than the
# package-wide table (distillkit.tolerances) for fp32. The fp32 atol is set by the mixtures' h - q c,
# which can cancel to ~1e-3 of q: the fp32 lse in the stats (1 ulp = 2e-6 at |lse| ~ 20) then moves
# that gradient by ~5e-7 of the largest entry. Eager fp32 PyTorch errs by 3e-7 on the same element
# (tvd, V=50257, T=0.5).
GRAD_TOL = {torch.float32: (3e-5, 1e-6), torch.bfloat16: (8e-3, 2e-3), torch.float16: (1e-3, 5e-4)}


def ops():
    return torch.ops.distillkit_ext


# -- float64 oracle -------------------------------------------------------------------------

def _kl_term(x, log_x, log_y):
    """x (log x - log y) with 0 where x = 0; both logs masked too, so autograd sees no -inf."""
    present = x > 0
    zero = torch.zeros((), dtype=x.dtype)
    return torch.where(present, x * (torch.where(present, log_x, zero) - torch.where(present, log_y, zero)), zero)


def terms64(lp, lq, div, mix):
    """(d, h) of the DESIGN.md table, float64, NaN-free under autograd for p = 0 or q = 0."""
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros_like(p)
    if div == 0:
        return zero, zero
    if div == 1:
        return _kl_term(p, lp, lq), -p
    if div == 2:
        d = _kl_term(q, lq, lp)
        return d, d
    w_p, w_q = {3: (mix, 1 - mix), 4: (mix, 1 - mix), 5: (1 - mix, mix), 6: (0, 0)}[div]
    m = w_p * p + w_q * q
    m_safe = torch.where(m > 0, m, 1.0)
    lm = torch.log(m_safe)
    if div == 3:
        kq = _kl_term(q, lq, lm)
        return w_p * _kl_term(p, lp, lm) + w_q * kq, w_q * kq
    if div == 4:
        return _kl_term(p, lp, lm), torch.where(m > 0, -w_q * p * q / m_safe, zero)
    if div == 5:
        d = _kl_term(q, lq, lm)
        return d, d - torch.where(m > 0, w_q * q * q / m_safe, zero)
    return 0.5 * (q - p).abs(), 0.5 * q * torch.sign(q - p)


def oracle(s, t, y, div, mix, temperature, with_ce, grad_div=None, grad_ce=None):
    """(D, ce, stats) in float64 and, given row gradients, d(sum gd D + gc ce)/ds."""
    s64 = s.double().detach().requires_grad_(grad_div is not None)
    vocab = s.shape[1]
    b = s64 / temperature
    lse_b = b.logsumexp(-1)
    zeros = torch.zeros(s.shape[0], dtype=torch.float64)
    if div:
        a = t.double() / temperature
        lse_a = a.logsumexp(-1)
        d, h = terms64(a - lse_a[:, None], b - lse_b[:, None], div, mix)
        D, c = d.sum(-1), h.sum(-1)
    else:
        lse_a, lse_b, D, c = zeros, zeros, zeros, zeros
    if with_ce:
        lse_s = s64.logsumexp(-1)
        valid = (y != IGNORE) & (y >= 0) & (y < vocab)
        target = s64.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
        ce = torch.where(valid, lse_s - target, 0.0)
    else:
        lse_s, ce = zeros, zeros
    stats = torch.stack([lse_a, lse_b, c, lse_s], 1)
    grad = None
    if grad_div is not None:
        gd, gc = grad_div.double(), grad_ce.double()
        # where, not multiply: the kernels skip a term whose row gradient is 0
        loss = torch.where(gd != 0, gd * D, 0.0).sum() + torch.where(gc != 0, gc * ce, 0.0).sum()
        grad = torch.autograd.grad(loss, s64)[0] if loss.requires_grad else torch.zeros_like(s64)
    return D.detach(), ce.detach(), stats.detach(), grad


# -- inputs -------------------------------------------------------------------------------------

def make_inputs(dtype, vocab, div, *, rows=6, strided=True, seed=0, teacher_dtype=None):
    """Rows with a row stride != V and an unaligned start (strided), -inf teacher entries,
    and labels that are valid, ignored and out of range on both sides."""
    g = torch.Generator().manual_seed(seed)
    pad = 21 if strided else 0
    base_s = (torch.randn(rows, vocab + pad, generator=g) * 2.5).to(dtype)
    base_t = (torch.randn(rows, vocab + pad, generator=g) * 2.5 + 0.5).to(teacher_dtype or dtype)
    s = base_s[:, 5:5 + vocab] if strided else base_s
    t = base_t[:, 3:3 + vocab] if strided else base_t
    t[1, ::5] = float("-inf")  # masked vocabulary entries
    t[2, : vocab // 2] = float("-inf")
    if div == 2:  # reverse KL is +inf where the student has mass and the teacher none: mask both
        s[1, ::5] = float("-inf")
        s[2, : vocab // 2] = float("-inf")
    y = torch.tensor([0, 1, IGNORE, vocab, -5, vocab - 1] * rows)[:rows]
    return s, t, y


def row_grads(rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    gd, gc = torch.rand(rows, generator=g) + 0.1, torch.rand(rows, generator=g) + 0.1
    gd[0], gc[0] = 0.0, 0.0  # both 0: zeros without reading
    gd[3] = 0.0  # CE only (its label is out of range: the row is all zeros too)
    gc[4] = 0.0  # divergence only
    return gd, gc


def assert_close(out, ref, rtol, atol, what):
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), f"{what}: non-finite entries differ"
    err = (out - ref).abs()[finite]
    bound = (atol + rtol * ref.abs())[finite]
    worst = (err - bound).argmax() if err.numel() else None
    assert err.numel() == 0 or bool((err <= bound).all()), (
        f"{what}: max error {err.max().item():.3g} (at {worst.item()}, ref {ref[finite][worst].item():.6g})")


# -- forward + backward across the matrix -----------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.3])
@pytest.mark.parametrize("vocab", [1271, 50257, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_rows_match_float64(div, dtype, vocab, temperature):
    s, t, y = make_inputs(dtype, vocab, div, seed=div * 7 + vocab % 13)
    teacher = t if div else None
    dv, ce, stats = ops().rows_forward(s, teacher, y, div, MIX, temperature, IGNORE, True)
    gd, gc = row_grads(s.shape[0])
    ref_d, ref_ce, ref_stats, ref_grad = oracle(s, t, y, div, MIX, temperature, True, gd, gc)
    assert dv.dtype == ce.dtype == stats.dtype == torch.float32
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    assert_close(ce, ref_ce, 2e-6, 2e-5, "ce")
    assert_close(stats, ref_stats, 2e-6, 2e-5, "stats")

    grad = ops().rows_backward(gd, gc, s, teacher, y, stats, div, MIX, temperature, IGNORE, True)
    assert grad.dtype == dtype and grad.shape == s.shape and grad.is_contiguous()
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad, ref_grad, rtol, atol * ref_grad.abs().max().item(), "grad")
    assert torch.equal(grad[0], torch.zeros_like(grad[0])) and torch.equal(grad[3], torch.zeros_like(grad[3]))


@pytest.mark.parametrize("div", [1, 3, 5, 6])
def test_without_ce_and_contiguous(div):
    s, t, y = make_inputs(torch.float32, 3000, div, strided=False)
    dv, ce, stats = ops().rows_forward(s, t, None, div, MIX, 1.7, IGNORE, False)
    ref_d, _, ref_stats, _ = oracle(s, t, y, div, MIX, 1.7, False)
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    assert torch.equal(ce, torch.zeros_like(ce)) and torch.equal(stats[:, 3], torch.zeros_like(ce))
    assert_close(stats, ref_stats, 2e-6, 2e-5, "stats")
    gd, gc = row_grads(s.shape[0])
    grad = ops().rows_backward(gd, gc, s, t, None, stats, div, MIX, 1.7, IGNORE, False)
    _, _, _, ref_grad = oracle(s, t, y, div, MIX, 1.7, False, gd, torch.zeros_like(gc))
    assert_close(grad, ref_grad, 3e-5, 5e-7 * ref_grad.abs().max().item(), "grad")


@pytest.mark.parametrize("student_dtype,teacher_dtype", [(torch.float32, torch.bfloat16),
                                                         (torch.bfloat16, torch.float32),
                                                         (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("div", [1, 2, 3])
def test_mixed_dtypes(div, student_dtype, teacher_dtype):
    s, t, y = make_inputs(student_dtype, 2053, div, teacher_dtype=teacher_dtype)
    dv, ce, stats = ops().rows_forward(s, t, y, div, MIX, 2.0, IGNORE, True)
    gd, gc = row_grads(s.shape[0])
    ref_d, ref_ce, ref_stats, ref_grad = oracle(s, t, y, div, MIX, 2.0, True, gd, gc)
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    assert_close(stats, ref_stats, 2e-6, 2e-5, "stats")
    grad = ops().rows_backward(gd, gc, s, t, y, stats, div, MIX, 2.0, IGNORE, True)
    rtol, atol = GRAD_TOL[student_dtype]
    assert_close(grad, ref_grad, rtol, atol * ref_grad.abs().max().item(), "grad")


def test_broadcast_teacher_row_stride_zero():
    s, _, y = make_inputs(torch.float32, 1500, 1, strided=False)
    t = torch.randn(1, 1500).expand(s.shape[0], 1500)  # one teacher row for every student row
    dv, ce, stats = ops().rows_forward(s, t, y, 1, MIX, 2.0, IGNORE, True)
    gd, gc = row_grads(s.shape[0])
    ref_d, _, ref_stats, ref_grad = oracle(s, t, y, 1, MIX, 2.0, True, gd, gc)
    assert_close(dv, ref_d, 2e-5, 2e-5, "div")
    grad = ops().rows_backward(gd, gc, s, t, y, stats, 1, MIX, 2.0, IGNORE, True)
    assert_close(grad, ref_grad, 3e-5, 5e-7 * ref_grad.abs().max().item(), "grad")


def test_ce_only_never_reads_the_teacher():
    s, _, y = make_inputs(torch.bfloat16, 777, 0)
    dv, ce, stats = ops().rows_forward(s, None, y, 0, 0.0, 1.0, IGNORE, True)
    ref_d, ref_ce, ref_stats, _ = oracle(s, None, y, 0, 0.0, 1.0, True)
    assert torch.equal(dv, torch.zeros_like(dv))
    assert_close(ce, ref_ce, 2e-6, 2e-5, "ce")
    assert_close(stats, ref_stats, 2e-6, 2e-5, "stats")


def test_nan_logits_propagate():
    s, t, y = make_inputs(torch.float32, 2000, 1)
    s[4, 1500] = float("nan")
    dv, ce, stats = ops().rows_forward(s, t, y, 1, MIX, 1.0, IGNORE, True)
    assert dv[4].isnan() and not dv[[0, 1, 3, 5]].isnan().any()


def test_empty_rows():
    s = torch.randn(0, 50)
    dv, ce, stats = ops().rows_forward(s, s, torch.zeros(0, dtype=torch.long), 1, MIX, 1.0, IGNORE, True)
    assert dv.shape == (0,) and stats.shape == (0, 4)
    grad = ops().rows_backward(dv, ce, s, s, torch.zeros(0, dtype=torch.long), stats, 1, MIX, 1.0, IGNORE, True)
    assert grad.shape == (0, 50)


@pytest.mark.parametrize("call,match", [
    (lambda s, t, y: ops().rows_forward(s[None], t, y, 1, MIX, 1.0, IGNORE, True), "student must be 2-D"),
    (lambda s, t, y: ops().rows_forward(s.t(), t.t(), y, 1, MIX, 1.0, IGNORE, False), "student must have a contiguous"),
    (lambda s, t, y: ops().rows_forward(s.double(), t, y, 1, MIX, 1.0, IGNORE, True), "student must be float32"),
    (lambda s, t, y: ops().rows_forward(s, None, y, 1, MIX, 1.0, IGNORE, True), "teacher must be given"),
    (lambda s, t, y: ops().rows_forward(s, t[:, :-1], y, 1, MIX, 1.0, IGNORE, True), "teacher must have"),
    (lambda s, t, y: ops().rows_forward(s, t, None, 1, MIX, 1.0, IGNORE, True), "labels must be given"),
    (lambda s, t, y: ops().rows_forward(s, t, y.int(), 1, MIX, 1.0, IGNORE, True), "labels must be int64"),
    (lambda s, t, y: ops().rows_forward(s, t, y[:-1], 1, MIX, 1.0, IGNORE, True), "labels must have shape"),
    (lambda s, t, y: ops().rows_forward(s, t, y, 7, MIX, 1.0, IGNORE, True), "divergence must be"),
    (lambda s, t, y: ops().rows_forward(s, t, y, 1, MIX, 0.0, IGNORE, True), "temperature must be"),
    (lambda s, t, y: ops().rows_forward(s, t, y, 3, 1.5, 1.0, IGNORE, True), "mix must lie"),
    (lambda s, t, y: ops().rows_backward(torch.ones(3), torch.ones(6), s, t, y, torch.zeros(6, 4), 1, MIX, 1.0,
                                         IGNORE, True), "grad_div must have shape"),
    (lambda s, t, y: ops().rows_backward(torch.ones(6), torch.ones(6).double(), s, t, y, torch.zeros(6, 4), 1, MIX,
                                         1.0, IGNORE, True), "grad_ce must be float32"),
    (lambda s, t, y: ops().rows_backward(torch.ones(6), torch.ones(6), s, t, y, torch.zeros(6, 3), 1, MIX, 1.0,
                                         IGNORE, True), "stats must have shape"),
])
def test_argument_checks_name_the_argument(call, match):
    s, t, y = make_inputs(torch.float32, 64, 1, strided=False)
    with pytest.raises(RuntimeError, match=match):
        call(s, t, y)


@pytest.mark.parametrize("div,with_ce", [(1, True), (3, False), (0, True)])
def test_opcheck(div, with_ce):
    s, t, y = make_inputs(torch.float32, 300, div)
    teacher, labels = (t if div else None), (y if with_ce else None)
    fwd_args = (s, teacher, labels, div, MIX, 1.5, IGNORE, with_ce)
    torch.library.opcheck(ops().rows_forward.default, fwd_args)
    _, _, stats = ops().rows_forward(*fwd_args)
    gd, gc = row_grads(s.shape[0])
    torch.library.opcheck(ops().rows_backward.default,
                          (gd, gc, s, teacher, labels, stats, div, MIX, 1.5, IGNORE, with_ce))


def test_compiles_without_graph_break():
    s, t, y = make_inputs(torch.float32, 500, 1, strided=False)

    def f(s, t, y):
        dv, ce, stats = ops().rows_forward(s, t, y, 1, MIX, 2.0, IGNORE, True)
        return dv.sum() + ce.sum(), stats

    eager = f(s, t, y)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(s, t, y)
    assert torch.allclose(eager[0], compiled[0]) and torch.allclose(eager[1], compiled[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_large_enough_for_huge_pages(dtype):
    """A gradient over 8 MB takes the huge-page path (advice + one write per 2 MB block before the rows run)."""
    s, t, y = make_inputs(dtype, 32000, 1, rows=160 if dtype == torch.bfloat16 else 80, strided=False)
    _, _, stats = ops().rows_forward(s, t, y, 1, MIX, 1.0, IGNORE, True)
    gd, gc = row_grads(s.shape[0])
    grad = ops().rows_backward(gd, gc, s, t, y, stats, 1, MIX, 1.0, IGNORE, True)
    assert grad.numel() * grad.element_size() > 8 * 2**20
    _, _, _, ref_grad = oracle(s, t, y, 1, MIX, 1.0, True, gd, gc)
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad, ref_grad, rtol, atol * ref_grad.abs().max().item(), "grad")


@pytest.mark.skipif(os.environ.get("DISTILLKIT_CPU_CAPABILITY") == "portable", reason="already the portable run")
def test_portable_loops_pass_this_file():
    """The hand-written AVX-512 loops are what this CPU runs when it has AVX-512; the compiler-vectorized
    (portable) loops run everywhere else. Run this whole file once more on the portable ones."""
    env = dict(os.environ, DISTILLKIT_CPU_CAPABILITY="portable")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_into_a_given_buffer(dtype):
    s, t, y = make_inputs(dtype, 1271, 3)
    _, _, stats = ops().rows_forward(s, t, y, 3, MIX, 1.3, IGNORE, True)
    gd, gc = row_grads(s.shape[0])
    args = (gd, gc, s, t, y, stats, 3, MIX, 1.3, IGNORE, True)
    out = torch.full(s.shape, float("nan"), dtype=dtype)  # reused buffer with stale contents
    assert ops().rows_backward_into(*args, out) is None
    assert torch.equal(out, ops().rows_backward(*args))  # masked rows too: every entry is written
    torch.library.opcheck(ops().rows_backward_into.default, (*args, torch.empty(s.shape, dtype=dtype)))


@pytest.mark.parametrize("make_out,match", [
    (lambda s: torch.full(s.shape, 7.0, dtype=torch.float16), "out must have the student's dtype"),
    (lambda s: torch.full((s.shape[0], s.shape[1] + 1), 7.0), "out must have shape"),
    (lambda s: torch.full((s.shape[1], s.shape[0]), 7.0).t(), "out must be contiguous"),
    (lambda s: s, "out must not overlap the student"),
])
def test_backward_out_checks_name_the_argument(make_out, match):
    s, t, y = make_inputs(torch.float32, 64, 1, strided=False)
    _, _, stats = ops().rows_forward(s, t, y, 1, MIX, 1.0, IGNORE, True)
    gd, gc = row_grads(s.shape[0])
    out = make_out(s)
    before = out.clone()
    with pytest.raises(RuntimeError, match=match):
        ops().rows_backward_into(gd, gc, s, t, y, stats, 1, MIX, 1.0, IGNORE, True, out)
    assert torch.equal(out, before)  # nothing written


def test_cpu_loops_follow_the_cpu_and_the_switch():
    loops = _ext._C.cpu_loops()
    if os.environ.get("DISTILLKIT_CPU_CAPABILITY") == "portable":
        assert loops == "portable"
        return
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("CPU flags are read from /proc/cpuinfo")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    has_avx512 = {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= set(flags)
    assert loops == ("avx512" if has_avx512 else "portable")
    assert f"cpu loops: {loops}" in _ext.describe()


def test_backward_into_compiles_without_graph_break():
    s, t, y = make_inputs(torch.float32, 500, 1, strided=False)
    _, _, stats = ops().rows_forward(s, t, y, 1, MIX, 2.0, IGNORE, True)
    gd, gc = row_grads(s.shape[0])

    def f(out):
        ops().rows_backward_into(gd, gc, s, t, y, stats, 1, MIX, 2.0, IGNORE, True, out)
        return out * 2

    expected = ops().rows_backward(gd, gc, s, t, y, stats, 1, MIX, 2.0, IGNORE, True)
    out = torch.zeros_like(s)
    doubled = torch.compile(f, fullgraph=True, backend="aot_eager")(out)
    assert torch.equal(out, expected) and torch.equal(doubled, expected * 2)  # the mutation is kept
