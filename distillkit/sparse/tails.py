"""The tails of the top-k loss: one row each, read by every layer (docs/SPARSE.md, "Tails").

The API's checks, the teacher preprocessing, both backends, the launcher and the kernel report take
names, ids and switches from here; kernels/topk.py spells the ids as constants (tests check them). The
oracle (reference.py) validates names here and does its own math per name.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import divergences
from ..core.divergences import NO_DIVERGENCE
from ..core.divergences import TOPK_NAMES as TOPK_DIVERGENCES

__all__ = ["REST_FLOOR", "Tail", "TAIL_REGISTRY", "TAILS", "TOPK_DIVERGENCES", "tail_named", "tail_from_id",
           "check_tail"]

REST_FLOOR = 2.0**-20


@dataclass(frozen=True)
class Tail:
    name: str
    id: int  # the kernels' compile-time TAIL
    rest_category: bool  # one more category holds the mass outside the ids, on both sides
    full_softmax: bool  # the student at the ids is its full-vocabulary softmax (a pass over V)
    divergences: tuple[str, ...] = TOPK_DIVERGENCES
    why_only: str = ""  # why `divergences` is restricted, for the error message


TAIL_REGISTRY: tuple[Tail, ...] = (
    Tail("renormalize", 1, rest_category=False, full_softmax=False),
    Tail("bucket", 2, rest_category=True, full_softmax=True),
    Tail("student_full", 3, rest_category=False, full_softmax=True, divergences=("forward_kl",),
         why_only="reverse KL against a teacher that is 0 off its stored ids is infinite"),
)
TAILS: tuple[str, ...] = tuple(t.name for t in TAIL_REGISTRY)
_TAIL_BY_ID = {t.id: t for t in TAIL_REGISTRY}


def tail_named(name: str) -> Tail:
    for t in TAIL_REGISTRY:
        if t.name == name:
            return t
    raise ValueError(f"tail must be one of {', '.join(map(repr, TAILS))}; got {name!r}")


def tail_from_id(tail_id: int, divergence_id: int = NO_DIVERGENCE) -> Tail:
    """The row of the kernels' `tail_id`, after checking that it defines divergence `divergence_id`."""
    if tail_id not in _TAIL_BY_ID:
        raise ValueError(f"unknown tail id {tail_id}; known: {sorted(_TAIL_BY_ID)} (distillkit/sparse/tails.py)")
    row = _TAIL_BY_ID[tail_id]
    if divergence_id != NO_DIVERGENCE:
        check_tail(row.name, divergences.from_id(divergence_id).name)
    return row


def check_tail(name: str, divergence: str) -> Tail:
    """The row of tail `name`, after checking that `divergence` is a top-k divergence that it defines."""
    if divergence not in TOPK_DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, TOPK_DIVERGENCES))}; got {divergence!r}")
    row = tail_named(name)
    if divergence not in row.divergences:
        why = f" ({row.why_only})" if row.why_only else ""
        raise ValueError(f"tail={name!r} supports divergence {' or '.join(map(repr, row.divergences))} "
                         f"only{why}; got divergence={divergence!r}")
    return row
