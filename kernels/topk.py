"""Triton kernels of the sparse-teacher (top-k) distillation loss (pure Triton: no allocation, no autograd).

Per row: student logits s [V], temperature T, b = s / T; the teacher's K ids i_k (id < 0 or >= V:
absent) and its log-probabilities lp_k over the categories, already normalized by the caller
(distillkit/sparse/topk.py): over the K ids ("renormalize") or over K ids + one tail bucket lp_tail
("bucket"). Absent ids have lp_k = -inf and are no category.

Student side, with L = lse(b) over the full row and g_k = b[i_k]:

    renormalize  lq_k = g_k - lse_k(g)                      (q restricted to the K ids, renormalized)
    bucket       lq_k = g_k - L,   q_tail = max(1 - sum_k q_k, rest_floor), computed as (Z - Z_K) / Z
                 from the row's sums Z = sum_j e^(b_j - m), Z_K = sum_k e^(g_k - m) with one reference m;
                 the floor (2**-20, distillkit.sparse.reference.REST_FLOOR) is about the resolution of
                 that difference in fp32 (the teacher's rest is floored the same way by the caller)

    forward_kl   D = sum_c p_c (lp_c - lq_c)     reverse_kl  D = sum_c q_c (lq_c - lp_c)
    (c over the K ids, plus the tail bucket for "bucket"; 0 log 0 = 0)

Gradient w.r.t. b (docs/SPARSE.md derives it), for an id i_k and for a token j outside the top-k:

                 top-k id i_k                     other token j (bucket only; 0 for renormalize)
    forward_kl   q_k - p_k                        q_j (1 - p_tail / q_tail)
    reverse_kl   q_k (lq_k - lp_k - D)            q_j (lq_tail - lp_tail - D)

grad_s = grad_div / T * dD/db + grad_ce * (softmax(s) - onehot(y)), CE at temperature 1 over all V.

Memory traffic (one unit = one read of the [N, V] student logits): forward 1 unit for "bucket" or with
CE (one online pass fused with the gather of K ids), O(K) for "renormalize" without CE; backward one
read of s and one write of the dense gradient (2 units).
"""

import triton
import triton.language as tl

from .distill import (FORWARD_KL, NONE, REVERSE_KL, _online_lse_step, _row_coefficients, _row_offset, _safe_max,
                      _store_ce)

# The top-k stats row: (lse_norm (L for bucket, lse_k(g) for renormalize), lq_tail, D, lse(s)).
NUM_STATS = tl.constexpr(4)


@triton.jit
def _gather_topk(s_row, ids_ptr, tlp_ptr, row, k, vocab_size, inv_temperature, BLOCK_K: tl.constexpr):
    """(ids, present, s[ids], g = b[ids] (-inf where absent), lp (-inf where absent)) of one row."""
    kk = tl.arange(0, BLOCK_K)
    in_k = kk < k
    ids = tl.load(ids_ptr + row * k + kk, mask=in_k, other=-1).to(tl.int64)
    present = in_k & (ids >= 0) & (ids < vocab_size)
    s_k = tl.load(s_row + tl.where(present, ids, 0), mask=present, other=float("-inf")).to(tl.float32)
    g = tl.where(present, s_k * inv_temperature, float("-inf"))
    lp = tl.load(tlp_ptr + row * k + kk, mask=in_k, other=float("-inf"))
    lp = tl.where(present, lp, float("-inf"))
    return ids, present, s_k, g, lp


@triton.jit
def topk_forward_kernel(
    student_ptr, ids_ptr, tlp_ptr, ttail_ptr, labels_ptr, div_ptr, ce_ptr, stats_ptr,
    s_n_inner, s_stride_outer, s_stride_inner,
    vocab_size, k, inv_temperature, ignore_index, rest_floor,
    DIVERGENCE: tl.constexpr, BUCKET: tl.constexpr, WITH_CE: tl.constexpr, FULL_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: D, ce and the statistics of the backward.
    BUCKET implies DIVERGENCE != NONE; FULL_PASS = WITH_CE or BUCKET (set by the launcher)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + _row_offset(row, s_n_inner, s_stride_outer, s_stride_inner)
    NEG_INF: tl.constexpr = float("-inf")
    zero = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    m_b, z_b = zero + NEG_INF, zero  # b = s / T (bucket)
    m_s, z_s = zero + NEG_INF, zero  # s (CE)
    if FULL_PASS:
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + cols
            s = tl.load(s_row + offs, mask=offs < vocab_size, other=NEG_INF).to(tl.float32)
            if WITH_CE:
                m_s, z_s = _online_lse_step(m_s, z_s, s, 1.0)
            if BUCKET:
                m_b, z_b = _online_lse_step(m_b, z_b, s * inv_temperature, 1.0)

    div = zero
    lse_norm = zero
    lq_tail = zero
    if DIVERGENCE != NONE:
        _, present, _, g, lp = _gather_topk(s_row, ids_ptr, tlp_ptr, row, k, vocab_size, inv_temperature, BLOCK_K)
        p = tl.exp(lp)
        if BUCKET:
            m_ref = _safe_max(m_b)
            z_k = tl.sum(tl.exp(g - m_ref), 0)
            lse_norm = m_b + tl.log(z_b)
            lq = g - lse_norm
            q_tail = tl.maximum((z_b - z_k) / z_b, rest_floor)
            lq_tail = tl.log(q_tail)
            lp_tail = tl.load(ttail_ptr + row)
            p_tail = tl.exp(lp_tail)
        else:
            m_g = tl.max(g, 0)
            lse_norm = m_g + tl.log(tl.sum(tl.exp(g - _safe_max(m_g)), 0))
            lq = g - _safe_max(lse_norm)
        q = tl.exp(lq)
        if DIVERGENCE == FORWARD_KL:
            div = tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), 0)
            if BUCKET:
                div += tl.where(p_tail > 0, p_tail * (lp_tail - lq_tail), 0.0)
        else:
            div = tl.sum(tl.where(q > 0, q * (lq - lp), 0.0), 0)
            if BUCKET:
                div += tl.where(q_tail > 0, q_tail * (lq_tail - lp_tail), 0.0)

    m_s, ls_s = _store_ce(row, s_row, labels_ptr, ce_ptr, m_s, z_s, ignore_index, vocab_size, WITH_CE)
    tl.store(div_ptr + row, div)
    stats_row = stats_ptr + row * NUM_STATS
    tl.store(stats_row + 0, lse_norm)
    tl.store(stats_row + 1, lq_tail)
    tl.store(stats_row + 2, div)
    tl.store(stats_row + 3, m_s + ls_s)


