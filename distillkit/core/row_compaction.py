"""The per-row loss coefficients of the fused-linear ops, and masked-row compaction: rows with no active
term skip both LM-head GEMMs.

Agent trajectories are mostly prompt and tool output, whose rows carry no loss term. The loss and
every gradient are linear in the per-row coefficients (`loss_coefficients`), so a row
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

from ._checks import Weight
from ._reduce import count_active_tokens


def row_coefficient(weight: Weight, lead_shape, scale: float, device) -> Tensor:
    if isinstance(weight, torch.Tensor):
        w = weight.to(torch.float32)
        # where(): a token of weight 0 stays at exactly 0 (and gives its weight no gradient) even if its D is inf.
        return torch.where(w != 0, w * scale, 0.0).expand(lead_shape)
    return torch.full(lead_shape, float(weight) * scale, dtype=torch.float32, device=device)


def loss_coefficients(kl_weight: Weight, ce_weight: Weight, valid: Optional[Tensor], lead, device, *,
                      temperature: float, temperature_scaling: bool, reduction: str, normalizer):
    """(coef_div, coef_ce) [lead] fp32: the loss is sum_r coef_div[r] D[r] + coef_ce[r] ce[r] (fused_linear.py's
    module docstring); differentiable in tensor weights and a tensor normalizer."""
    scale = temperature**2 if temperature_scaling else 1.0
    coef_div = row_coefficient(kl_weight, lead, scale, device)
    coef_ce = row_coefficient(ce_weight, lead, 1.0, device)
    if reduction == "mean":
        if normalizer is None:
            like = torch.zeros(lead, dtype=torch.float32, device=device)
            denom = count_active_tokens(like, valid, kl_weight, ce_weight).clamp_min(1)
        else:
            denom = normalizer
        coef_div, coef_ce = coef_div / denom, coef_ce / denom
    return coef_div, coef_ce


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
