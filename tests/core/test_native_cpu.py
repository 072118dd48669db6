"""The C++ CPU kernels (csrc/distill_cpu.cpp) against float64 formulas of docs/DESIGN.md.

Forward: D, ce and the stats [m_t, ls_a, m_s, ls_b, c, m_1, ls_1, ref] per row (raw maxima, log-sums
of exp((x - m) / T), ref of the one-pass KLs); backward: the student gradient against autograd of
sum(grad_div * D + grad_ce * ce) in float64. Inputs are quantized to the kernel's dtype first, so the
oracle sees the same numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distillkit.core import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")

IGNORE = -100
MIX = 0.3  # beta for jsd, skew for the skew divergences
DIVERGENCES = range(7)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Gradient tolerances (rtol, atol relative to the largest reference value), tighter than the
# package-wide table (distillkit.core.tolerances) for fp32. The fp32 atol is set by the mixtures' h - q c,
# which can cancel to ~1e-3 of q: the fp32 log-sums in the stats and (x - m) / T (1 ulp = 2e-6 at ~20)
# then move that gradient by ~5e-7 of the largest entry. Eager fp32 PyTorch errs by 3e-7 on the same element
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


def max_logsum64(x, temperature):
    """(raw row max m, log sum exp((x - m) / T)) in float64: the stats' (m, ls) pairs."""
    x = x.double()
    m = x.amax(-1)
    ref = torch.where(m == float("-inf"), 0.0, m)
    return m, ((x - ref[:, None].detach()) / temperature).logsumexp(-1)


def refs_at_argmax(s, t, div):
    """[N, V] float64: y where x reaches its row max, -inf elsewhere (x = t, y = s for forward KL; swapped for
    reverse KL). The one-pass KLs' ref is one of these (which one, among tied maxima, is the kernel's choice)."""
    x, y = (t, s) if div == 1 else (s, t)
    x, y = x.double(), y.double()
    return torch.where(x == x.amax(-1, keepdim=True), y, float("-inf"))


def assert_stats(stats, ref_stats, s, t, div, temperature, rtol=2e-6, atol=2e-5):
    """The stats against the oracle's, the ref slot against the tied maxima's choices (and reverse KL's c, which
    depends on it, moved to the kernel's ref)."""
    ref_stats = ref_stats.clone()
    if div in (1, 2):
        ref = stats[:, 7].double()
        assert (refs_at_argmax(s, t, div) == ref[:, None]).any(-1).all(), "ref is y at an argmax of x"
        if div == 2:  # c = E_q[(s - m_s) - (t - ref)] / T
            ref_stats[:, 4] += (ref - ref_stats[:, 7]) / temperature
        ref_stats[:, 7] = ref
    assert_close(stats, ref_stats, rtol, atol, "stats")


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
        m_t, ls_a = max_logsum64(t, temperature)
        m_s, ls_b = max_logsum64(s, temperature)
        ref = refs_at_argmax(s, t, div).amax(-1) if div in (1, 2) else zeros
        if div == 2:  # c = E_q[(s - m_s) - (t - ref)] / T = D + (ls_b - ls_a) - (m_t - ref) / T
            c = D + (ls_b - ls_a) - (m_t - ref) / temperature
    else:
        D, c = zeros, zeros
        m_t = ls_a = m_s = ls_b = ref = zeros
    if with_ce:
        lse_s = s64.logsumexp(-1)
        valid = (y != IGNORE) & (y >= 0) & (y < vocab)
        target = s64.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
        ce = torch.where(valid, lse_s - target, 0.0)
        m_1, ls_1 = max_logsum64(s, 1.0)
    else:
        ce = zeros
        m_1 = ls_1 = zeros
    stats = torch.stack([m_t, ls_a, m_s, ls_b, c, m_1, ls_1, ref], 1).detach()
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
    assert_stats(stats, ref_stats, s, t, div, temperature)

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
    assert torch.equal(ce, torch.zeros_like(ce)) and torch.equal(stats[:, 5:7], torch.zeros_like(stats[:, 5:7]))
    assert_stats(stats, ref_stats, s, t, div, 1.7)
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
    assert_stats(stats, ref_stats, s, t, div, 2.0)
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
    assert_stats(stats, ref_stats, s, None, 0, 1.0)


