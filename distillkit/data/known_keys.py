"""The keys each record level of each format defines, and the search for keys outside them.

A key outside its level's set is reported (unknown_keys="warn": an UnknownKeyWarning, counted in
LoadReport.unknown_keys) or rejected ("error": a TrajectoryError naming the key's field). The sets for
OpenAI and Anthropic messages are lenient: they hold the keys real exports carry beside what the parser
reads, so that such exports are neither warned about nor rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .limits import child_path
from .trajectory import TrajectoryError, UnknownKeyWarning

__all__ = ["UNKNOWN_KEY_MODES", "UnknownKey", "KeyCheck", "unknown_key_warning", "TOP_KEYS", "STEP_KEYS",
           "TOOL_CALL_KEYS", "OPENAI_MESSAGE_KEYS", "OPENAI_CALL_KEYS", "OPENAI_FUNCTION_KEYS",
           "ANTHROPIC_MESSAGE_KEYS", "ANTHROPIC_BLOCK_KEYS"]

UNKNOWN_KEY_MODES = ("warn", "error")

# The keys each record level defines, in the order the messages list them.
# native: plus what distillkit.agents.collect writes beside the trajectory (a failed query's error, the API's
# stop_reason), so that its own output loads without a warning.
TOP_KEYS = {"native": ("id", "system", "user", "tools", "steps", "answer", "error", "stop_reason"),
            "openai": ("id", "messages", "tools", "parallel_tool_calls"),
            "anthropic": ("id", "system", "messages", "tools"),
            "react": ("id", "text", "user", "system", "tools")}
STEP_KEYS = ("reasoning", "tool_call", "tool_result")
TOOL_CALL_KEYS = ("name", "arguments")
# Real exports carry more than the parser reads (names, refusals, audio, fine-tuning weights, an API
# response appended as a message): those keys are known, so that they are neither warned about nor rejected.
OPENAI_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal", "annotations", "audio",
                       "function_call", "reasoning_content", "reasoning", "weight")
OPENAI_CALL_KEYS = ("id", "type", "function", "index")
OPENAI_FUNCTION_KEYS = ("name", "arguments")
ANTHROPIC_MESSAGE_KEYS = ("role", "content", "id", "type", "model", "stop_reason", "stop_sequence", "usage")
ANTHROPIC_BLOCK_KEYS = {"text": ("type", "text", "citations", "cache_control"),
                        "thinking": ("type", "thinking", "signature", "cache_control"),
                        "redacted_thinking": ("type", "data", "cache_control"),
                        "tool_use": ("type", "id", "name", "input", "cache_control"),
                        "tool_result": ("type", "tool_use_id", "content", "is_error", "cache_control")}
_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class UnknownKey:
    """A key its record level does not define. `where` is that level with indices as [*] ("" = top)."""

    key: str
    where: str
    known: tuple[str, ...]

    @property
    def path(self) -> str:
        return child_path(self.where, str(self.key))

    @property
    def place(self) -> str:
        return f"in {self.where}" if self.where else "at the top level"


class KeyCheck:
    """Finds the unknown keys of one record: collected in `found` (mode "warn") or raised ("error")."""

    def __init__(self, mode: str):
        self.mode = mode
        self.found: dict[tuple[str, str], UnknownKey] = {}

    def check(self, obj: dict, where: str, known: tuple[str, ...], *, always_error: bool = False,
              why: str = "") -> None:
        for key in obj:
            if key in known:
                continue
            level = _INDEX.sub("[*]", where)
            if always_error or self.mode == "error":
                place = f"in {level}" if level else "at the top level"
                raise TrajectoryError(f"unknown key {str(key)[:40]!r}; known {place}: {', '.join(known)}{why}",
                                      field=child_path(where, str(key)))
            self.found.setdefault((level, key), UnknownKey(key, level, known))


def unknown_key_warning(item: UnknownKey, prefix: str = "", lines: str = "") -> UnknownKeyWarning:
    """"{prefix}unknown key 'stepz' at the top level{lines}; known: id, system, ..." (prefix: the file or line)."""
    return UnknownKeyWarning(f"{prefix}unknown key {str(item.key)[:40]!r} {item.place}{lines}; "
                             f"known: {', '.join(item.known)}")
