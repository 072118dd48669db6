"""Argument checks shared by the fused op and the reference.

Every check reads only metadata (shapes, dtypes, Python values): none of them
synchronizes with the device. The one exception, the label range check, is a
separate function that callers can switch off.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# Integer ids the kernels switch on; 0 means "no divergence term" (CE only).
DIVERGENCE_IDS = {name: i + 1 for i, name in enumerate(DIVERGENCES)}
NO_DIVERGENCE = 0
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "cpu", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Weight = Union[float, int, torch.Tensor]


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def known_options(cls, values, what: str) -> dict:
    """`values` as a dict, after checking that every key names a field of the dataclass `cls`
    (`what` names the options in the error: "loss", "curriculum")."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {what} option(s) {sorted(unknown)}; known: {sorted(known)}")
    return values


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64; got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension; got a 0-dim tensor")


def check_number(name: str, value) -> float:
    """`value` as a float, or a TypeError naming `name` (bools, strings and tensors are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float; got {type(value).__name__} {value!r}")
    return float(value)


def check_options(*, divergence: str, beta: float, skew: float, temperature: float,
                  reduction: str, backend: str) -> None:
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    temperature = check_number("temperature", temperature)
    beta = check_number("beta", beta)
    skew = check_number("skew", skew)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    if not (0.0 < beta < 1.0):
        raise ValueError(f"beta must be in (0, 1); got {beta}")
    if not (0.0 <= skew < 1.0):
        raise ValueError(f"skew must be in [0, 1); got {skew}")


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
