"""The parsers of the input formats: one decoded JSON record -> Trajectory.

Four JSONL formats are read (docs/DATA.md has one example of each):

- native:    {"id", "system", "user", "steps": [{"reasoning", "tool_call", "tool_result"}], "answer"}
- OpenAI:    {"messages": [...]} with roles system/user/assistant/tool and `tool_calls`
- Anthropic: {"messages": [...]} with content blocks text/thinking/tool_use/tool_result
- ReAct:     {"text": "..."} with Thought:/Action:/Action Input:/Observation:/Final Answer: lines

Records are plain JSON: nothing is ever eval'd, exec'd or unpickled. Before parsing, every record is
held to the limits of limits.py (nesting depth, lone surrogates); keys a format does not define are
warned about or rejected (`unknown_keys`, docs/DATA.md "Errors").
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

from .known_keys import (ANTHROPIC_BLOCK_KEYS, ANTHROPIC_MESSAGE_KEYS, OPENAI_CALL_KEYS, OPENAI_FUNCTION_KEYS,
                         OPENAI_MESSAGE_KEYS, STEP_KEYS, TOOL_CALL_KEYS, TOP_KEYS, UNKNOWN_KEY_MODES, KeyCheck,
                         UnknownKey, unknown_key_warning)
from .limits import JSONLimitError, check_value, loads_within_limits
from .react import parse_react
from .trajectory import Step, ToolCall, Trajectory, TrajectoryError

__all__ = ["FORMATS", "UNKNOWN_KEY_MODES", "UnknownKey", "detect_format", "parse_record", "parse_trajectory"]

FORMATS = ("native", "openai", "anthropic", "react")

# Anthropic-only content blocks; their presence tells the two {"messages": ...} styles apart.
_ANTHROPIC_BLOCKS = {"thinking", "redacted_thinking", "tool_use", "tool_result"}

# ----------------------------------------------------------------------------- field helpers

def _fail(field_name: Optional[str], reason: str):
    raise TrajectoryError(reason, field=field_name)


def _str(value, field_name: str, *, optional: bool = False) -> Optional[str]:
    if value is None:
        if optional:
            return None
        _fail(field_name, "is required")
    if not isinstance(value, str):
        _fail(field_name, f"must be a string, got {type(value).__name__}")
    return value


def _dict(value, field_name: str) -> dict:
    if not isinstance(value, dict):
        _fail(field_name, f"must be a JSON object, got {type(value).__name__}")
    return value


def _list(value, field_name: str) -> list:
    if not isinstance(value, list):
        _fail(field_name, f"must be a list, got {type(value).__name__}" if value is not None else "is required")
    return value


def _record_id(record: dict) -> Optional[str]:
    value = record.get("id")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # numeric ids are common in datasets
        return str(value)
    _fail("id", f"must be a string, got {type(value).__name__}")


def _tools(value, field_name: str) -> Optional[list[dict]]:
    if value is None:
        return None
    return [_dict(item, f"{field_name}[{i}]") for i, item in enumerate(_list(value, field_name))]


def _json_arguments(value, field_name: str) -> dict:
    """Tool-call arguments: a JSON object, or a string holding one (decoded within the limits)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = loads_within_limits(value)
        except JSONLimitError as exc:
            _fail(field_name, str(exc))
    return _dict(value, field_name)


def _join(parts: list[str]) -> Optional[str]:
    parts = [p for p in parts if p]
    return "\n\n".join(parts) if parts else None


class _PendingCalls:
    """Tool calls still waiting for their result, matched by id when the record has ids, else in order."""

    def __init__(self):
        self._calls: list[tuple[Optional[str], Step]] = []

    def add(self, call_id: Optional[str], step: Step) -> None:
        self._calls.append((call_id, step))

    def take(self, call_id: Optional[str], field_name: str, id_field: str) -> Step:
        if not self._calls:
            _fail(field_name, "tool result without a preceding tool call")
        if call_id is None:
            return self._calls.pop(0)[1]
        for i, (pending_id, step) in enumerate(self._calls):
            if pending_id == call_id:
                del self._calls[i]
                return step
        _fail(id_field, f"no pending tool call has id {call_id!r}")


# ----------------------------------------------------------------------------- native

_TYPO_DROPS_AN_ACTION = " (always an error here: a typo such as 'tool_calls' would drop an action)"


