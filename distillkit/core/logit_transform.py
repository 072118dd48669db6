"""Logit transforms of models whose head output is not the logits: a scale (Cohere's logit_scale, Granite's
1 / logits_scaling) and Gemma 2/3's soft cap, softcap * tanh(z / softcap). The logits-free ops apply them
to each chunk of head outputs, in fp32, and chain their derivative into the chunk's gradient."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_number

__all__ = ["transform_logits", "transform_grad", "check_transform"]


def transform_logits(z: Tensor, scale: float, softcap: float) -> Tensor:
    """The logits of a model that scales and/or soft-caps its head's output: softcap * tanh(scale * z / softcap)
    (Gemma 2/3's final_logit_softcapping), or scale * z without a cap (softcap 0; Cohere, Granite). fp32."""
    if scale == 1.0 and softcap == 0.0:
        return z
    z = z.float() * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def transform_grad(g: Tensor, s: Tensor, scale: float, softcap: float) -> Tensor:
    """d/dz from d/ds for s = transform_logits(z): scale * (1 - (s / softcap)**2) with a cap, else scale."""
    if scale == 1.0 and softcap == 0.0:
        return g
    if not softcap:
        return g.float() * scale
    return g.float() * (scale * (1.0 - (s.float() / softcap) ** 2))


def check_transform(role: str, scale, softcap) -> tuple[float, float]:
    """(scale, softcap as the ops take it: 0 for none) after checking both are finite and positive."""
    scale = check_number(f"{role}_logit_scale", scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{role}_logit_scale must be a finite number > 0; got {scale}")
    if softcap is None:
        return scale, 0.0
    softcap = check_number(f"{role}_softcap", softcap)
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"{role}_softcap must be None or a finite number > 0; got {softcap}")
    return scale, softcap
