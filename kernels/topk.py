"""Triton kernels of the sparse-teacher (top-k) distillation loss (pure Triton: no allocation, no autograd).

Per row: student logits s [V], temperature T, b = s / T; the teacher's K ids i_k (id < 0 or >= V:
absent) and its log-probabilities lp_k over the categories, already normalized by the caller
(distillkit/sparse/topk.py): over the K ids ("renormalize", "student_full") or over K ids + one tail
bucket lp_tail ("bucket"). Absent ids have lp_k = -inf and are no category. The tails' ids (TAIL) are
the rows of distillkit/sparse/reference.py's TAIL_REGISTRY.

Student side, with L = lse(b) over the full row and g_k = b[i_k]:

    renormalize  lq_k = g_k - lse_k(g)                      (q restricted to the K ids, renormalized)
    student_full lq_k = g_k - L                             (the full softmax at the ids; forward_kl only)
    bucket       lq_k = g_k - L,   q_tail = max(1 - sum_k q_k, rest_floor), computed as (Z - Z_K) / Z
                 from the row's sums Z = sum_j e^(b_j - m), Z_K = sum_k e^(g_k - m) with one reference m;
                 the floor (2**-20, distillkit.sparse.reference.REST_FLOOR) is about the resolution of
                 that difference in fp32 (the teacher's rest is floored the same way by the caller)

    forward_kl   D = sum_c p_c (lp_c - lq_c)     reverse_kl  D = sum_c q_c (lq_c - lp_c)
    (c over the K ids, plus the tail bucket for "bucket"; 0 log 0 = 0)

Gradient w.r.t. b (docs/SPARSE.md derives it), for an id i_k and for a token j outside the top-k, with
P = sum_k p_k (1, or 0 for a teacher row without a finite log-probability):

                 top-k id i_k                     other token j
    forward_kl   q_k P - p_k (bucket: q_k - p_k)   bucket q_j (1 - p_tail / q_tail), student_full q_j P,
                                                   renormalize 0
    reverse_kl   q_k (lq_k - lp_k - D)            bucket q_j (lq_tail - lp_tail - D), renormalize 0

grad_s = grad_div / T * dD/db + grad_ce * (softmax(s) - onehot(y)), CE at temperature 1 over all V.

Memory traffic (one unit = one read of the [N, V] student logits): forward 1 unit for "bucket",
"student_full" or with CE (one online pass fused with the gather of K ids), O(K) for "renormalize"
without CE; backward one read of s and one write of the dense gradient (2 units).
"""

import triton
import triton.language as tl

from .distill import (_lane_lse_step, _lane_tile, _merge_lse_lanes, _row_coefficients, _row_offset, _store_ce,
                      _vector_width)
from .divergence_terms import FORWARD_KL, LOG2E, LOWEST, NONE, REVERSE_KL

# The tails (TAIL), as numbered in distillkit/sparse/reference.py's TAIL_REGISTRY (tests check it).
RENORMALIZE = tl.constexpr(1)
BUCKET = tl.constexpr(2)
STUDENT_FULL = tl.constexpr(3)

# The top-k stats row: (lse_norm (L, or lse_k(g) for renormalize), tail_stat (lq_tail for bucket, else
# the teacher's mass P), D, lse(s)).
NUM_STATS = tl.constexpr(4)


