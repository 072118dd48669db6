"""The compiled C++/CUDA kernels (csrc/) behind the backend contract."""

from __future__ import annotations

from typing import Optional

import torch

from ._rows import flat_labels


def _rows2d(x: Optional[torch.Tensor], vocab: int) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, vocab)  # a view for row-strided inputs; copies only what cannot be one


def forward(student, teacher, labels, divergence, mix, temperature, ignore_index, with_ce):
    vocab, lead = student.shape[-1], student.shape[:-1]
    div, ce, stats = torch.ops.distillkit_ext.rows_forward(
        _rows2d(student, vocab), _rows2d(teacher, vocab) if divergence != 0 else None,
        flat_labels(labels, student) if with_ce else None,
        divergence, mix, temperature, ignore_index, with_ce)
    return div.view(lead), ce.view(lead), stats.view(*lead, 4)


def backward(grad_div, grad_ce, student, teacher, labels, stats, divergence, mix, temperature,
             ignore_index, with_ce):
    vocab = student.shape[-1]
    grad = torch.ops.distillkit_ext.rows_backward(
        grad_div.reshape(-1).float().contiguous(), grad_ce.reshape(-1).float().contiguous(),
        _rows2d(student, vocab), _rows2d(teacher, vocab) if divergence != 0 else None,
        flat_labels(labels, student) if with_ce else None, stats.reshape(-1, 4).contiguous(),
        divergence, mix, temperature, ignore_index, with_ce)
    return grad.view(student.shape)