def _parse_native(record: dict, keys: KeyCheck) -> Trajectory:
    steps = []
    for i, raw in enumerate(_list(record.get("steps", []), "steps")):
        where = f"steps[{i}]"
        raw = _dict(raw, where)
        keys.check(raw, where, STEP_KEYS, always_error=True, why=_TYPO_DROPS_AN_ACTION)
        call = None
        if raw.get("tool_call") is not None:
            raw_call = _dict(raw["tool_call"], f"{where}.tool_call")
            keys.check(raw_call, f"{where}.tool_call", TOOL_CALL_KEYS, always_error=True, why=_TYPO_DROPS_AN_ACTION)
            call = ToolCall(_str(raw_call.get("name"), f"{where}.tool_call.name"),
                            _dict(raw_call.get("arguments", {}), f"{where}.tool_call.arguments"))
        step = Step(_str(raw.get("reasoning"), f"{where}.reasoning", optional=True), call,
                    _str(raw.get("tool_result"), f"{where}.tool_result", optional=True))
        if step.tool_result is not None and call is None:
            _fail(f"{where}.tool_result", "a tool_result needs the tool_call it answers in the same step")
        if step.reasoning is None and call is None:
            _fail(where, "a step needs reasoning or a tool_call")
        steps.append(step)
    return Trajectory(user=_str(record.get("user"), "user"), steps=steps,
                      answer=_str(record.get("answer"), "answer", optional=True),
                      system=_str(record.get("system"), "system", optional=True),
                      id=_record_id(record), tools=_tools(record.get("tools"), "tools"), source_format="native")


# ----------------------------------------------------------------------------- OpenAI

def _openai_text(content, field_name: str, *, optional: bool = False) -> Optional[str]:
    """Message content: a string or a list of {"type": "text", "text": ...} parts."""
    if content is None or isinstance(content, str):
        return _str(content, field_name, optional=optional)
    parts = []
    for k, part in enumerate(_list(content, field_name)):
        part = _dict(part, f"{field_name}[{k}]")
        if part.get("type") != "text":
            _fail(f"{field_name}[{k}].type", f"unsupported content part type {part.get('type')!r} (only text)")
        parts.append(_str(part.get("text"), f"{field_name}[{k}].text"))
    return "\n".join(parts)


def _turns(record: dict, keys: KeyCheck, known: tuple[str, ...]):
    """(field path, message, role, whether it is the last assistant turn) for each of record["messages"]."""
    messages = _list(record.get("messages"), "messages")
    last_assistant = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                         default=-1)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        message = _dict(message, where)
        keys.check(message, where, known)
        yield where, message, _str(message.get("role"), f"{where}.role"), i == last_assistant


def _parse_openai(record: dict, keys: KeyCheck) -> Trajectory:
    system_parts: list[str] = []
    user: Optional[str] = None
    steps: list[Step] = []
    answer: Optional[str] = None
    pending = _PendingCalls()
    for where, message, role, last_assistant_turn in _turns(record, keys, OPENAI_MESSAGE_KEYS):
        if role in ("system", "developer"):
            if user is not None:
                _fail(f"{where}.role", "a system message after the user turn is not supported")
            system_parts.append(_openai_text(message.get("content"), f"{where}.content"))
        elif role == "user":
            if user is not None:
                _fail(f"{where}.role", "a second user turn: one trajectory holds one user request")
            user = _openai_text(message.get("content"), f"{where}.content")
        elif role == "assistant":
            if user is None:
                _fail(f"{where}.role", "an assistant turn before the user turn")
            content = _openai_text(message.get("content"), f"{where}.content", optional=True)
            # Providers that expose hidden reasoning put it beside `content`.
            thinking = _str(message.get("reasoning_content", message.get("reasoning")),
                            f"{where}.reasoning_content", optional=True)
            calls = message.get("tool_calls") or []
            for j, raw in enumerate(_list(calls, f"{where}.tool_calls")):
                call_where = f"{where}.tool_calls[{j}]"
                raw = _dict(raw, call_where)
                keys.check(raw, call_where, OPENAI_CALL_KEYS)
                function = _dict(raw.get("function"), f"{call_where}.function")
                keys.check(function, f"{call_where}.function", OPENAI_FUNCTION_KEYS)
                call = ToolCall(_str(function.get("name"), f"{call_where}.function.name"),
                                _json_arguments(function.get("arguments"), f"{call_where}.function.arguments"))
                # Parallel calls become consecutive steps; the message text goes with the first.
                step = Step(_join([thinking or "", content or ""]) if j == 0 else None, call)
                steps.append(step)
                pending.add(_str(raw.get("id"), f"{call_where}.id", optional=True), step)
            if calls:
                continue
            if last_assistant_turn and content:
                if thinking:
                    steps.append(Step(reasoning=thinking))
                answer = content
            elif _join([thinking or "", content or ""]):
                steps.append(Step(reasoning=_join([thinking or "", content or ""])))
        elif role == "tool":
            step = pending.take(_str(message.get("tool_call_id"), f"{where}.tool_call_id", optional=True),
                                f"{where}.role", f"{where}.tool_call_id")
            step.tool_result = _openai_text(message.get("content"), f"{where}.content")
        else:
            _fail(f"{where}.role", f"unknown role {role!r}; expected system, user, assistant or tool")
    if user is None:
        _fail("messages", "no user message")
    return Trajectory(user=user, steps=steps, answer=answer, system=_join(system_parts), id=_record_id(record),
                      tools=_tools(record.get("tools"), "tools"), source_format="openai")


