"""Triton kernels of the fused distillation loss (pure Triton: no allocation, no autograd).

Row math (docs/DESIGN.md has the full table). For one token row with student
logits s, teacher logits t and temperature T: a = t/T, b = s/T, p = softmax(a),
q = softmax(b). Every divergence D(p, q) has the student gradient

    dD/db_k = h_k - q_k * c,      h_j = q_j * dD/dq_j,   c = sum_j h_j,

so the forward saves per-row statistics only and the backward recomputes h
element by element. Cross-entropy uses the raw student logits (temperature 1):
ce = lse(s) - s[y], gradient softmax(s) - onehot(y).

Each log-normalizer is kept as a raw max m and a log-sum ls = log sum e^((x - m)/T),
never added: log p_j = (t_j - m)/T - ls is exact however large |t/T| is (with
lse as one float, s = [1e8, 1e8, 0, 0] gave q = [1, 1, 0, 0]). The max is
subtracted before the 1/T multiply, so no FMA contraction can turn it into an
fma whose rounding error is then exponentiated. A row with a NaN or +inf, or
with no finite entry, defines no distribution: its D and c are NaN. Gradient
entries below the smallest normal fp32 are stored as 0.

Memory traffic (one unit = one read of one [N, V] logits tensor): forward_kl / reverse_kl one online pass
over s and t (2 units), D from running sums rescaled like the online-softmax normalizer; jsd / skew / tvd /
alpha_beta need both normalizers first, two passes (4); backward 3 (read s, t; write grad); CE only
(DIVERGENCE == 0) never reads the teacher (1 + 2).

The vocabulary loops keep their running state per lane (a block is a [BLOCK_V // VEC, VEC] tile, a lane
the VEC consecutive ids of one thread's 16-byte load): reductions along a lane stay in the thread, and the
lanes merge into the row once after the loop, with the shift and rescale of a moving max. Exponentials
are exp2 of a prescaled argument (ex2.approx.ftz: no range checks; a result below 2**-126 is 0). The
two-pass divergences work in base 2 (log2 p, log2 q, log2 of the mixture), scaled to nats by ln 2 once per
term, so their per-element log is one MUFU.LG2 rather than a ~28-instruction accurate log: their per-element
terms, and the divergence ids, are in kernels/divergence_terms.py.

The divergence covers the first div_vocab_size ids (== vocab_size unless teacher
and student vocabularies differ and are truncated to the shared ids); the
student's ids beyond it take part in the CE term only.
"""

import triton
import triton.language as tl

from .divergence_terms import (FORWARD_KL, LOG2E, LOWEST, NONE, REVERSE_KL, SMALLEST_NORMAL, _divergence_terms,
                               _log2_probs)

# Per row (distillkit/core/backends/_rows.py): max t, log-sum at T (teacher); max s, log-sum at T (student); c; max s,
# log-sum at T = 1 (CE, whole vocabulary); the one-pass KLs' ref (other side's logit at the argmax; 0 otherwise).
NUM_STATS = tl.constexpr(8)


