"""Views of [..., V] logits as rows, shared by the launchers."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


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
    stats = torch.empty((*lead, 4), dtype=torch.float32, device=student.device)
    return div, ce, stats
