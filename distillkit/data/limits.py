"""The limits a decoded JSON value is held to, and json.loads within them (docs/DATA.md, "Errors").

- nesting: at most MAX_DEPTH arrays/objects inside one another (the record itself is level 1). Text is
  measured before json.loads, without recursion, so a line nested 100,000 deep cannot exhaust the stack;
- integers: at most Python's int-string limit of digits (sys.get_int_max_str_digits());
- strings: no surrogate code point (a "\\ud800" escape without its pair), in values and keys alike, since
  such a string cannot be encoded as UTF-8 and would only fail later, in the tokenizer.

Every failure is a `JSONLimitError` (a ValueError) whose message reads after a field name, e.g.
"not valid JSON (Expecting value at character 1)"; callers wrap it into a located TrajectoryError.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Optional

__all__ = ["MAX_DEPTH", "JSONLimitError", "loads_within_limits", "check_value", "find_surrogate", "field_path",
           "child_path", "has_surrogate"]

MAX_DEPTH = 100

# A JSON string (escapes included) or a bracket; brackets inside strings are thereby skipped.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")


class JSONLimitError(ValueError):
    """A JSON text or value outside the limits above. `path` is where inside the value (may be empty)."""

    def __init__(self, reason: str, path: str = ""):
        self.reason, self.path = reason, path
        super().__init__(f"{reason} (in the decoded JSON, at {path})" if path else reason)


def _int_digit_limit() -> int:
    get = getattr(sys, "get_int_max_str_digits", None)  # Python >= 3.10.7 / 3.11
    return get() if get is not None else 0


def _too_deep(text: str, limit: int) -> bool:
    # Cheap bound first: fewer opening brackets than the limit cannot nest deeper than it.
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        bracket = match.group()
        if bracket in "[{":
            depth += 1
            if depth > limit:
                return True
        elif bracket in "]}":
            depth -= 1
    return False


def loads_within_limits(text: str, *, check_strings: bool = True) -> Any:
    """json.loads(text), raising JSONLimitError (never RecursionError) for invalid JSON, nesting deeper
    than MAX_DEPTH, integers over Python's digit limit and (unless check_strings=False, for a caller
    that runs check_value itself) lone surrogates."""
    if _too_deep(text, MAX_DEPTH):
        raise JSONLimitError(f"nested deeper than {MAX_DEPTH} levels of arrays/objects")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONLimitError(f"not valid JSON ({exc.msg} at character {exc.pos + 1})") from None
    except ValueError as exc:  # json's only other ValueError: an integer over the int-string limit
        if "digits" not in str(exc):
            raise JSONLimitError(f"not valid JSON ({exc})") from None
        raise JSONLimitError(f"an integer has more than {_int_digit_limit()} digits, Python's int-string "
                             "limit (sys.set_int_max_str_digits)") from None
    except RecursionError:  # unreachable under the depth check, kept as a guard
        raise JSONLimitError("nested too deeply to decode") from None
    if check_strings:
        check_value(value)
    return value


def field_path(parts: tuple) -> str:
    """("steps", 0, "tool_result") -> "steps[0].tool_result"; odd keys are quoted: x["a b"]."""
    out = ""
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else child_path(out, part)
    return out


def child_path(where: str, key: str) -> str:
    """The path of `key` inside the object at `where` ("" for the top level)."""
    if _PLAIN_KEY.match(key):
        return f"{where}.{key}" if where else key
    shown = key if len(key) <= 40 else key[:40] + "..."
    return f"{where}[{shown!r}]"


def _surrogate_in(text: str) -> Optional[re.Match]:
    return None if text.isascii() else _SURROGATE.search(text)


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a surrogate code point (and so cannot be encoded as UTF-8)."""
    return _surrogate_in(text) is not None


def _describe(match: re.Match) -> str:
    return (f"a lone surrogate (U+{ord(match.group()):04X}) at character {match.start() + 1}, "
            "which cannot be encoded as UTF-8")


def check_value(value: Any, limit: int = MAX_DEPTH) -> None:
    """Walks a decoded value (without recursion, in document order): JSONLimitError at the first
    array/object deeper than `limit` or string (value or key) holding a surrogate, with its path."""
    # (value, path parts, depth, the key that leads to it: checked when the entry is reached)
    stack: list[tuple[Any, tuple, int, Optional[str]]] = [(value, (), 1, None)]
    while stack:
        item, parts, depth, key = stack.pop()
        if key is not None:
            match = _surrogate_in(key)
            if match:
                raise JSONLimitError(f"has a key {key[:40]!r} holding {_describe(match)}", field_path(parts[:-1]))
        if isinstance(item, str):
            match = _surrogate_in(item)
            if match:
                raise JSONLimitError(f"holds {_describe(match)}", field_path(parts))
        elif isinstance(item, (dict, list, tuple)):
            if depth > limit:
                raise JSONLimitError(f"nested deeper than {limit} levels of arrays/objects", field_path(parts))
            if isinstance(item, dict):
                children = [(child, parts + (str(k),), depth + 1, k if isinstance(k, str) else None)
                            for k, child in item.items()]
            else:
                children = [(child, parts + (i,), depth + 1, None) for i, child in enumerate(item)]
            stack.extend(reversed(children))


def find_surrogate(value: Any) -> Optional[JSONLimitError]:
    """The first surrogate (or over-deep nesting) in `value` as a JSONLimitError, or None."""
    try:
        check_value(value)
    except JSONLimitError as exc:
        return exc
    return None