@triton.jit
def _safe_max(m):
    # exp(x - m) with m = -inf (nothing finite) must give 0, not NaN.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _check_tail(TAIL: tl.constexpr, DIVERGENCE: tl.constexpr):
    """Compile-time: a known tail, that defines the divergence; CE only runs as RENORMALIZE."""
    if TAIL == STUDENT_FULL:
        tl.static_assert(DIVERGENCE == FORWARD_KL, "tail student_full defines forward_kl only")
    elif TAIL == BUCKET:
        tl.static_assert(DIVERGENCE != NONE, "CE only (DIVERGENCE=NONE) is compiled as TAIL=RENORMALIZE")
    elif TAIL != RENORMALIZE:
        tl.static_assert(False, "unknown tail id (distillkit/sparse/reference.py, TAIL_REGISTRY)")


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
    DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, WITH_CE: tl.constexpr, FULL_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: D, ce and the statistics of the backward.
    FULL_PASS = WITH_CE or (DIVERGENCE != NONE and TAIL != RENORMALIZE) (set by the launcher)."""
    _check_tail(TAIL, DIVERGENCE)
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + _row_offset(row, s_n_inner, s_stride_outer, s_stride_inner)
    NEG_INF: tl.constexpr = float("-inf")
    VEC: tl.constexpr = _vector_width(student_ptr, student_ptr, False)
    lanes = tl.zeros([BLOCK_V // VEC], tl.float32)  # running state per lane (kernels/distill.py), merged once
    zero = tl.sum(lanes, 0)
    m_b, z_b = lanes + LOWEST, lanes  # b = s / T (the full softmax of bucket, student_full)
    m_s, z_s = lanes + LOWEST, lanes  # s (CE)
    if FULL_PASS:
        tile = _lane_tile(BLOCK_V, VEC)
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + tile
            s = tl.load(s_row + offs, mask=offs < vocab_size, other=NEG_INF).to(tl.float32)
            if WITH_CE:
                m_s, z_s = _lane_lse_step(m_s, z_s, s, LOG2E)
            if DIVERGENCE != NONE:
                if TAIL != RENORMALIZE:
                    m_b, z_b = _lane_lse_step(m_b, z_b, s * inv_temperature, LOG2E)
    m_b, z_b = _merge_lse_lanes(m_b, z_b, LOG2E)
    m_s, z_s = _merge_lse_lanes(m_s, z_s, LOG2E)

    div = zero
    lse_norm = zero
    tail_stat = zero
    if DIVERGENCE != NONE:
        _, present, _, g, lp = _gather_topk(s_row, ids_ptr, tlp_ptr, row, k, vocab_size, inv_temperature, BLOCK_K)
        p = tl.exp(lp)
        tail_stat = tl.sum(tl.where(p > 0, p, 0.0), 0)  # P: the backward's q_k P - p_k is exactly 0 when P = 0
        if TAIL == RENORMALIZE:
            m_g = tl.max(g, 0)
            lse_norm = m_g + tl.log(tl.sum(tl.exp(g - _safe_max(m_g)), 0))
            lq = g - _safe_max(lse_norm)
        else:
            # The full softmax as it is: a row without a distribution (all -inf, NaN) gives NaN.
            lse_norm = m_b + tl.log(z_b)
            lq = g - lse_norm
        if TAIL == BUCKET:
            m_ref = _safe_max(m_b)
            z_k = tl.sum(tl.exp(g - m_ref), 0)
            q_tail = tl.maximum((z_b - z_k) / z_b, rest_floor)
            tail_stat = tl.log(q_tail)
            lp_tail = tl.load(ttail_ptr + row)
            p_tail = tl.exp(lp_tail)
        q = tl.exp(lq)
        if DIVERGENCE == FORWARD_KL:
            div = tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), 0)
            if TAIL == BUCKET:
                div += tl.where(p_tail > 0, p_tail * (lp_tail - tail_stat), 0.0)
        else:
            div = tl.sum(tl.where(q > 0, q * (lq - lp), 0.0), 0)
            if TAIL == BUCKET:
                div += tl.where(q_tail > 0, q_tail * (tail_stat - lp_tail), 0.0)

    m_s, ls_s = _store_ce(row, s_row, labels_ptr, ce_ptr, m_s, z_s, ignore_index, vocab_size, WITH_CE)
    tl.store(div_ptr + row, div)
    stats_row = stats_ptr + row * NUM_STATS
    tl.store(stats_row + 0, lse_norm)
    tl.store(stats_row + 1, tail_stat)
    tl.store(stats_row + 2, div)
    tl.store(stats_row + 3, m_s + ls_s)


@triton.jit
def topk_backward_kernel(
    grad_div_ptr, grad_ce_ptr, student_ptr, ids_ptr, tlp_ptr, ttail_ptr, labels_ptr, stats_ptr, grad_ptr,
    s_n_inner, s_stride_outer, s_stride_inner,
    vocab_size, k, inv_temperature, ignore_index, rest_floor,
    DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, WITH_CE: tl.constexpr, FULL_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: the dense gradient (every token), then the top-k ids overwritten with theirs."""
    _check_tail(TAIL, DIVERGENCE)
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
        tail_stat = tl.load(stats_row + 1)
        div = tl.load(stats_row + 2)
        lse_s = tl.load(stats_row + 3)
        scale = g_div * inv_temperature
        # dD/db_j = q_j * tail_coef for tokens outside the top-k (0 for renormalize)
        tail_coef = tail_stat  # student_full: P
        if TAIL == BUCKET:
            lp_tail = tl.load(ttail_ptr + row)
            q_tail = tl.exp(tail_stat)
            if DIVERGENCE == FORWARD_KL:
                tail_coef = 1.0 - tl.where(lp_tail > NEG_INF, tl.exp(lp_tail - tail_stat), 0.0)
            elif DIVERGENCE == REVERSE_KL:
                tail_coef = tl.where(q_tail > 0, tail_stat - lp_tail - div, 0.0)
        # Pass 1: every token as if outside the top-k (divergence tail term + CE).
        for start in range(0, vocab_size, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab_size
            s = tl.load(s_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
            out = tl.zeros([BLOCK_V], tl.float32)
            if DIVERGENCE != NONE:
                if TAIL != RENORMALIZE:
                    if g_div != 0:
                        q = tl.exp2((s * inv_temperature - lse_norm) * LOG2E)  # ex2.ftz: no range checks
                        if TAIL == BUCKET:
                            out += tl.where(q > 0, (scale * tail_coef) * q, 0.0)
                        else:  # P is finite or NaN: no guard, a NaN row stays NaN everywhere (as the reference)
                            out += (scale * tail_coef) * q
            if WITH_CE:
                if g_ce != 0:
                    out += g_ce * (tl.exp2((s - lse_s) * LOG2E) - tl.where(offs == label, 1.0, 0.0))
            tl.store(grad_row + offs, out.to(out_dtype), mask=in_row)
        # Pass 2: the top-k ids get their own formula (a store, not an add: one rounding).
        if DIVERGENCE != NONE:
            if g_div != 0:
                tl.debug_barrier()  # pass 1's stores of this row land before pass 2 overwrites some
                ids, present, s_k, g, lp = _gather_topk(s_row, ids_ptr, tlp_ptr, row, k, vocab_size,
                                                   inv_temperature, BLOCK_K)
                if TAIL == RENORMALIZE:
                    lq = g - _safe_max(lse_norm)
                else:
                    lq = g - lse_norm
                q = tl.exp(lq)
                p = tl.exp(lp)
                if DIVERGENCE == FORWARD_KL:
                    if TAIL == BUCKET:
                        d_db = q - p  # the categories' teacher mass P + p_tail is 1
                    else:
                        d_db = q * tail_stat - p
                else:
                    d_db = tl.where(q > 0, q * (lq - lp - div), 0.0)
                out_k = scale * d_db
                if WITH_CE:
                    out_k += g_ce * (tl.exp(s_k - lse_s) - tl.where(ids == label, 1.0, 0.0))
                tl.store(grad_row + tl.where(present, ids, 0), out_k.to(out_dtype), mask=present)
