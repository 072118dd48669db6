"""Shared by tests/core/test_native_cpu_*.py (no tests here): the float64 oracle of docs/DESIGN.md for the
C++ CPU kernels (csrc/distill_cpu.cpp), their inputs, and the calls with the ops' full schema.

Forward: D, ce and the stats [m_t, ls_a, m_s, ls_b, c, m_1, ls_1, ref] per row (raw maxima, log-sums of
exp((x - m) / T), ref of the one-pass KLs); backward: the student gradient against autograd of
sum(grad_div * D + grad_ce * ce) in float64. Inputs are quantized to the kernel's dtype first, so the
oracle sees the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from distillkit.core.backends import _ext

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")

IGNORE = -100
MIX = 0.3  # beta for jsd, skew for the skew divergences
AB = (0.7, 0.4)  # (alpha, beta) of alpha_beta where a test does not choose them
DIVERGENCES = range(8)
# Gradient tolerances (rtol, atol relative to the largest reference value), tighter than the
# package-wide table (distillkit.core.tolerances) for fp32. The fp32 atol is set by the mixtures' h - q c,
# which can cancel to ~1e-3 of q: the fp32 log-sums in the stats and (x - m) / T (1 ulp = 2e-6 at ~20)
# then move that gradient by ~5e-7 of the largest entry. Eager fp32 PyTorch errs by 3e-7 on the same element
# (tvd, V=50257, T=0.5).
GRAD_TOL = {torch.float32: (3e-5, 1e-6), torch.bfloat16: (8e-3, 2e-3), torch.float16: (1e-3, 5e-4)}


def ops():
    return torch.ops.distillkit_ext


def params(div: int) -> tuple[float, float]:
    """The ops' (param_a, param_b) of divergence id `div` in these tests."""
    return AB if div == 7 else (MIX, 0.0)


def forward(s, t, y, div, temperature, with_ce=True, *, ab=None, div_vocab=None):
    """rows_forward with the teacher / labels dropped where the op does not read them; the divergence over
    the whole row unless div_vocab says otherwise."""
    vd = s.shape[1] if div_vocab is None else div_vocab
    return ops().rows_forward(s, t if div else None, y if with_ce else None, div, *(ab or params(div)),
                              temperature, IGNORE, with_ce, vd)


def backward(gd, gc, s, t, y, stats, div, temperature, with_ce=True, *, ab=None, div_vocab=None):
    vd = s.shape[1] if div_vocab is None else div_vocab
    return ops().rows_backward(gd, gc, s, t if div else None, y if with_ce else None, stats, div,
                               *(ab or params(div)), temperature, IGNORE, with_ce, vd)


# -- float64 oracle -------------------------------------------------------------------------

def _kl_term(x, log_x, log_y):
    """x (log x - log y) with 0 where x = 0; both logs masked too, so autograd sees no -inf."""
    present = x > 0
    zero = torch.zeros((), dtype=x.dtype)
    return torch.where(present, x * (torch.where(present, log_x, zero) - torch.where(present, log_y, zero)), zero)


def terms64(lp, lq, div):
    """(d, h) of the DESIGN.md table for ids 0-6, float64, NaN-free under autograd for p = 0 or q = 0."""
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros_like(p)
    if div == 0:
        return zero, zero
    if div == 1:
        return _kl_term(p, lp, lq), -p
    if div == 2:
        d = _kl_term(q, lq, lp)
        return d, d
    w_p, w_q = {3: (MIX, 1 - MIX), 4: (MIX, 1 - MIX), 5: (1 - MIX, MIX), 6: (0, 0)}[div]
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