# ----------------------------------------------------------------------------- Anthropic

def _anthropic_text(content, field_name: str, *, optional: bool = False) -> Optional[str]:
    """A string or a list of text blocks (tool_result content, the top-level system prompt)."""
    return _openai_text(content, field_name, optional=optional)


def _anthropic_tools(value) -> Optional[list[dict]]:
    """Anthropic tool schemas ({name, description, input_schema}) in the OpenAI function format."""
    tools = _tools(value, "tools")
    if tools is None:
        return None
    converted = []
    for i, tool in enumerate(tools):
        if "input_schema" not in tool:
            converted.append(tool)
            continue
        function = {"name": _str(tool.get("name"), f"tools[{i}].name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted


def _anthropic_blocks(message: dict, where: str, keys: KeyCheck):
    """(field path, block, block type) for each content block of a message (a string is one text block)."""
    content = message.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else _list(content, f"{where}.content")
    for k, block in enumerate(blocks):
        block_where = f"{where}.content[{k}]"
        block = _dict(block, block_where)
        kind = block.get("type")
        if isinstance(kind, str) and kind in ANTHROPIC_BLOCK_KEYS:
            keys.check(block, block_where, ANTHROPIC_BLOCK_KEYS[kind])
        yield block_where, block, kind


def _parse_anthropic(record: dict, keys: KeyCheck) -> Trajectory:
    user: Optional[str] = None
    steps: list[Step] = []
    answer: Optional[str] = None
    pending = _PendingCalls()
    for where, message, role, last_assistant_turn in _turns(record, keys, ANTHROPIC_MESSAGE_KEYS):
        if role == "user":
            texts = []
            for block_where, block, kind in _anthropic_blocks(message, where, keys):
                if kind == "text":
                    texts.append(_str(block.get("text"), f"{block_where}.text"))
                elif kind == "tool_result":
                    step = pending.take(_str(block.get("tool_use_id"), f"{block_where}.tool_use_id", optional=True),
                                        block_where, f"{block_where}.tool_use_id")
                    step.tool_result = _anthropic_text(block.get("content", ""), f"{block_where}.content")
                else:
                    _fail(f"{block_where}.type", f"unsupported block type {kind!r} in a user turn")
            if texts:
                if user is not None:
                    _fail(f"{where}.content", "a second user turn with text: one trajectory holds one user request")
                user = "\n".join(texts)
        elif role == "assistant":
            if user is None:
                _fail(f"{where}.role", "an assistant turn before the user turn")
            held: list[tuple[str, str]] = []  # (block type, text) not yet attached to a step
            for block_where, block, kind in _anthropic_blocks(message, where, keys):
                if kind == "thinking":
                    held.append((kind, _str(block.get("thinking"), f"{block_where}.thinking")))
                elif kind == "text":
                    held.append((kind, _str(block.get("text"), f"{block_where}.text")))
                elif kind == "redacted_thinking":
                    continue  # encrypted: nothing to learn from
                elif kind == "tool_use":
                    call = ToolCall(_str(block.get("name"), f"{block_where}.name"),
                                    _json_arguments(block.get("input"), f"{block_where}.input"))
                    step = Step(_join([text for _, text in held]), call)
                    steps.append(step)
                    pending.add(_str(block.get("id"), f"{block_where}.id", optional=True), step)
                    held = []
                else:
                    _fail(f"{block_where}.type", f"unsupported block type {kind!r} in an assistant turn")
            if last_assistant_turn and held and held[-1][0] == "text":
                # The final text blocks (after the last thinking block) answer the user.
                cut = max((n + 1 for n, (kind, _) in enumerate(held) if kind == "thinking"), default=0)
                answer = "\n".join(text for _, text in held[cut:])
                held = held[:cut]
            if _join([text for _, text in held]):
                steps.append(Step(reasoning=_join([text for _, text in held])))
        else:
            _fail(f"{where}.role", f"unknown role {role!r}; expected user or assistant")
    if user is None:
        _fail("messages", "no user message")
    return Trajectory(user=user, steps=steps, answer=answer,
                      system=_anthropic_text(record.get("system"), "system", optional=True),
                      id=_record_id(record), tools=_anthropic_tools(record.get("tools")),
                      source_format="anthropic")


# ----------------------------------------------------------------------------- ReAct

def _parse_react(record: dict, keys: KeyCheck) -> Trajectory:  # ReAct has no nested key sets
    text = _str(record.get("text"), "text")
    try:
        parsed = parse_react(text)
    except ValueError as exc:
        _fail("text", str(exc))
    user = _str(record.get("user"), "user", optional=True) or parsed.question
    if not user:
        _fail("text", "no user request: give a 'user' field, a 'Question:' line or text before the first step")
    tools = _tools(record.get("tools"), "tools") if record.get("tools") is not None else parsed.tools
    steps = [Step(s.thought, ToolCall(s.action, s.action_input) if s.action is not None else None, s.observation)
             for s in parsed.steps]
    return Trajectory(user=user, steps=steps, answer=parsed.final_answer,
                      system=_str(record.get("system"), "system", optional=True) or parsed.system,
                      id=_record_id(record), tools=_tools(tools, "tools"), source_format="react")


# ----------------------------------------------------------------------------- entry points

_PARSERS = {"native": _parse_native, "openai": _parse_openai, "anthropic": _parse_anthropic, "react": _parse_react}


def detect_format(record: dict) -> str:
    """"native", "openai", "anthropic" or "react", from the record's keys (and content blocks)."""
    if "messages" in record:
        messages = record["messages"] if isinstance(record["messages"], list) else []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(isinstance(b, dict) and isinstance(b.get("type"), str)
                                                 and b["type"] in _ANTHROPIC_BLOCKS for b in content):
                return "anthropic"
        return "anthropic" if "system" in record else "openai"  # Anthropic keeps the system prompt top-level
    if "text" in record:
        return "react"
    if "user" in record or "steps" in record:
        return "native"
    _fail("(record)", "unrecognised record: expected 'user' and 'steps' (native), 'messages' (OpenAI or "
                "Anthropic) or 'text' (ReAct)")


def parse_record(record: Any, *, format: Optional[str] = None,
                 unknown_keys: Literal["warn", "error"] = "warn") -> tuple[Trajectory, list[UnknownKey]]:
    """One decoded JSON record -> (Trajectory, its unknown keys, one per level and key); warns about
    nothing (load_trajectories and parse_trajectory report the unknown keys their own way)."""
    if format is not None and format not in FORMATS:  # a tuple: an unhashable argument is just not in it
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    if unknown_keys not in UNKNOWN_KEY_MODES:
        raise ValueError(f"unknown_keys must be one of {UNKNOWN_KEY_MODES}, got {unknown_keys!r}")
    record = _dict(record, "(record)")
    try:  # before any parser looks at it: every string must be encodable, the nesting bounded
        check_value(record)
    except JSONLimitError as exc:
        _fail(exc.path or "(record)", exc.reason)
    keys = KeyCheck(unknown_keys)
    chosen = format or detect_format(record)
    keys.check(record, "", TOP_KEYS[chosen])
    trajectory = _PARSERS[chosen](record, keys)
    return trajectory, list(keys.found.values())


def parse_trajectory(record: Any, *, line: Optional[int] = None, format: Optional[str] = None,
                     unknown_keys: Literal["warn", "error"] = "warn") -> Trajectory:
    """One decoded JSON record -> Trajectory. `format` forces a parser; by default it is detected.

    A key the format does not define is an UnknownKeyWarning (unknown_keys="warn") or a TrajectoryError
    ("error"); a step or tool call of the native format with an unknown key is always an error.
    """
    try:
        trajectory, unknown = parse_record(record, format=format, unknown_keys=unknown_keys)
    except TrajectoryError as exc:
        raise (exc.at_line(line) if line is not None else exc) from None
    for item in unknown:
        warnings.warn(unknown_key_warning(item, f"line {line}: " if line is not None else ""), stacklevel=2)
    return trajectory
