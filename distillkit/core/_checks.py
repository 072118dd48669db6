"""Argument checks shared by the fused op and the reference.

Every check reads only metadata (shapes, dtypes, Python values): none of them
synchronizes with the device. The one exception, the label range check, is a
separate function that callers can switch off.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import backends, divergences
from .divergences import check_number

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = backends.NAMES
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Weight = Union[float, int, torch.Tensor]


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64; got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension; got a 0-dim tensor")


def check_options(*, divergence: str, beta: float, skew: float, temperature: float,
                  reduction: str, backend: str, alpha_beta=divergences.Options.alpha_beta) -> divergences.Options:
    """Check the loss options; returns the divergence options (distillkit/core/divergences.py)."""
    options = divergences.Options(beta, skew, alpha_beta)
    divergences.check(divergence, options)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    temperature = check_number("temperature", temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    return options


VOCAB_MISMATCH = ("error", "truncate")


def check_pair(student: torch.Tensor, teacher: Optional[torch.Tensor], vocab_mismatch: str = "error") -> None:
    check_logits("student_logits", student)
    check_choice("vocab_mismatch", vocab_mismatch, VOCAB_MISMATCH)
    if teacher is None:
        return
    check_logits("teacher_logits", teacher)
    if teacher.shape[-1] != student.shape[-1] and vocab_mismatch == "error":
        raise ValueError(
            f"teacher_logits has vocabulary size {teacher.shape[-1]} but student_logits has "
            f"{student.shape[-1]}; pass vocab_mismatch='truncate' to compare the distributions over the "
            f"shared first {min(teacher.shape[-1], student.shape[-1])} ids")
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"teacher_logits leading shape {tuple(teacher.shape[:-1])} does not match "
            f"student_logits leading shape {tuple(student.shape[:-1])}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")


def check_labels(labels: Optional[torch.Tensor], student: torch.Tensor) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of int64; got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor (int64); got {labels.dtype}")
    if labels.shape != student.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but must match the leading shape "
            f"{tuple(student.shape[:-1])} of student_logits")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {student.device}")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise if a label is outside [0, V) and not ignore_index. Synchronizes with the device."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad].flatten()[0]
        raise ValueError(
            f"labels contains {int(first)}, outside [0, {vocab_size}) and not ignore_index={ignore_index}; "
            "pass check_labels=False to skip this check (out-of-range labels then count as ignored)")


def check_weight(name: str, weight: Weight, lead_shape: torch.Size, device: torch.device) -> None:
    if isinstance(weight, bool):
        raise TypeError(f"{name} must be a float or a tensor; got bool")
    if isinstance(weight, (int, float)):
        if not math.isfinite(weight):
            raise ValueError(f"{name} must be finite; got {weight}")
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a float or a tensor; got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got {weight.dtype}")
    try:
        shape = torch.broadcast_shapes(weight.shape, lead_shape)
    except RuntimeError:
        shape = None
    if shape != lead_shape:
        raise ValueError(
            f"{name} has shape {tuple(weight.shape)}, which does not broadcast to the leading shape "
            f"{tuple(lead_shape)} of the logits")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but the logits are on {device}")


def is_literal_zero(weight: Weight) -> bool:
    """A Python 0 weight: its term is not computed at all (a tensor of zeros still is, for its gradient)."""
    return not isinstance(weight, torch.Tensor) and weight == 0


def check_terms_inputs(student: torch.Tensor, teacher: Optional[torch.Tensor], labels: Optional[torch.Tensor], *,
                       with_divergence: bool, with_ce: Optional[bool], vocab_mismatch: str) -> bool:
    """The checks of every per-token terms entry point; returns with_ce (None: whether labels are given)."""
    check_pair(student, teacher if with_divergence else None, vocab_mismatch)
    check_labels(labels, student)
    if with_divergence and teacher is None:
        raise ValueError("teacher_logits is None: pass teacher logits, or kl_weight=0.0 for a CE-only loss")
    with_ce = labels is not None if with_ce is None else with_ce
    if with_ce and labels is None:
        raise ValueError("ce_weight is non-zero but labels is None: pass labels for the CE term")
    return with_ce


def check_loss_inputs(student: torch.Tensor, labels: Optional[torch.Tensor], kl_weight: Weight, ce_weight: Weight,
                      normalizer) -> None:
    """The checks of every weighted-loss entry point (the logits, the weights, the normalizer)."""
    check_logits("student_logits", student)
    check_weight("kl_weight", kl_weight, student.shape[:-1], student.device)
    check_weight("ce_weight", ce_weight, student.shape[:-1], student.device)
    check_normalizer(normalizer)
    if labels is None and not is_literal_zero(ce_weight):
        raise ValueError("ce_weight is non-zero but labels is None: pass labels for the CE term")


def check_normalizer(normalizer) -> None:
    """A float or 0-dim tensor, finite and > 0. A tensor's value is checked on the device without a
    host sync (an asynchronous assert; skipped under torch.compile, like the label range check)."""
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a float or a 0-dim tensor; got shape {tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise TypeError(f"normalizer must be a real number; got a {normalizer.dtype} tensor")
        if not torch.compiler.is_compiling():
            ok = torch.isfinite(normalizer) & (normalizer > 0)
            torch._assert_async(ok, "normalizer must be finite and > 0 (got a tensor that is not)")
        return
    value = check_number("normalizer", normalizer)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"normalizer must be finite and > 0; got {normalizer}")
