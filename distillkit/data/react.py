"""Plain ReAct transcripts: "Thought: / Action: / Action Input: / Observation: / Final Answer:" lines.

    System: be brief                                (optional)
    Question: what is the weather in Paris?        (or "User:"; else the text before the first step)
    Thought: I should look it up.
    Action: weather                                 (or inline: Action: weather {"city": "Paris"})
    Action Input: {"city": "Paris"}                 (a JSON object, parsed with json.loads)
    Observation: 18C, sunny
    Final Answer: It is 18C and sunny.

A line that starts with none of the keywords continues the value of the previous keyword.
The plain (no chat template) rendering in tokenize.py writes this form, with "User:" and an
optional "Tools: [json]" line, so it reads back to the same trajectory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .limits import JSONLimitError, loads_within_limits

_KEYWORD = re.compile(
    r"^\s*(System|Tools|Question|User|Thought|Action Input|Action|Observation|Final Answer)\s*:[ \t]?(.*)$")
_HEADER = {"System", "Tools", "Question", "User"}  # allowed only before the first step
_INLINE_ACTION = re.compile(r"^(\S+)\s+(\{.*\})\s*$", re.DOTALL)


@dataclass
class ReactStep:
    thought: Optional[str] = None
    action: Optional[str] = None
    action_input: dict[str, Any] = field(default_factory=dict)
    observation: Optional[str] = None
    has_input: bool = False


@dataclass
class ParsedReact:
    question: Optional[str]
    steps: list[ReactStep]
    final_answer: Optional[str]
    system: Optional[str] = None
    tools: Optional[list] = None


def _entries(text: str) -> tuple[str, list[tuple[str, str, int]]]:
    """(preamble, [(keyword, value, 1-based line of the text)]); continuation lines join the value."""
    preamble: list[str] = []
    entries: list[tuple[str, list[str], int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _KEYWORD.match(line)
        if match:
            entries.append((match.group(1), [match.group(2)], number))
        elif entries:
            entries[-1][1].append(line)
        else:
            preamble.append(line)
    return "\n".join(preamble).strip(), [(k, "\n".join(v).strip(), n) for k, v, n in entries]


_JSON_KINDS = {dict: "JSON object", list: "JSON list"}


def _json_value(value: str, where: str, keyword: str, expected: type) -> Any:
    """`value` decoded as JSON (within limits.py's limits); a ValueError naming `keyword` if it is not JSON
    of type `expected` or breaks a limit (nesting, integer length, lone surrogates)."""
    try:
        parsed = loads_within_limits(value)
    except JSONLimitError as exc:
        raise ValueError(f"{where}: {keyword}: {exc}") from None
    if not isinstance(parsed, expected):
        raise ValueError(f"{where}: {keyword} must be a {_JSON_KINDS[expected]}, got {type(parsed).__name__}")
    return parsed


def parse_react(text: str) -> ParsedReact:
    """Parse a ReAct transcript; raises ValueError naming the text line of the problem."""
    preamble, entries = _entries(text)
    question: Optional[str] = preamble or None
    system: Optional[str] = None
    tools: Optional[list] = None
    steps: list[ReactStep] = []
    final_answer: Optional[str] = None
    for keyword, value, number in entries:
        where = f"text line {number} ({keyword}:)"
        current = steps[-1] if steps else None
        if final_answer is not None:
            raise ValueError(f"{where}: nothing may follow the Final Answer")
        if keyword in _HEADER and steps:
            raise ValueError(f"{where}: {keyword} after the first step")
        if keyword in ("Question", "User"):
            question = value
        elif keyword == "System":
            system = value
        elif keyword == "Tools":
            tools = _json_value(value, where, "Tools", list)
        elif keyword == "Thought":
            if current is None or current.thought is not None or current.action is not None:
                current = ReactStep()
                steps.append(current)
            current.thought = value
        elif keyword == "Action":
            if not value:
                raise ValueError(f"{where}: empty tool name")
            if current is None or current.action is not None:
                current = ReactStep()
                steps.append(current)
            inline = _INLINE_ACTION.match(value)
            if inline:  # "Action: name {json}", the form the plain rendering writes
                current.action, current.has_input = inline.group(1), True
                current.action_input = _json_value(inline.group(2), where, "Action Input", dict)
            else:
                current.action = value
        elif keyword == "Action Input":
            if current is None or current.action is None or current.observation is not None:
                raise ValueError(f"{where}: no preceding Action")
            if current.has_input:
                raise ValueError(f"{where}: a second Action Input for one Action")
            current.action_input = _json_value(value, where, "Action Input", dict) if value else {}
            current.has_input = True
        elif keyword == "Observation":
            if current is None or current.action is None:
                raise ValueError(f"{where}: an Observation without a preceding Action")
            if current.observation is not None:
                raise ValueError(f"{where}: a second Observation for one Action")
            current.observation = value
        else:  # Final Answer
            final_answer = value
    return ParsedReact(question, steps, final_answer, system, tools)
