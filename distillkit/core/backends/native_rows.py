"""The compiled C++/CUDA kernels (csrc/) behind the backend contract: one op call each way.

The kernels take the divergence's ids [0, div_vocab) of a teacher at least that wide (read in place,
whatever its row stride) and CE over the student's whole vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._rows import NUM_STATS, flat_labels


def _rows2d(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[N, columns] rows of x: a view for row-strided inputs; copies only what cannot be one."""
    if x is None:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def forward(student, teacher, labels, divergence, param_a, param_b, temperature, ignore_index, with_ce, div_vocab):
    lead = student.shape[:-1]
    div, ce, stats = torch.ops.distillkit_ext.rows_forward(
        _rows2d(student), _rows2d(teacher) if divergence != 0 else None,
        flat_labels(labels, student) if with_ce else None,
        divergence, param_a, param_b, temperature, ignore_index, with_ce, div_vocab)
    return div.view(lead), ce.view(lead), stats.view(*lead, NUM_STATS)


def backward(grad_div, grad_ce, student, teacher, labels, stats, divergence, param_a, param_b, temperature,
             ignore_index, with_ce, div_vocab):
    grad = torch.ops.distillkit_ext.rows_backward(
        grad_div.reshape(-1).float().contiguous(), grad_ce.reshape(-1).float().contiguous(),
        _rows2d(student), _rows2d(teacher) if divergence != 0 else None,
        flat_labels(labels, student) if with_ce else None, stats.reshape(-1, NUM_STATS).contiguous(),
        divergence, param_a, param_b, temperature, ignore_index, with_ce, div_vocab)
    return grad.view(student.shape)
