"""Triton kernels of the fused distillation loss (pure Triton: no allocation, no autograd).

Row math (docs/DESIGN.md has the full table). For one token row with student
logits s, teacher logits t and temperature T: a = t/T, b = s/T, p = softmax(a),
q = softmax(b). Every divergence D(p, q) has the student gradient

    dD/db_k = h_k - q_k * c,      h_j = q_j * dD/dq_j,   c = sum_j h_j,

so the forward saves per-row statistics only (log-normalizers and c) and the
backward recomputes h element by element. Cross-entropy uses the raw student
logits (temperature 1): ce = lse(s) - s[y], gradient softmax(s) - onehot(y).

Memory traffic (one unit = one read of one [N, V] logits tensor):
- forward_kl / reverse_kl: one online pass over s and t (2 units); D comes
  from running sums rescaled like the online-softmax normalizer.
- jsd / skew / tvd: log(m) needs both normalizers first, so two passes (4).
- backward: one read of s and t and one write of the gradient (3).
- CE only (DIVERGENCE == 0): the teacher is never read (1 + 2 units).

The divergence covers the first div_vocab_size ids (== vocab_size unless teacher
and student vocabularies differ and are truncated to the shared ids); the
student's ids beyond it take part in the CE term only.
"""

import triton
import triton.language as tl

# Divergence ids (constexpr switch); names in distillkit._checks.DIVERGENCE_IDS.
NONE = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
REVERSE_KL = tl.constexpr(2)
JSD = tl.constexpr(3)
SKEW_FORWARD_KL = tl.constexpr(4)
SKEW_REVERSE_KL = tl.constexpr(5)
TVD = tl.constexpr(6)

NUM_STATS = tl.constexpr(4)  # per row: lse(t/T), lse(s/T), c, lse(s)


