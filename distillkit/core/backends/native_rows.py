"""The compiled C++/CUDA kernels (csrc/) behind the backend contract."""

from __future__ import annotations

from typing import Optional

import torch

from ._rows import NUM_STATS, flat_labels


def _rows2d(x: Optional[torch.Tensor], columns: Optional[int] = None) -> Optional[torch.Tensor]:
    """[N, columns] rows of x: a view for row-strided inputs; copies only what cannot be one."""
    if x is None:
        return None
    if columns is not None:
        x = x[..., :columns]
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def forward(student, teacher, labels, divergence, mix, temperature, ignore_index, with_ce, div_vocab):
    vocab, lead = student.shape[-1], student.shape[:-1]
    labels = flat_labels(labels, student) if with_ce else None
    if div_vocab == vocab or divergence == 0:
        div, ce, stats = torch.ops.distillkit_ext.rows_forward(
            _rows2d(student), _rows2d(teacher, div_vocab) if divergence != 0 else None, labels,
            divergence, mix, temperature, ignore_index, with_ce)
    else:
        # Truncated vocabularies: the native kernels take one vocabulary size, so the divergence (over
        # the shared ids) and CE (over the student's whole vocabulary) are two passes here.
        div, _, stats = torch.ops.distillkit_ext.rows_forward(
            _rows2d(student, div_vocab), _rows2d(teacher, div_vocab), None, divergence, mix, temperature,
            ignore_index, False)
        _, ce, ce_stats = torch.ops.distillkit_ext.rows_forward(
            _rows2d(student), None, labels, 0, mix, temperature, ignore_index, with_ce)
        # stats slots 5-6 (m_1, ls_1) are the CE's, the others (m_t, ls_a, m_s, ls_b, c; ref) the divergence's
        stats = torch.cat([stats[:, :5], ce_stats[:, 5:7], stats[:, 7:]], dim=1)
    return div.view(lead), ce.view(lead), stats.view(*lead, NUM_STATS)


def backward(grad_div, grad_ce, student, teacher, labels, stats, divergence, mix, temperature,
             ignore_index, with_ce, div_vocab):
    vocab = student.shape[-1]
    grad_div = grad_div.reshape(-1).float().contiguous()
    grad_ce = grad_ce.reshape(-1).float().contiguous()
    labels = flat_labels(labels, student) if with_ce else None
    stats = stats.reshape(-1, NUM_STATS).contiguous()
    if div_vocab == vocab or divergence == 0:
        grad = torch.ops.distillkit_ext.rows_backward(
            grad_div, grad_ce, _rows2d(student), _rows2d(teacher, div_vocab) if divergence != 0 else None,
            labels, stats, divergence, mix, temperature, ignore_index, with_ce)
        return grad.view(student.shape)
    grad = torch.ops.distillkit_ext.rows_backward(
        torch.zeros_like(grad_div), grad_ce, _rows2d(student), None, labels, stats, 0, mix, temperature,
        ignore_index, with_ce)
    grad_div_part = torch.ops.distillkit_ext.rows_backward(
        grad_div, torch.zeros_like(grad_ce), _rows2d(student, div_vocab), _rows2d(teacher, div_vocab), None,
        stats, divergence, mix, temperature, ignore_index, False)
    grad[:, :div_vocab] += grad_div_part
    return grad.view(student.shape)
