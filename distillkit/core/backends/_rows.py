"""Views of [..., V] logits as rows, shared by the launchers."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


# Per-row statistics of the forward that the backward reads (docs/DESIGN.md): the raw maxima and the
# log-sums of teacher and student at T over the divergence ids, the gradient's row constant c, the
# student's raw max and log-sum at T = 1 over its whole vocabulary (CE), and for the one-pass KLs the
# other side's logit at the weighting side's argmax (the reference of their terms; 0 otherwise).
NUM_STATS = 8
STAT_M_T, STAT_LS_A, STAT_M_S, STAT_LS_B, STAT_C, STAT_M_1, STAT_LS_1, STAT_REF = range(NUM_STATS)


# Gradient entries below the smallest normal float32 are stored as 0: x86 GEMMs that consume a gradient
# full of fp32 (or bf16, same exponent range) subnormals run ~10x slower. float16 keeps its subnormals
# (2**-24 to 2**-14): mean-reduced gradients live there, flushing them fails the float64 tolerance, and
# no consumer slows down on them (CPU GEMMs widen fp16 to fp32, where they are normal; GPUs run them at
# full speed).
FLUSH_BELOW = torch.finfo(torch.float32).tiny


def flush_subnormals(grad: torch.Tensor) -> torch.Tensor:
    """fp32 gradient values below FLUSH_BELOW in magnitude as 0 (NaN stays NaN)."""
    return torch.where(grad.abs() < FLUSH_BELOW, 0.0, grad)


class RowView(NamedTuple):
    tensor: torch.Tensor  # the (possibly copied) logits whose storage the kernel reads
    n_inner: int  # rows are addressed as (row // n_inner, row % n_inner)
    stride_outer: int
    stride_inner: int

    @property
    def addressing(self) -> tuple[int, int, int]:
        """(n_inner, stride_outer, stride_inner), the kernels' row-addressing arguments."""
        return self.n_inner, self.stride_outer, self.stride_inner


def as_rows(x: torch.Tensor) -> RowView:
    """Address the rows of `x` [..., V] with at most two leading strides, copying only when
    the last dim is not contiguous or the leading dims cannot be collapsed to two."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1]) if size != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            outer_size, _ = merged[-1]
            merged[-1] = (outer_size * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        x = x.contiguous()
        merged = [(x.numel() // max(x.shape[-1], 1), x.shape[-1])]
    if not merged:
        return RowView(x, 1, 0, 0)
    if len(merged) == 1:
        return RowView(x, 1, merged[0][1], 0)
    (_, outer_stride), (inner_size, inner_stride) = merged
    return RowView(x, inner_size, outer_stride, inner_stride)


def flat_labels(labels: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Labels as a contiguous int64 vector (a dummy when there are none: the kernels never read it)."""
    if labels is None:
        return torch.empty(0, dtype=torch.int64, device=like.device)
    return labels.reshape(-1).to(torch.int64)


def row_outputs(student: torch.Tensor):
    lead = student.shape[:-1]
    div = torch.empty(lead, dtype=torch.float32, device=student.device)
    ce = torch.empty(lead, dtype=torch.float32, device=student.device)
    stats = torch.empty((*lead, NUM_STATS), dtype=torch.float32, device=student.device)
    return div, ce, stats