def alpha_beta64(lp, lq, alpha, beta):
    """D per row of the alpha-beta divergence from its definition (Cichocki et al.),
    -1/(a b) sum (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)), and its limits at b = 0 (generalized KL of
    p^a against q^a, / a^2) and a = 0 (of q^b against p^b, / b^2). Powers as exp(k log x) on masked logs:
    0 where x = 0, with a 0 derivative there."""
    zero = torch.zeros((), dtype=lp.dtype)
    p_in, q_in = lp > float("-inf"), lq > float("-inf")
    lp0, lq0 = torch.where(p_in, lp, zero), torch.where(q_in, lq, zero)

    def power(present, log0, k):
        return torch.where(present, (k * log0).exp(), zero)

    if alpha > 0 and beta > 0:
        s = alpha + beta
        cross = power(p_in, lp0, alpha) * power(q_in, lq0, beta)
        terms = cross - alpha / s * power(p_in, lp0, s) - beta / s * power(q_in, lq0, s)
        return -terms.sum(-1) / (alpha * beta)
    # the log-ratio where its weight is present (+inf against a zero on the other side)
    if beta == 0:
        pa, qa = power(p_in, lp0, alpha), power(q_in, lq0, alpha)
        ratio = lp0 - torch.where(p_in, lq, zero)
        return (torch.where(p_in, pa * alpha * ratio, zero) - pa + qa).sum(-1) / alpha**2
    pb, qb = power(p_in, lp0, beta), power(q_in, lq0, beta)
    ratio = lq0 - torch.where(q_in, lp, zero)
    return (torch.where(q_in, qb * beta * ratio, zero) - qb + pb).sum(-1) / beta**2


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


def assert_stats(stats, ref_stats, s, t, div, temperature, rtol=2e-6, atol=2e-5, div_vocab=None):
    """The stats against the oracle's, the ref slot against the tied maxima's choices (and reverse KL's c, which
    depends on it, moved to the kernel's ref)."""
    ref_stats = ref_stats.clone()
    if div in (1, 2):
        ref = stats[:, 7].double()
        dv = div_vocab or s.shape[1]
        assert (refs_at_argmax(s[:, :dv], t[:, :dv], div) == ref[:, None]).any(-1).all(), "ref is y at an argmax of x"
        if div == 2:  # c = E_q[(s - m_s) - (t - ref)] / T
            ref_stats[:, 4] += (ref - ref_stats[:, 7]) / temperature
        ref_stats[:, 7] = ref
    assert_close(stats, ref_stats, rtol, atol, "stats")


def oracle(s, t, y, div, temperature, with_ce, grad_div=None, grad_ce=None, *, ab=None, div_vocab=None):
    """(D, ce, stats) in float64 and, given row gradients, d(sum gd D + gc ce)/ds. The divergence covers the
    first div_vocab ids of both rows (default: all), CE the student's whole row."""
    s64 = s.double().detach().requires_grad_(grad_div is not None)
    vocab = s.shape[1]
    dv = div_vocab or vocab
    zeros = torch.zeros(s.shape[0], dtype=torch.float64)
    if div:
        t_d, s_d = t[:, :dv], s[:, :dv]
        lp = (t_d.double() / temperature).log_softmax(-1)
        lq = (s64[:, :dv] / temperature).log_softmax(-1)
        if div == 7:  # c = sum_j q_j dD/dq_j = sum_j dD/d(log q_j), log q as a free variable
            alpha, beta = ab or AB
            D = alpha_beta64(lp, lq, alpha, beta)
            lq_free = lq.detach().requires_grad_()
            c = torch.autograd.grad(alpha_beta64(lp, lq_free, alpha, beta).sum(), lq_free)[0].sum(-1)
        else:
            d, h = terms64(lp, lq, div)
            D, c = d.sum(-1), h.sum(-1)
        m_t, ls_a = max_logsum64(t_d, temperature)
        m_s, ls_b = max_logsum64(s_d, temperature)
        ref = refs_at_argmax(s_d, t_d, div).amax(-1) if div in (1, 2) else zeros
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

def make_inputs(dtype, vocab, div, *, rows=6, strided=True, seed=0, teacher_dtype=None, reverse_type=None):
    """Rows with a row stride != V and an unaligned start (strided), -inf teacher entries,
    and labels that are valid, ignored and out of range on both sides. Reverse-type divergences (reverse KL,
    alpha_beta with alpha = 0) get the student masked where the teacher is."""
    g = torch.Generator().manual_seed(seed)
    pad = 21 if strided else 0
    base_s = (torch.randn(rows, vocab + pad, generator=g) * 2.5).to(dtype)
    base_t = (torch.randn(rows, vocab + pad, generator=g) * 2.5 + 0.5).to(teacher_dtype or dtype)
    s = base_s[:, 5:5 + vocab] if strided else base_s
    t = base_t[:, 3:3 + vocab] if strided else base_t
    t[1, ::5] = float("-inf")  # masked vocabulary entries
    t[2, : vocab // 2] = float("-inf")
    if reverse_type is None:
        reverse_type = div == 2
    if reverse_type:  # +inf where the student has mass and the teacher none: mask both
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
