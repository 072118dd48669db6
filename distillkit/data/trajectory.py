"""The internal representation of an agent trajectory, and the error a malformed record raises.

One trajectory is one user request answered by an agent: optional system prompt, the user
text, a list of steps (reasoning, tool call, tool result) and an optional final answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["TrajectoryError", "ToolCall", "Step", "Trajectory"]


class TrajectoryError(ValueError):
    """A malformed record. `line` is the 1-based JSONL line (None outside a file), `field` the
    path of the offending field, e.g. "messages[2].tool_calls[0].function.arguments"."""

    def __init__(self, reason: str, *, field: Optional[str] = None, line: Optional[int] = None):
        self.reason, self.field, self.line = reason, field, line
        where = ([f"line {line}"] if line is not None else []) + ([f"field {field!r}"] if field else [])
        super().__init__((", ".join(where) + ": " if where else "") + reason)

    def at_line(self, line: int) -> "TrajectoryError":
        return TrajectoryError(self.reason, field=self.field, line=line)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One agent step. A tool_result always answers this step's tool_call."""

    reasoning: Optional[str] = None
    tool_call: Optional[ToolCall] = None
    tool_result: Optional[str] = None


@dataclass
class Trajectory:
    user: str
    steps: list[Step] = field(default_factory=list)
    answer: Optional[str] = None
    system: Optional[str] = None
    id: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None  # tool schemas (OpenAI function format) for chat templates
    source_format: str = "native"

    def to_dict(self) -> dict[str, Any]:
        """The native JSON form (what `parse_trajectory(..., format="native")` reads back)."""
        out: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
        if self.system is not None:
            out["system"] = self.system
        out["user"] = self.user
        if self.tools is not None:
            out["tools"] = self.tools
        steps = []
        for step in self.steps:
            item: dict[str, Any] = {}
            if step.reasoning is not None:
                item["reasoning"] = step.reasoning
            if step.tool_call is not None:
                item["tool_call"] = {"name": step.tool_call.name, "arguments": step.tool_call.arguments}
            if step.tool_result is not None:
                item["tool_result"] = step.tool_result
            steps.append(item)
        out["steps"] = steps
        if self.answer is not None:
            out["answer"] = self.answer
        return out