@triton.jit
def _row_offset(row, n_inner, stride_outer, stride_inner):
    # Leading dims collapsed to (outer, inner): any row stride without a copy.
    return (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


@triton.jit
def _safe_max(m):
    # exp(x - m) with m = -inf (a fully masked block so far) must give 0, not NaN.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_lse_step(m, z, x):
    """Merge block x into the running (max m, sum z of exp(x - m))."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_ref = _safe_max(m_new)
    z = z * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
    return m_new, z


@triton.jit
def _online_kl_step(m, z, w, x, y):
    """Merge block x into (m, z) as above and into w = sum e^(x - m) (x - y), rescaled alike.

    At the end KL(softmax x || softmax y) = w / z - lse(x) + lse(y): one pass over both rows.
    Entries with e^(x - m) = 0 (x = -inf, a masked teacher entry) contribute 0, not 0 * inf."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_ref = _safe_max(m_new)
    e = tl.exp(x - m_ref)
    rescale = tl.exp(m - m_ref)
    w = w * rescale + tl.sum(tl.where(e > 0, e * (x - y), 0.0), 0)
    z = z * rescale + tl.sum(e, 0)
    return m_new, z, w


@triton.jit
def _divergence_terms(log_p, log_q, p, q, mix, DIVERGENCE: tl.constexpr):
    """Per-element (d_j, h_j): sum_j d_j = D and h_j = q_j * dD/dq_j. 0 where the weighting probability is 0."""
    if DIVERGENCE == FORWARD_KL:
        d = tl.where(p > 0, p * (log_p - log_q), 0.0)
        h = -p
    elif DIVERGENCE == REVERSE_KL:
        d = tl.where(q > 0, q * (log_q - log_p), 0.0)
        h = d
    elif DIVERGENCE == JSD:
        # mix = beta, m = beta p + (1 - beta) q
        m = mix * p + (1.0 - mix) * q
        log_m = tl.log(tl.where(m > 0, m, 1.0))
        kl_q = tl.where(q > 0, q * (log_q - log_m), 0.0)
        d = mix * tl.where(p > 0, p * (log_p - log_m), 0.0) + (1.0 - mix) * kl_q
        h = (1.0 - mix) * kl_q
    elif DIVERGENCE == SKEW_FORWARD_KL:
        # mix = skew, m = skew p + (1 - skew) q
        m = mix * p + (1.0 - mix) * q
        m_pos = m > 0
        d = tl.where(p > 0, p * (log_p - tl.log(tl.where(m_pos, m, 1.0))), 0.0)
        h = tl.where(m_pos, -(1.0 - mix) * p * q / tl.where(m_pos, m, 1.0), 0.0)
    elif DIVERGENCE == SKEW_REVERSE_KL:
        # mix = skew, m = (1 - skew) p + skew q
        m = (1.0 - mix) * p + mix * q
        m_pos = m > 0
        m_safe = tl.where(m_pos, m, 1.0)
        d = tl.where(q > 0, q * (log_q - tl.log(m_safe)), 0.0)
        h = d - tl.where(m_pos, mix * q * q / m_safe, 0.0)
    elif DIVERGENCE == TVD:
        diff = q - p
        d = 0.5 * tl.abs(diff)
        h = 0.5 * q * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    else:
        d = tl.zeros_like(q)
        h = tl.zeros_like(q)
    return d, h


@triton.jit
def _store_row_outputs(row, s_row, labels_ptr, div_ptr, ce_ptr, stats_ptr, div, stat0, stat1, stat2, m_s, z_s,
                       ignore_index, vocab_size, WITH_CE: tl.constexpr):
    """Store a row's D and ce = lse(s) - s[y] (0 for an ignored or out-of-range label; lse(s) from the
    running (m_s, z_s)) and its stats (stat0, stat1, stat2, lse(s)); shared by the dense and top-k forwards."""
    ce = div * 0.0
    lse_s = div * 0.0
    if WITH_CE:
        lse_s = m_s + tl.log(z_s)
        label = tl.load(labels_ptr + row)
        valid = (label != ignore_index) & (label >= 0) & (label < vocab_size)
        target = tl.load(s_row + tl.where(valid, label, 0), mask=valid, other=0.0).to(tl.float32)
        ce = tl.where(valid, lse_s - target, 0.0)
    tl.store(div_ptr + row, div)
    tl.store(ce_ptr + row, ce)
    stats_row = stats_ptr + row * NUM_STATS
    tl.store(stats_row + 0, stat0)
    tl.store(stats_row + 1, stat1)
    tl.store(stats_row + 2, stat2)
    tl.store(stats_row + 3, lse_s)


@triton.jit
def distill_forward_kernel(
    student_ptr, teacher_ptr, labels_ptr,
    div_ptr, ce_ptr, stats_ptr,
    s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
    vocab_size, div_vocab_size, mix, inv_temperature, ignore_index,
    DIVERGENCE: tl.constexpr, WITH_CE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: per-row D, ce and the statistics the backward needs."""
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + _row_offset(row, s_n_inner, s_stride_outer, s_stride_inner)
    t_row = teacher_ptr + _row_offset(row, t_n_inner, t_stride_outer, t_stride_inner)
    cols = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    zero = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)  # fp32 scalar for loop-carried state

    m_a, z_a = zero + NEG_INF, zero  # teacher at T
    m_b, z_b = zero + NEG_INF, zero  # student at T
    m_s, z_s = zero + NEG_INF, zero  # student at 1 (CE)
    w = zero  # forward_kl: sum e^(a-m_a)(a-b); reverse_kl: sum e^(b-m_b)(b-a)

    # Pass 1: online normalizers (and, for the KLs, D itself).
    for start in range(0, vocab_size, BLOCK_V):
        offs = start + cols
        in_row = offs < vocab_size
        s = tl.load(s_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
        if WITH_CE:
            m_s, z_s = _online_lse_step(m_s, z_s, s)
        if DIVERGENCE != NONE:
            in_div = offs < div_vocab_size
            a = tl.load(t_row + offs, mask=in_div, other=NEG_INF).to(tl.float32) * inv_temperature
            b = tl.where(in_div, s, NEG_INF) * inv_temperature
            if DIVERGENCE == FORWARD_KL:
                m_a, z_a, w = _online_kl_step(m_a, z_a, w, a, b)
                m_b, z_b = _online_lse_step(m_b, z_b, b)
            elif DIVERGENCE == REVERSE_KL:
                m_b, z_b, w = _online_kl_step(m_b, z_b, w, b, a)
                m_a, z_a = _online_lse_step(m_a, z_a, a)
            else:
                m_a, z_a = _online_lse_step(m_a, z_a, a)
                m_b, z_b = _online_lse_step(m_b, z_b, b)

    lse_a = m_a + tl.log(z_a)
    lse_b = m_b + tl.log(z_b)
    div = zero
    c = zero
    if DIVERGENCE == FORWARD_KL:
        div = w / z_a - lse_a + lse_b
        c = zero - 1.0
    elif DIVERGENCE == REVERSE_KL:
        div = w / z_b - lse_b + lse_a
        c = div
    elif DIVERGENCE != NONE:
        # Pass 2: the mixture divergences need both normalized distributions.
        for start in range(0, div_vocab_size, BLOCK_V):
            offs = start + cols
            in_row = offs < div_vocab_size
            a = tl.load(t_row + offs, mask=in_row, other=NEG_INF).to(tl.float32) * inv_temperature
            b = tl.load(s_row + offs, mask=in_row, other=NEG_INF).to(tl.float32) * inv_temperature
            log_p = a - lse_a
            log_q = b - lse_b
            d, h = _divergence_terms(log_p, log_q, tl.exp(log_p), tl.exp(log_q), mix, DIVERGENCE)
            div += tl.sum(tl.where(in_row, d, 0.0), 0)
            c += tl.sum(tl.where(in_row, h, 0.0), 0)

    _store_row_outputs(row, s_row, labels_ptr, div_ptr, ce_ptr, stats_ptr, div, lse_a, lse_b, c, m_s, z_s,
                       ignore_index, vocab_size, WITH_CE)


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
    vocab_size, div_vocab_size, mix, inv_temperature,
    DIVERGENCE: tl.constexpr, WITH_CE: tl.constexpr, BLOCK_V: tl.constexpr,
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
        grad = tl.zeros([BLOCK_V], tl.float32)
        # Skip, not multiply by 0: a row weighted out of the divergence may have an infinite one.
        if DIVERGENCE != NONE:
            if g_div != 0:
                t_row = teacher_ptr + _row_offset(row, t_n_inner, t_stride_outer, t_stride_inner)
                in_div = offs < div_vocab_size
                a = tl.load(t_row + offs, mask=in_div, other=NEG_INF).to(tl.float32) * inv_temperature
                log_p = a - tl.load(stats_row + 0)
                log_q = tl.where(in_div, s, NEG_INF) * inv_temperature - tl.load(stats_row + 1)
                p = tl.exp(log_p)
                q = tl.exp(log_q)
                if DIVERGENCE == FORWARD_KL:
                    d_db = q - p  # h - q c with h = -p, c = -1, without the cancellation
                else:
                    _, h = _divergence_terms(log_p, log_q, p, q, mix, DIVERGENCE)
                    d_db = h - q * tl.load(stats_row + 2)
                grad += (g_div * inv_temperature) * d_db
        if WITH_CE:
            if g_ce != 0:
                softmax_s = tl.exp(s - tl.load(stats_row + 3))
                onehot = tl.where(offs == label, 1.0, 0.0)
                grad += g_ce * (softmax_s - onehot)
        tl.store(grad_row + offs, tl.where(in_row, grad, 0.0).to(out_dtype), mask=in_row)


@triton.jit
def distill_backward_kernel(
    grad_div_ptr, grad_ce_ptr, student_ptr, teacher_ptr, labels_ptr, stats_ptr, grad_ptr,
    s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
    vocab_size, div_vocab_size, mix, inv_temperature, ignore_index,
    DIVERGENCE: tl.constexpr, WITH_CE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid (rows, vocabulary blocks):
    grad_s = grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y)), in the student dtype."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = offs < vocab_size
    g_div, g_ce, label = _row_coefficients(row, grad_div_ptr, grad_ce_ptr, labels_ptr, ignore_index, vocab_size,
                                           WITH_CE, True)
    _store_grad_block(row, offs, in_row, g_div, g_ce, label, student_ptr, teacher_ptr, stats_ptr, grad_ptr,
                      s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
                      vocab_size, div_vocab_size, mix, inv_temperature, DIVERGENCE, WITH_CE, BLOCK_V)
