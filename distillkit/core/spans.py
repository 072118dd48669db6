"""Span types of an agent trajectory.

Every token of a tokenized trajectory carries one span id. Losses look the id
up in a small table of (kl_weight, ce_weight) pairs, so that e.g. reasoning is
distilled with a divergence, actions with cross-entropy, observations not at all.
"""

from __future__ import annotations

import enum


class Span(enum.IntEnum):
    PROMPT = 0  # system / user text: context, never a target
    REASON = 1  # the model's thinking or free text before an action
    ACTION = 2  # a tool call (name + JSON arguments)
    OBSERVATION = 3  # a tool result: produced by the environment, never a target
    ANSWER = 4  # the final answer to the user


NUM_SPANS = len(Span)
PAD_SPAN = -1  # padding positions; every loss weight is 0 there

SPAN_NAMES = tuple(s.name.lower() for s in Span)
