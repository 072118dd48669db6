"""Masked-row compaction for the fused-linear ops: rows with no active term skip both LM-head GEMMs.

Agent trajectories are mostly prompt and tool output, whose rows carry no loss term. The loss and
every gradient are linear in the per-row coefficients (`fused_linear.loss_coefficients`), so a row
whose divergence and cross-entropy coefficients are both 0 contributes nothing: the ops run on the
active rows only, gathered with `index_select` (its backward scatters the hidden-state gradient
back; inactive rows get exactly 0), and a per-row loss is scattered back with zeros elsewhere.

Finding the active rows costs one host-device synchronization per call (`nonzero`: their number
sets the shapes). Under torch.compile the ops do not compact, so that the graph stays free of
synchronizations and of data-dependent shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def rows_where(active: Tensor, enabled: bool) -> Optional[Tensor]:
    """int64 indices of the True rows of `active` ([N] bool), or None to run every row: compaction off, under
    torch.compile, or nothing to skip. Synchronizes with the device once (see the module docstring)."""
    if not enabled or torch.compiler.is_compiling():
        return None
    rows = active.nonzero().squeeze(1)
    return None if rows.numel() == active.numel() else rows


def active_rows(coef_div: Tensor, coef_ce: Tensor, valid_labels: Optional[Tensor], enabled: bool) -> Optional[Tensor]:
    """rows_where for the rows with a term: a non-zero divergence coefficient, or a non-zero CE coefficient and a
    valid label (all [N]; valid_labels None: no labels)."""
    with_ce = coef_ce != 0 if valid_labels is None else (coef_ce != 0) & valid_labels
    return rows_where((coef_div != 0) | with_ce, enabled)


def take_rows(rows: Optional[Tensor], tensor: Optional[Tensor]) -> Optional[Tensor]:
    """tensor[rows] along dim 0 (differentiable), or tensor itself when rows is None."""
    if rows is None or tensor is None:
        return tensor
    return tensor.index_select(0, rows)


def put_rows(rows: Optional[Tensor], values: Tensor, num_rows: int) -> Tensor:
    """A per-row result of the active rows back in all num_rows rows, 0 at the skipped ones (differentiable)."""
    if rows is None:
        return values
    return values.new_zeros(num_rows).index_copy(0, rows, values)
