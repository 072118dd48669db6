"""The divergences: one row each, read by every layer.

The checks, the kernels' parameters, the kernel report, the comparison tool, the benchmarks and
the tests all take the names, ids and options from here. The math of a divergence lives in one
place per backend (docs/DESIGN.md, "Adding a divergence"):

    kernels/divergence_terms.py            _divergence_terms       (Triton)
    csrc/distill_math.h                    div_terms               (CUDA and C++ CPU)
    distillkit/core/backends/torch_rows.py divergence_terms        (chunked torch)
    distillkit/core/reference.py           divergence_per_token    (float64 oracle)

The ids are the kernels' compile-time switch: `kernels/divergence_terms.py` and `csrc/distill_math.h` spell
them as constants, and tests/core/test_divergence_registry.py checks those against this table.
An id that no backend knows fails loudly in each: ValueError (torch, reference), a static assert
(Triton, C++ templates) and a TORCH_CHECK against the bound (C++ ops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

NO_DIVERGENCE = 0  # the kernels' id for "CE only": the teacher is not read


@dataclass(frozen=True)
class Options:
    """The loss keywords that parameterize a divergence (the same defaults on every entry point)."""
    beta: float = 0.5
    skew: float = 0.1
    alpha_beta: tuple[float, float] = (0.5, 0.5)


@dataclass(frozen=True)
class Divergence:
    name: str
    id: int
    formula: str  # D(p, q), p the teacher's and q the student's softmax at temperature T
    options: tuple[str, ...]  # the fields of Options it reads
    # The kernels' two float parameters (param_a, param_b) from the options.
    params: Callable[[Options], tuple[float, float]]
    # D from one online pass over the logits (the KLs); the others need both normalizers first.
    one_pass: bool = False
    topk: bool = False  # the top-k op (sparse teachers) implements it


def _none(_: Options) -> tuple[float, float]:
    return 0.0, 0.0


REGISTRY: tuple[Divergence, ...] = (
    Divergence("forward_kl", 1, "sum p log(p/q)", (), _none, one_pass=True, topk=True),
    Divergence("reverse_kl", 2, "sum q log(q/p)", (), _none, one_pass=True, topk=True),
    Divergence("jsd", 3, "beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q", ("beta",),
               lambda o: (o.beta, 0.0)),
    Divergence("skew_forward_kl", 4, "KL(p||m), m = skew p + (1-skew) q", ("skew",), lambda o: (o.skew, 0.0)),
    Divergence("skew_reverse_kl", 5, "KL(q||m), m = (1-skew) p + skew q", ("skew",), lambda o: (o.skew, 0.0)),
    Divergence("tvd", 6, "1/2 sum |p - q|", (), _none),
    Divergence("alpha_beta", 7,
               "-1/(a b) sum (p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)); (1, 0) = forward KL, (0, 1) = reverse KL",
               ("alpha_beta",), lambda o: (float(o.alpha_beta[0]), float(o.alpha_beta[1]))),
)

NAMES: tuple[str, ...] = tuple(d.name for d in REGISTRY)
IDS: dict[str, int] = {d.name: d.id for d in REGISTRY}
MAX_ID = max(IDS.values())
TWO_PASS_IDS: tuple[int, ...] = tuple(d.id for d in REGISTRY if not d.one_pass)
TOPK_NAMES: tuple[str, ...] = tuple(d.name for d in REGISTRY if d.topk)
_BY_ID = {d.id: d for d in REGISTRY}


def get(name: str) -> Divergence:
    """The row of `name`; a ValueError listing the known names otherwise."""
    for d in REGISTRY:
        if d.name == name:
            return d
    raise ValueError(f"divergence must be one of {', '.join(map(repr, NAMES))}; got {name!r}")


def from_id(div_id: int) -> Divergence:
    if div_id not in _BY_ID:
        raise ValueError(f"unknown divergence id {div_id}; known: {sorted(_BY_ID)} (distillkit/core/divergences.py)")
    return _BY_ID[div_id]


def check_number(name: str, value) -> float:
    """`value` as a float, or a TypeError naming `name` (bools, strings and tensors are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float; got {type(value).__name__} {value!r}")
    return float(value)


def _check_beta(value) -> None:
    if not (0.0 < check_number("beta", value) < 1.0):
        raise ValueError(f"beta must be in (0, 1); got {value}")


def _check_skew(value) -> None:
    if not (0.0 <= check_number("skew", value) < 1.0):
        raise ValueError(f"skew must be in [0, 1); got {value}")


def _check_alpha_beta(value) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"alpha_beta must be a pair (alpha, beta) of floats; got {value!r}")
    alpha, beta = check_number("alpha_beta[0] (alpha)", value[0]), check_number("alpha_beta[1] (beta)", value[1])
    # Negative powers of p or q are unbounded where a probability is 0 (a masked vocabulary entry).
    if not (math.isfinite(alpha) and math.isfinite(beta) and alpha >= 0 and beta >= 0 and alpha + beta > 0):
        raise ValueError(f"alpha_beta must be two finite numbers >= 0, not both 0; got {tuple(value)}")


OPTION_CHECKS: dict[str, Callable] = {"beta": _check_beta, "skew": _check_skew, "alpha_beta": _check_alpha_beta}


def check(name: str, options: Options) -> Divergence:
    """The row of `name` after checking every option (each has a valid default, so all are checked,
    whichever divergence reads them: a bad value never waits for the divergence that uses it)."""
    row = get(name)
    for field, check_option in OPTION_CHECKS.items():
        check_option(getattr(options, field))
    return row


def kernel_params(name: str, options: Options) -> tuple[float, float]:
    """The kernels' (param_a, param_b) for divergence `name` with these options."""
    return get(name).params(options)