@triton.jit
def _row_offset(row, n_inner, stride_outer, stride_inner):
    # Leading dims collapsed to (outer, inner): any row stride without a copy.
    return (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


@triton.jit
def _vector_width(student_ptr, teacher_ptr, READS_TEACHER: tl.constexpr):
    """Elements in one thread's 16-byte load of the widest streamed dtype: a lane's contiguous ids."""
    S_BITS: tl.constexpr = student_ptr.dtype.element_ty.primitive_bitwidth
    T_BITS: tl.constexpr = teacher_ptr.dtype.element_ty.primitive_bitwidth if READS_TEACHER else 8
    return tl.constexpr(128 // S_BITS if S_BITS >= T_BITS else 128 // T_BITS)


@triton.jit
def _lane_tile(BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """Offsets of a block as a [BLOCK_V // VEC, VEC] tile: each row (a lane) is VEC consecutive ids that one
    thread loads at once, so reductions along axis 1 stay in the thread (no shuffles, no barriers)."""
    return tl.arange(0, BLOCK_V // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _lane_lse_step(m, z, x, scale):
    """Merge tile x [lanes, VEC] into each lane's raw max m and sum z of 2^((x - m) scale), scale = log2(e)/T."""
    m_new = tl.maximum(m, tl.max(x, 1))
    z = z * tl.exp2((m - m_new) * scale) + tl.sum(tl.exp2((x - m_new[:, None]) * scale), 1)
    return m_new, z


@triton.jit
def _merge_lse_lanes(m, z, scale):
    """The row's (raw max, sum) from the lanes' running (m, z)."""
    row_max = tl.max(m, 0)
    z = tl.sum(z * tl.exp2((m - row_max) * scale), 0)
    return tl.where(z == 0, float("-inf"), row_max), z


@triton.jit
def _max_and_partner(x1, y1, x2, y2):  # tl.reduce combine: the larger x with the y beside it
    return tl.maximum(x1, x2), tl.where(x2 > x1, y2, y1)


@triton.jit
def _shift_kl(m, z, w, ref, m_new, ref_new, scale):
    """(m, z, w, ref) moved to the new raw max m_new and reference ref_new: the old terms shift by
    (m - m_new) + (ref_new - ref) and rescale. w = +inf stays +inf (not inf * 0); z = 0 adds nothing."""
    rescale = tl.exp2((m - m_new) * scale)
    shifted = tl.where(z > 0, w + z * ((m - m_new) + (ref_new - ref)), w)
    return z * rescale, tl.where(shifted == float("inf"), shifted, shifted * rescale)


@triton.jit
def _lane_kl_step(m, z, w, ref, x, y, scale):
    """One-pass KL(softmax(x/T) || softmax(y/T)) per lane: merge tile x, y [lanes, VEC] into each lane's raw max
    m of x, z = sum e^((x - m)/T) and w = sum e^((x - m)/T) ((x - m) - (y - ref)), ref = y at x's argmax.
    Terms are kept relative to x's mode on both sides, so the dominant term is exactly 0 and nothing of
    the size of the logits cancels later (at +-1e4, terms y - x rounded to 1e-3 did). A masked y (-inf) at
    the mode keeps the old (finite) ref; its +inf term makes w, and so D, +inf. e = 0 adds 0, not 0 * inf."""
    block_max, block_ref = tl.reduce((x, y), 1, _max_and_partner)
    moved = (block_max > m) & (block_ref > float("-inf"))
    m_new = tl.maximum(m, block_max)
    ref_new = tl.where(moved, block_ref, ref)
    z, w = _shift_kl(m, z, w, ref, m_new, ref_new, scale)
    rel = x - m_new[:, None]
    e = tl.exp2(rel * scale)
    # e * (0 where e = 0): the product feeds the sum directly (one FFMA)
    terms = e * tl.where(e > 0, rel - (y - ref_new[:, None]), 0.0)
    return m_new, z + tl.sum(e, 1), w + tl.sum(terms, 1), ref_new


@triton.jit
def _merge_kl_lanes(m, z, w, ref, scale):
    """The row's (m, z, w, ref) from the lanes': the same shift to the row's max and the ref of its lane."""
    row_max = tl.max(m, 0)
    row_ref = tl.max(tl.where(m == row_max, ref, float("-inf")), 0)
    z, w = _shift_kl(m, z, w, ref, row_max, row_ref, scale)
    z = tl.sum(z, 0)
    return tl.where(z == 0, float("-inf"), row_max), z, tl.sum(w, 0), row_ref


@triton.jit
def _is_finite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _terms_sums(s_row, t_row, div_vocab_size, m_t, ls_a, m_b, ls_b, param_a, param_b, inv_temperature,
                DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """(sum_j d_j, sum_j h_j) over a row's first div_vocab_size ids from the given raw maxima and log-sums: the
    second pass of the two-pass divergences (own normalizers in the core forward, global in the shard pass)."""
    tile = _lane_tile(BLOCK_V, VEC)
    scale = inv_temperature * LOG2E
    d_sum = tl.zeros([BLOCK_V // VEC], tl.float32)
    h_sum = d_sum
    for start in range(0, div_vocab_size, BLOCK_V):
        offs = start + tile
        in_row = offs < div_vocab_size
        # a masked id loads -inf on both sides: p = q = 0, so its terms are 0 (no select needed)
        t = tl.load(t_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        s = tl.load(s_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        lg_p, p = _log2_probs(t, m_t, ls_a, scale)
        lg_q, q = _log2_probs(s, m_b, ls_b, scale)
        d, h = _divergence_terms(lg_p, lg_q, p, q, param_a, param_b, DIVERGENCE)
        d_sum += tl.sum(d, 1)
        h_sum += tl.sum(h, 1)
    return tl.sum(d_sum, 0), tl.sum(h_sum, 0)


@triton.jit
def _store_ce(row, s_row, labels_ptr, ce_ptr, m_s, z_s, ignore_index, vocab_size, WITH_CE: tl.constexpr):
    """Store a row's ce = lse(s) - s[y] = (m - s[y]) + log z from the raw (m_s, z_s): 0 for an ignored or out-of-range
    label, NaN where s defines no distribution. Returns (m_s, log z_s), or (0, 0) without CE (dense and top-k)."""
    ce = m_s * 0.0
    ls_s = ce
    m_out = ce
    if WITH_CE:
        ls_s = tl.log(z_s)
        m_out = m_s
        label = tl.load(labels_ptr + row)
        valid = (label != ignore_index) & (label >= 0) & (label < vocab_size)
        target = tl.load(s_row + tl.where(valid, label, 0), mask=valid, other=0.0).to(tl.float32)
        ce_row = tl.where(_is_finite(m_s) & _is_finite(ls_s), (m_s - target) + ls_s, float("nan"))
        ce = tl.where(valid, ce_row, 0.0)
    tl.store(ce_ptr + row, ce)
    return m_out, ls_s


@triton.jit
def distill_forward_kernel(
    student_ptr, teacher_ptr, labels_ptr,
    div_ptr, ce_ptr, stats_ptr,
    s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
    vocab_size, div_vocab_size, param_a, param_b, inv_temperature, ignore_index,
    DIVERGENCE: tl.constexpr, WITH_CE: tl.constexpr, BLOCK_V: tl.constexpr, SHARED_STUDENT: tl.constexpr = False,
):
    """One program per row: per-row D, ce and the statistics the backward needs. SHARED_STUDENT (T == 1 and
    div_vocab_size == vocab_size, with CE): the student at T and at 1 are one stream, computed once."""
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + _row_offset(row, s_n_inner, s_stride_outer, s_stride_inner)
    t_row = teacher_ptr + _row_offset(row, t_n_inner, t_stride_outer, t_stride_inner)
    VEC: tl.constexpr = _vector_width(student_ptr, teacher_ptr, DIVERGENCE != NONE)
    tile = _lane_tile(BLOCK_V, VEC)
    NEG_INF: tl.constexpr = float("-inf")
    # exponentials as exp2((x - m) * scale), the max subtracted first
    scale = LOG2E if SHARED_STUDENT else inv_temperature * LOG2E
    lanes = tl.zeros([BLOCK_V // VEC], tl.float32)  # running state per lane, merged once per row
    m_t, z_a = lanes + LOWEST, lanes  # teacher: raw max, sum of e^((t - m_t)/T)
    m_b, z_b = lanes + LOWEST, lanes  # student at T over the divergence ids
    m_s, z_s = lanes + LOWEST, lanes  # student at 1 (CE)
    # forward_kl: w = sum e^((t-m_t)/T)((t-m_t) - (s-ref)), ref = s at t's argmax; reverse_kl: s and t swapped
    w, ref = lanes, lanes

    # Pass 1: online normalizers (and, for the KLs, D itself).
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + tile
        in_row = offs < vocab_size
        s = tl.load(s_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
        if WITH_CE and not SHARED_STUDENT:
            m_s, z_s = _lane_lse_step(m_s, z_s, s, LOG2E)
        if DIVERGENCE != NONE:
            in_div = in_row if SHARED_STUDENT else offs < div_vocab_size
            sd = s if SHARED_STUDENT else tl.where(in_div, s, NEG_INF)
            t = tl.load(t_row + offs, mask=in_div, other=NEG_INF).to(tl.float32)
            if DIVERGENCE == FORWARD_KL:
                m_t, z_a, w, ref = _lane_kl_step(m_t, z_a, w, ref, t, sd, scale)
                m_b, z_b = _lane_lse_step(m_b, z_b, sd, scale)
            elif DIVERGENCE == REVERSE_KL:
                m_b, z_b, w, ref = _lane_kl_step(m_b, z_b, w, ref, sd, t, scale)
                m_t, z_a = _lane_lse_step(m_t, z_a, t, scale)
            else:
                m_t, z_a = _lane_lse_step(m_t, z_a, t, scale)
                m_b, z_b = _lane_lse_step(m_b, z_b, sd, scale)

    if DIVERGENCE == FORWARD_KL:
        m_t, z_a, w, ref = _merge_kl_lanes(m_t, z_a, w, ref, scale)
    else:
        m_t, z_a = _merge_lse_lanes(m_t, z_a, scale)
    if DIVERGENCE == REVERSE_KL:
        m_b, z_b, w, ref = _merge_kl_lanes(m_b, z_b, w, ref, scale)
    else:
        m_b, z_b = _merge_lse_lanes(m_b, z_b, scale)
    m_s, z_s = (m_b, z_b) if SHARED_STUDENT else _merge_lse_lanes(m_s, z_s, LOG2E)
    zero = tl.sum(lanes, 0)  # fp32 scalar 0
    if DIVERGENCE != FORWARD_KL and DIVERGENCE != REVERSE_KL:
        ref = zero
    ls_a = tl.log(z_a)
    ls_b = tl.log(z_b)
    div = zero
    c = zero
    if DIVERGENCE == FORWARD_KL:
        # D = E_p[x_a - x_b] - ls_a + ls_b, with x_a - x_b = ((t - m_t) - (s - ref) + (m_b - ref)) / T
        div = (w / z_a + (m_b - ref)) * inv_temperature + (ls_b - ls_a)
        c = zero - 1.0
    elif DIVERGENCE == REVERSE_KL:
        # c = E_q[(s - m_b) - (t - ref)] / T, small near the mode; the backward uses q (that term / T - c)
        c = w / z_b * inv_temperature
        div = c + (m_t - ref) * inv_temperature - (ls_b - ls_a)
    elif DIVERGENCE != NONE:
        # Pass 2: the two-pass divergences need both normalized distributions.
        div, c = _terms_sums(s_row, t_row, div_vocab_size, m_t, ls_a, m_b, ls_b, param_a, param_b, inv_temperature,
                             DIVERGENCE, BLOCK_V, VEC)
    if DIVERGENCE != NONE:
        # A row with a NaN or +inf, or nothing finite, defines no distribution (docs/DESIGN.md).
        defined = _is_finite(m_t) & _is_finite(ls_a) & _is_finite(m_b) & _is_finite(ls_b)
        div = tl.where(defined, div, float("nan"))
        c = tl.where(defined, c, float("nan"))
    else:
        m_t, ls_a, m_b, ls_b = zero, zero, zero, zero

    m_s, ls_s = _store_ce(row, s_row, labels_ptr, ce_ptr, m_s, z_s, ignore_index, vocab_size, WITH_CE)
    tl.store(div_ptr + row, div)
    stats_row = stats_ptr + row * NUM_STATS
    tl.store(stats_row + 0, m_t)
    tl.store(stats_row + 1, ls_a)
    tl.store(stats_row + 2, m_b)
    tl.store(stats_row + 3, ls_b)
    tl.store(stats_row + 4, c)
    tl.store(stats_row + 5, m_s)
    tl.store(stats_row + 6, ls_s)
    tl.store(stats_row + 7, ref)


@triton.jit
def _row_coefficients(row, grad_div_ptr, grad_ce_ptr, labels_ptr, ignore_index, vocab_size,
                      WITH_CE: tl.constexpr, LABEL_DECIDES_CE: tl.constexpr):
    """(g_div, g_ce, label) of one row for the backward kernels. With LABEL_DECIDES_CE an ignored or
    out-of-range label carries no CE gradient (ce is the constant 0 there, whatever grad_ce says);
    without it the caller has zeroed grad_ce where needed and an out-of-range label only has no
    one-hot (a vocabulary shard whose row's label lies in another shard)."""
    g_div = tl.load(grad_div_ptr + row)
    g_ce = g_div * 0.0
    label = row * 0 - 1
    if WITH_CE:
        label = tl.load(labels_ptr + row)
        g_ce = tl.load(grad_ce_ptr + row)
        if LABEL_DECIDES_CE:
            valid = (label != ignore_index) & (label >= 0) & (label < vocab_size)
            g_ce = tl.where(valid, g_ce, 0.0)
    return g_div, g_ce, label


@triton.jit
def _store_grad_block(
    row, offs, in_row, g_div, g_ce, label, student_ptr, teacher_ptr, stats_ptr, grad_ptr,
    s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
    vocab_size, div_vocab_size, param_a, param_b, inv_temperature,
    DIVERGENCE: tl.constexpr, WITH_CE: tl.constexpr, BLOCK_V: tl.constexpr, SHARED_STUDENT: tl.constexpr,
):
    """One block of grad_s = g_div / T * (h - q c) + g_ce * (softmax(s) - onehot(label)) from the row's stats,
    stored in the student dtype; shared by the core and the vocabulary-parallel backward kernels, which differ
    only in how they decide g_ce and the label."""
    grad_row = grad_ptr + row * vocab_size
    out_dtype = grad_ptr.dtype.element_ty

    if (g_div == 0) & (g_ce == 0):
        # Masked rows (observations, padding, ignored labels): write zeros, read nothing.
        tl.store(grad_row + offs, tl.zeros([BLOCK_V], tl.float32).to(out_dtype), mask=in_row)
    else:
        NEG_INF: tl.constexpr = float("-inf")
        s_row = student_ptr + _row_offset(row, s_n_inner, s_stride_outer, s_stride_inner)
        stats_row = stats_ptr + row * NUM_STATS
        s = tl.load(s_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
        scale = inv_temperature * LOG2E
        grad = tl.zeros([BLOCK_V], tl.float32)
        lg_s, softmax_s = grad, grad
        if SHARED_STUDENT:  # T = 1 and the same ids: q is softmax(s), one exponential for both
            lg_s, softmax_s = _log2_probs(s, tl.load(stats_row + 5), tl.load(stats_row + 6), LOG2E)
        # Skip, not multiply by 0: a row weighted out of the divergence may have a NaN or infinite one.
        if DIVERGENCE != NONE:
            if g_div != 0:
                t_row = teacher_ptr + _row_offset(row, t_n_inner, t_stride_outer, t_stride_inner)
                in_div = in_row if SHARED_STUDENT else offs < div_vocab_size
                sd = s if SHARED_STUDENT else tl.where(in_div, s, NEG_INF)
                if SHARED_STUDENT:
                    lg_q, q = lg_s, softmax_s
                else:
                    lg_q, q = _log2_probs(sd, tl.load(stats_row + 2), tl.load(stats_row + 3), scale)
                t = tl.load(t_row + offs, mask=in_div, other=NEG_INF).to(tl.float32)
                lg_p, p = _log2_probs(t, tl.load(stats_row + 0), tl.load(stats_row + 1), scale)
                c = tl.load(stats_row + 4)
                if DIVERGENCE == FORWARD_KL:
                    d_db = q - p  # h - q c with h = -p, c = -1, without the cancellation
                elif DIVERGENCE == REVERSE_KL:
                    # (s - m_b) - (t - ref): exactly the forward's term, 0 at the mode
                    rel = (sd - tl.load(stats_row + 2)) - (t - tl.load(stats_row + 7))
                    d_db = tl.where(q > 0, q * (rel * inv_temperature - c), 0.0)
                else:
                    _, h = _divergence_terms(lg_p, lg_q, p, q, param_a, param_b, DIVERGENCE)
                    d_db = h - q * c
                # a row with no distribution (c = NaN) is NaN: the row's coefficient, not a select per element
                grad += tl.where(c == c, g_div * inv_temperature, float("nan")) * d_db
        if WITH_CE:
            if g_ce != 0:
                if not SHARED_STUDENT:
                    _, softmax_s = _log2_probs(s, tl.load(stats_row + 5), tl.load(stats_row + 6), LOG2E)
                # the label as an i32 id (-1 if outside the row): a 32-bit compare per element, not a 64-bit one
                label_id = tl.where((label >= 0) & (label < vocab_size), label, -1).to(tl.int32)
                grad += g_ce * (softmax_s - tl.where(offs == label_id, 1.0, 0.0))
        # No fp32/bf16 subnormal is stored (backends/_rows.py FLUSH_BELOW says why, and why fp16 keeps its own).
        # The store is masked: ids past the row are not written.
        grad = tl.where(tl.abs(grad) < SMALLEST_NORMAL, 0.0, grad)
        tl.store(grad_row + offs, grad.to(out_dtype), mask=in_row)


@triton.jit
def distill_backward_kernel(
    grad_div_ptr, grad_ce_ptr, student_ptr, teacher_ptr, labels_ptr, stats_ptr, grad_ptr,
    s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
    vocab_size, div_vocab_size, param_a, param_b, inv_temperature, ignore_index,
    DIVERGENCE: tl.constexpr, WITH_CE: tl.constexpr, BLOCK_V: tl.constexpr, SHARED_STUDENT: tl.constexpr = False,
):
    """Grid (rows, vocabulary blocks): grad_s = grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = offs < vocab_size
    g_div, g_ce, label = _row_coefficients(row, grad_div_ptr, grad_ce_ptr, labels_ptr, ignore_index, vocab_size,
                                           WITH_CE, True)
    _store_grad_block(row, offs, in_row, g_div, g_ce, label, student_ptr, teacher_ptr, stats_ptr, grad_ptr,
                      s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
                      vocab_size, div_vocab_size, param_a, param_b, inv_temperature, DIVERGENCE, WITH_CE, BLOCK_V,
                      SHARED_STUDENT)
