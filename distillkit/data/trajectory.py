"""The internal representation of an agent trajectory, and the error a malformed record raises.

One trajectory is one user request answered by an agent: optional system prompt, the user
text, a list of steps (reasoning, tool call, tool result) and an optional final answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["TrajectoryError", "UnknownKeyWarning", "ToolCall", "Step", "Trajectory"]


class TrajectoryError(ValueError):
    """A malformed record, located: `path` is the file (None outside one), `line` the 1-based JSONL line,
    `trajectory` names an in-memory trajectory (id and index) when there is no line, and `field` the
    path of the offending field, e.g. "messages[2].tool_calls[0].function.arguments" ("(record)" for
    the line as a whole). The message reads "data.jsonl, line 3, field 'steps[0].tool_call.name': reason"."""

    def __init__(self, reason: str, *, field: Optional[str] = None, line: Optional[int] = None,
                 path: Optional[str] = None, trajectory: Optional[str] = None):
        self.reason, self.field, self.line, self.path, self.trajectory = reason, field, line, path, trajectory
        where = [str(path)] if path is not None else []
        where += [f"line {line}"] if line is not None else []
        where += [f"trajectory {trajectory}"] if trajectory is not None else []
        where += [f"field {field!r}"] if field else []
        message = (", ".join(where) + ": " if where else "") + reason
        # File names and reasons may carry undecodable bytes (surrogate escapes): keep str(error) printable.
        super().__init__(message.encode("utf-8", "backslashreplace").decode("utf-8"))

    def located(self, *, line: Optional[int] = None, path: Optional[str] = None) -> "TrajectoryError":
        """A copy with `line` and `path` filled in (those given replace the current ones)."""
        return TrajectoryError(self.reason, field=self.field, line=self.line if line is None else line,
                               path=self.path if path is None else path, trajectory=self.trajectory)

    def at_line(self, line: int) -> "TrajectoryError":
        return self.located(line=line)


class UnknownKeyWarning(UserWarning):
    """A record has a key its format does not define (with unknown_keys="warn"; "error" raises instead)."""


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