@triton.jit
def topk_backward_kernel(
    grad_div_ptr, grad_ce_ptr, student_ptr, ids_ptr, tlp_ptr, ttail_ptr, labels_ptr, stats_ptr, grad_ptr,
    s_n_inner, s_stride_outer, s_stride_inner,
    vocab_size, k, inv_temperature, ignore_index, rest_floor,
    DIVERGENCE: tl.constexpr, BUCKET: tl.constexpr, WITH_CE: tl.constexpr, FULL_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: the dense gradient (every token), then the top-k ids overwritten with theirs."""
    row = tl.program_id(0).to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    cols = tl.arange(0, BLOCK_V)
    g_div, g_ce, label = _row_coefficients(row, grad_div_ptr, grad_ce_ptr, labels_ptr, ignore_index, vocab_size,
                                           WITH_CE, True)
    if DIVERGENCE == NONE:
        g_div = g_div * 0.0
    grad_row = grad_ptr + row * vocab_size
    out_dtype = grad_ptr.dtype.element_ty

    if (g_div == 0) & (g_ce == 0):
        # Masked rows (padding, no teacher, ignored label): zeros, nothing read.
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + cols
            tl.store(grad_row + offs, tl.zeros([BLOCK_V], tl.float32).to(out_dtype), mask=offs < vocab_size)
    else:
        s_row = student_ptr + _row_offset(row, s_n_inner, s_stride_outer, s_stride_inner)
        stats_row = stats_ptr + row * NUM_STATS
        lse_norm = tl.load(stats_row + 0)
        lq_tail = tl.load(stats_row + 1)
        div = tl.load(stats_row + 2)
        lse_s = tl.load(stats_row + 3)
        scale = g_div * inv_temperature
        tail_coef = g_div * 0.0  # dD/db_j = q_j * tail_coef for tokens outside the top-k (bucket)
        if BUCKET:
            lp_tail = tl.load(ttail_ptr + row)
            q_tail = tl.exp(lq_tail)
            if DIVERGENCE == FORWARD_KL:
                tail_coef = 1.0 - tl.where(lp_tail > NEG_INF, tl.exp(lp_tail - lq_tail), 0.0)
            elif DIVERGENCE == REVERSE_KL:
                tail_coef = tl.where(q_tail > 0, lq_tail - lp_tail - div, 0.0)
        # Pass 1: every token as if outside the top-k (divergence tail term + CE).
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab_size
            s = tl.load(s_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
            out = tl.zeros([BLOCK_V], tl.float32)
            if BUCKET:
                if g_div != 0:
                    q = tl.exp(s * inv_temperature - lse_norm)
                    out += tl.where(q > 0, (scale * tail_coef) * q, 0.0)
            if WITH_CE:
                if g_ce != 0:
                    out += g_ce * (tl.exp(s - lse_s) - tl.where(offs == label, 1.0, 0.0))
            tl.store(grad_row + offs, out.to(out_dtype), mask=in_row)
        # Pass 2: the top-k ids get their own formula (a store, not an add: one rounding).
        if DIVERGENCE != NONE:
            if g_div != 0:
                tl.debug_barrier()  # pass 1's stores of this row land before pass 2 overwrites some
                ids, present, s_k, g, lp = _gather_topk(s_row, ids_ptr, tlp_ptr, row, k, vocab_size,
                                                   inv_temperature, BLOCK_K)
                lq = g - _safe_max(lse_norm)
                q = tl.exp(lq)
                p = tl.exp(lp)
                if DIVERGENCE == FORWARD_KL:
                    d_db = q - p
                else:
                    d_db = tl.where(q > 0, q * (lq - lp - div), 0.0)
                out_k = scale * d_db
                if WITH_CE:
                    out_k += g_ce * (tl.exp(s_k - lse_s) - tl.where(ids == label, 1.0, 0.0))
                tl.store(grad_row + tl.where(present, ids, 0), out_k.to(out_dtype), mask=present)
