"""Per-token weighting and reduction of the fused losses (the reference has its own).

Everything here is O(tokens): it runs as ordinary PyTorch autograd on top of
the per-row divergence and cross-entropy, so per-token weights receive
gradients and `torch.compile` sees plain tensor ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._checks import Weight, is_literal_zero


class LossTerms(NamedTuple):
    divergence: torch.Tensor  # [...] fp32, D per token, not scaled by T**2 (0 when kl_weight == 0.0)
    cross_entropy: torch.Tensor  # [...] fp32, 0 where the label is ignored
    valid_label: Optional[torch.Tensor]  # [...] bool, None without labels


def valid_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Labels that take part in the CE term: not ignore_index and inside [0, V)."""
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab_size)


def _attached_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x * 0.0, 0.0)


def mask_ignored_tokens(kl_weight: Weight, valid_label: Optional[torch.Tensor],
                        divergence_on_ignored: bool = False) -> Weight:
    """The divergence weight with tokens whose label is ignored (or out of range) set to exactly 0.

    This is what TRL, Liger-Kernel and torchtune mean by ignore_index: an ignored token takes part in
    no term and is not counted by "mean". Without labels, or with divergence_on_ignored=True (labels
    mask only the CE term; mask the divergence with a per-token kl_weight instead), kl_weight is
    returned as it is.
    """
    if not isinstance(divergence_on_ignored, bool):
        raise TypeError(f"divergence_on_ignored must be a bool; got {type(divergence_on_ignored).__name__}")
    if divergence_on_ignored or valid_label is None or is_literal_zero(kl_weight):
        return kl_weight
    if isinstance(kl_weight, torch.Tensor):
        # where(), not a product: the weight of an ignored token gets no gradient and its D (NaN or
        # inf for a broken teacher row) never reaches the loss.
        return torch.where(valid_label, kl_weight, 0.0)
    return torch.where(valid_label, float(kl_weight), 0.0)


def weigh_and_reduce(
    divergence: torch.Tensor,  # [...] D per token (not yet scaled by T**2)
    cross_entropy: torch.Tensor,  # [...] ce per token, 0 where the label is ignored
    valid_label: Optional[torch.Tensor],  # [...] bool, None when there are no labels
    *,
    kl_weight: Weight,
    ce_weight: Weight,
    temperature: float,
    temperature_scaling: bool,
    reduction: str,
    normalizer,
) -> torch.Tensor:
    scale = temperature**2 if temperature_scaling else 1.0
    # Start from an exact 0 that stays attached to the graph, so backward() works even when
    # every weight is 0 (the gradient is then exactly 0, also through infinite entries).
    loss = _attached_zero(divergence) + _attached_zero(cross_entropy)
    if isinstance(kl_weight, torch.Tensor):
        # where() keeps a token of weight 0 at exactly 0 even if its divergence is inf.
        loss = loss + torch.where(kl_weight != 0, kl_weight * (divergence * scale), 0.0)
    elif kl_weight != 0:
        loss = loss + (kl_weight * scale) * divergence
    if not is_literal_zero(ce_weight):
        loss = loss + ce_weight * cross_entropy
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / normalizer
    return total / count_active_tokens(divergence, valid_label, kl_weight, ce_weight).clamp_min(1)


def count_active_tokens(like: torch.Tensor, valid_label: Optional[torch.Tensor],
                        kl_weight: Weight, ce_weight: Weight) -> torch.Tensor:
    """Tokens that carry a loss: kl_weight != 0, or ce_weight != 0 with a valid label."""
    active = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    if isinstance(kl_weight, torch.Tensor):
        active = active | (kl_weight != 0)
    elif kl_weight != 0:
        active = torch.ones_like(active)
    if valid_label is not None:
        if isinstance(ce_weight, torch.Tensor):
            active = active | ((ce_weight != 0) & valid_label)
        elif ce_weight != 0:
            active = active | valid_label
    return active.sum().to(like.dtype)