def test_nan_logits_propagate():
    s, t, y = make_inputs(torch.float32, 2000, 1)
    s[4, 1500] = float("nan")
    dv, ce, stats = ops().rows_forward(s, t, y, 1, MIX, 1.0, IGNORE, True)
    assert dv[4].isnan() and not dv[[0, 1, 3, 5]].isnan().any()


def test_empty_rows():
    s = torch.randn(0, 50)
    dv, ce, stats = ops().rows_forward(s, s, torch.zeros(0, dtype=torch.long), 1, MIX, 1.0, IGNORE, True)
    assert dv.shape == (0,) and stats.shape == (0, 8)
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
    (lambda s, t, y: ops().rows_backward(torch.ones(3), torch.ones(6), s, t, y, torch.zeros(6, 8), 1, MIX, 1.0,
                                         IGNORE, True), "grad_div must have shape"),
    (lambda s, t, y: ops().rows_backward(torch.ones(6), torch.ones(6).double(), s, t, y, torch.zeros(6, 8), 1, MIX,
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


# -- the 0.2.0 contract: exact softmax at any scale, NaN rows, no subnormals ---------------------------------

def _backward(gd, gc, s, t, y, stats, div, temperature, with_ce=True):
    return ops().rows_backward(gd, gc, s, t if div else None, y if with_ce else None, stats, div, MIX, temperature,
                               IGNORE, with_ce)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_exact_at_huge_logits(dtype):
    """lse(s) = 1e8 + log 2 rounds to 1e8 in fp32 (q was [1, 1, 0, 0]); the raw max and the log-sum apart
    keep q = [0.5, 0.5, 0, 0] exact."""
    s = torch.tensor([[1e8, 1e8, 0.0, 0.0]], dtype=dtype)
    t = torch.zeros(1, 4, dtype=dtype)
    dv, _, stats = ops().rows_forward(s, t, None, 1, MIX, 1.0, IGNORE, False)
    assert stats.shape == (1, 8)
    assert stats[0, 0] == 0 and stats[0, 2] == s[0, 0].float()  # raw maxima
    grad = _backward(torch.ones(1), torch.zeros(1), s, t, None, stats, 1, 1.0, with_ce=False)
    assert grad.float().tolist() == [[0.25, 0.25, -0.25, -0.25]]
    ref_d, _, ref_stats, _ = oracle(s, t, None, 1, MIX, 1.0, False)
    assert_close(dv, ref_d, 2e-6, 2e-5, "div")
    assert_stats(stats, ref_stats, s, t, 1, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reverse_kl_of_identical_rows_is_exactly_zero(dtype, temperature):
    """c = E_q[x_b - x_a] has no large constant in it: s = t gives D = 0 and a zero gradient, exactly."""
    s = torch.tensor([[1e4, -1e4, 0.5, -3.0]], dtype=dtype)
    dv, _, stats = ops().rows_forward(s, s.clone(), None, 2, MIX, temperature, IGNORE, False)
    assert dv.item() == 0.0 and stats[0, 4] == 0.0
    grad = _backward(torch.ones(1), torch.zeros(1), s, s.clone(), None, stats, 2, temperature, with_ce=False)
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
@pytest.mark.parametrize("div", range(1, 7))
def test_non_finite_rows(div, dtype, temperature):
    s, t, y = _non_finite_rows(dtype)
    dv, ce, stats = ops().rows_forward(s, t, y, div, MIX, temperature, IGNORE, True)
    bad = torch.tensor([True, True, True, False, True, False])
    assert dv[bad].isnan().all() and dv[~bad].isfinite().all(), dv
    assert stats[bad][:, [1, 3, 4]].isnan().all()  # ls_a, ls_b, c
    # CE reads only the student: finite except on the row whose student has a NaN
    assert ce[[0, 1, 2, 3]].isfinite().all() and ce[4].isnan() and ce[5] == 0
    assert stats[4, 6].isnan() and stats[[0, 1, 2, 3, 5], 6].isfinite().all()
    ok = ~bad
    ref_d, ref_ce, _, _ = oracle(s[ok], t[ok], y[ok], div, MIX, temperature, True)
    assert_close(dv[ok], ref_d, 2e-5, 2e-5, "div")
    assert_close(ce[ok], ref_ce, 2e-6, 2e-5, "ce")
    # grad_div = 0 skips the divergence: no NaN from a broken teacher reaches a CE-only gradient
    gd, gc = torch.zeros(6), torch.ones(6)
    grad = _backward(gd, gc, s, t, y, stats, div, temperature)
    assert not grad[[0, 1, 2, 3, 5]].isnan().any()
    _, _, _, ref_grad = oracle(s[[0, 1, 2, 3]], None, y[[0, 1, 2, 3]], 0, MIX, temperature, True, gd[:4], gc[:4])
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad[[0, 1, 2, 3]], ref_grad, rtol, atol, "CE-only grad")
    # grad_div != 0 on an undefined row: NaN over the whole row
    grad = _backward(torch.ones(6), torch.zeros(6), s, t, y, stats, div, temperature)
    assert grad[bad].isnan().all() and not grad[~bad].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_rows_ce_only(dtype):
    s, _, y = _non_finite_rows(dtype)
    s[2] = float("-inf")
    s[1, 3] = float("inf")
    _, ce, stats = ops().rows_forward(s, None, y, 0, MIX, 1.0, IGNORE, True)
    assert ce[[1, 2, 4]].isnan().all() and ce[[0, 3]].isfinite().all() and ce[5] == 0
    assert stats[[1, 2, 4], 6].isnan().all() and torch.equal(stats[:, :5], torch.zeros(6, 5))


FLT_MIN = torch.finfo(torch.float32).tiny


def _below_flt_min(g):
    return (g != 0) & (g.float().abs() < FLT_MIN)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("div", range(7))
def test_no_subnormal_gradient_entries(div, dtype, temperature):
    """A sharp teacher (and student) puts gradient entries far below FLT_MIN: every store path (fp32 in place,
    bf16 and fp16 conversions; divergence only, CE only, both) writes them as 0. float16 keeps its own
    subnormals (2^-24..2^-14), which mean-reduced gradients need."""
    g = torch.Generator().manual_seed(div)
    vocab = 4000
    s = (torch.randn(6, vocab, generator=g) * 30).to(dtype)
    t = (torch.randn(6, vocab, generator=g) * 60).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    gd = torch.tensor([1e-3, 0.0, 1e-3, 1.0, 1e-6, 0.0])
    gc = torch.tensor([0.0, 1e-3, 1e-3, 1.0, 1e-6, 0.0])
    teacher = t if div else None
    _, _, stats = ops().rows_forward(s, teacher, y, div, MIX, temperature, IGNORE, True)
    grad = _backward(gd, gc, s, t, y, stats, div, temperature)
    assert not _below_flt_min(grad).any(), grad[_below_flt_min(grad)][:8]
    if dtype == torch.float16:  # kept: the fp32 values below 2^-14 but above FLT_MIN round to fp16 subnormals
        assert ((grad != 0) & (grad.float().abs() < 6.103515625e-05)).any()
    assert not grad.isnan().any() and torch.equal(grad[5], torch.zeros_like(grad[5]))
    # still the gradient, up to the flushed entries, within the package-wide tolerance (D here reaches ~100,
    # so reverse KL's x_b - x_a - c cancels at that magnitude); atol relative to the row's coefficients, not
    # to its largest entry (near one-hot rows cancel h - q c down to an ulp of c)
    from distillkit.core.tolerances import TOLERANCES

    _, _, _, ref_grad = oracle(s, t, y, div, MIX, temperature, True, gd, gc)
    tol = TOLERANCES[(dtype, "grad")]
    for row in range(5):
        # + FLT_MIN (the flush) and, for float16, its subnormals' spacing 2^-24 (where row 4's entries lie)
        row_atol = tol.atol * (gd[row].item() / temperature + gc[row].item()) + FLT_MIN
        row_atol += 2.0**-24 if dtype == torch.float16 else 0.0
        assert_close(grad[row], ref_grad[row], tol.rtol, row_atol, f"grad row {row}")
    out = torch.full(s.shape, float("nan"), dtype=dtype)
    ops().rows_backward_into(gd, gc, s, teacher, y, stats, div, MIX, temperature, IGNORE, True, out)
    assert torch.equal(out, grad)


# -- any logit scale against float64 (distillkit.reference on the same fp32 inputs) --------------------------

def _reference_terms(s, t, y, div, temperature):
    from distillkit.core import reference

    name = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"][div - 1]
    d = reference.divergence_per_token(s, t, divergence=name, beta=MIX, skew=MIX, temperature=temperature)
    return d, reference.cross_entropy_per_token(s, y, IGNORE)


def _reference_rows(s, t, y, div, temperature, gd, gc, dtype):
    """(D, ce, d(sum gd D + gc ce)/ds) from distillkit.reference computed in `dtype`."""
    s_ = s.to(dtype).requires_grad_()
    d, ce = _reference_terms(s_, t.to(dtype), y, div, temperature)
    loss = (gd.to(dtype) * d).sum() + (gc.to(dtype) * ce).sum()
    grad = torch.autograd.grad(loss, s_)[0]
    return d.detach(), ce.detach(), grad


@pytest.mark.parametrize("temperature", [0.05, 1.0, 50.0])
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4, 1e8])
@pytest.mark.parametrize("div", range(1, 7))
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
    dv, ce, stats = ops().rows_forward(s, t, y, div, MIX, temperature, IGNORE, True)
    grad = ops().rows_backward(gd, gc, s, t, y, stats, div, MIX, temperature, IGNORE, True)
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


