"""Triton kernels of the vocabulary-parallel loss (pure Triton: no allocation, no autograd, no collectives).

Each rank holds the logits of a slice of the vocabulary. The per-row statistics of one
shard (max, sum of exponentials, the KL accumulators) come from the core forward kernel
(kernels/distill.py); the two kernels here are the parts that need the GLOBAL
per-row log-normalizers, which the caller all-reduces first (docs/DISTRIBUTED.md):

- ``shard_terms_kernel``: for the two-pass divergences (jsd, skew, tvd, alpha_beta), the sums over the
  shard of d_j and h_j with p and q normalized globally:
  D = sum over ranks of sum d, c = sum over ranks of sum h. One pass over s and t (2 units).
- ``shard_backward_kernel``: the student gradient of the shard,
  grad_s = grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y)), with the global
  stats. It is the core backward kernel with one difference: whether a row carries a CE
  gradient is decided by the caller (grad_ce is already 0 where the label is ignored or
  lies outside the global vocabulary), and the label is a shard-local id that is simply out
  of [0, vocab_size) when the target lies in another rank's shard. The core kernel treats an
  out-of-range label as ignored (no CE gradient at all), which would drop the softmax(s)
  term on every rank but the label's owner.

Stats rows follow the core layout (kernels/distill.py), here global values: every maximum is 0 and
every log-sum the global log-normalizer.
"""

import triton
import triton.language as tl

from .distill import NUM_STATS, _row_coefficients, _row_offset, _store_grad_block, _terms_sums, _vector_width


@triton.jit
def shard_terms_kernel(
    student_ptr, teacher_ptr, stats_ptr, d_ptr, h_ptr,
    s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
    div_vocab_size, param_a, param_b, inv_temperature,
    DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: sum_j d_j and sum_j h_j over the shard's first div_vocab_size ids,
    with log p and log q normalized by the global stats."""
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + _row_offset(row, s_n_inner, s_stride_outer, s_stride_inner)
    t_row = teacher_ptr + _row_offset(row, t_n_inner, t_stride_outer, t_stride_inner)
    stats_row = stats_ptr + row * NUM_STATS
    d_sum, h_sum = _terms_sums(s_row, t_row, div_vocab_size, tl.load(stats_row + 0), tl.load(stats_row + 1),
                               tl.load(stats_row + 2), tl.load(stats_row + 3), param_a, param_b, inv_temperature,
                               DIVERGENCE, BLOCK_V, _vector_width(student_ptr, teacher_ptr, True))
    tl.store(d_ptr + row, d_sum)
    tl.store(h_ptr + row, h_sum)


@triton.jit
def shard_backward_kernel(
    grad_div_ptr, grad_ce_ptr, student_ptr, teacher_ptr, labels_ptr, stats_ptr, grad_ptr,
    s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
    vocab_size, div_vocab_size, param_a, param_b, inv_temperature,
    DIVERGENCE: tl.constexpr, WITH_CE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Grid (rows, vocabulary blocks): the shard's slice of
    grad_div / T * (h - q c) + grad_ce * (softmax(s) - onehot(y)), in the student dtype.
    grad_ce is 0 on rows without a valid label; labels holds shard-local ids (any value outside
    [0, vocab_size) when the label is in another shard: the one-hot is then empty)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_row = offs < vocab_size
    # ignore_index is not used: grad_ce already carries the global label's validity.
    g_div, g_ce, label = _row_coefficients(row, grad_div_ptr, grad_ce_ptr, labels_ptr, -1, vocab_size, WITH_CE, False)
    _store_grad_block(row, offs, in_row, g_div, g_ce, label, student_ptr, teacher_ptr, stats_ptr, grad_ptr,
                      s_n_inner, s_stride_outer, s_stride_inner, t_n_inner, t_stride_outer, t_stride_inner,
                      vocab_size, div_vocab_size, param_a, param_b, inv_temperature, DIVERGENCE, WITH_CE, BLOCK_V,
                      False)