@pytest.mark.parametrize("div", [1, 2, 3])
def test_truncated_vocabulary_two_calls(div):
    """native_rows emulates div_vocab < V with two calls: stats slots 0-4 from the divergence call (over the
    shared ids), 5-7 from the CE call (over the student's whole vocabulary); the backward reads both."""
    from distillkit.core.backends import native_rows

    g = torch.Generator().manual_seed(div)
    vocab, shared = 700, 650
    s = torch.randn(2, 3, vocab, generator=g) * 3
    t = torch.randn(2, 3, shared, generator=g) * 3
    s[..., shared:] += 4.0  # the student's max over the whole vocabulary (CE) is not the one over the shared ids
    y = torch.tensor([[0, 699, IGNORE], [5, 660, 1]])
    dv, ce, stats = native_rows.forward(s, t, y, div, MIX, 1.7, IGNORE, True, shared)
    assert stats.shape == (2, 3, 8)
    d_only, _, st_d = ops().rows_forward(s.reshape(6, vocab)[:, :shared], t.reshape(6, shared), None, div, MIX, 1.7,
                                         IGNORE, False)
    _, ce_only, st_ce = ops().rows_forward(s.reshape(6, vocab), None, y.reshape(6), 0, MIX, 1.7, IGNORE, True)
    stats2 = stats.reshape(6, 8)
    assert torch.equal(stats2[:, :5], st_d[:, :5]) and torch.equal(stats2[:, 5:7], st_ce[:, 5:7])
    assert torch.equal(stats2[:, 7], st_d[:, 7])  # ref, the divergence's
    assert torch.equal(dv.reshape(6), d_only) and torch.equal(ce.reshape(6), ce_only)
    gd, gc = torch.rand(2, 3, generator=g), torch.rand(2, 3, generator=g)
    grad = native_rows.backward(gd, gc, s, t, y, stats, div, MIX, 1.7, IGNORE, True, shared)
    s64 = s.double().requires_grad_()
    from distillkit.core import reference

    name = ["forward_kl", "reverse_kl", "jsd"][div - 1]
    d64 = reference.divergence_per_token(s64[..., :shared], t.double(), divergence=name, beta=MIX, skew=MIX,
                                         temperature=1.7)
    ce64 = reference.cross_entropy_per_token(s64, y, IGNORE)
    ref_grad, = torch.autograd.grad((gd.double() * d64).sum() + (gc.double() * ce64).sum(), s64)
    assert_close(dv, d64.detach(), 2e-5, 2e-5, "div")
    assert_close(grad, ref_grad, 3e-5, 1e-6 * ref_grad.abs().max().item(), "grad")
