"""Chat-format JSONL for supervised fine-tuning, from agent trajectories.

:func:`build_finetune_jsonl` writes one JSON object per line in the OpenAI chat
fine-tuning format with tool calls::

    {"messages": [
        {"role": "system", "content": "..."},                      # optional
        {"role": "user", "content": "How much do 3 kiwis cost?"},
        {"role": "assistant", "content": "Look up the kiwi price.",  # reasoning (or null)
         "tool_calls": [{"id": "call_0", "type": "function",
                         "function": {"name": "lookup", "arguments": "{\\"key\\": \\"kiwi.price\\"}"}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "6"},
        {"role": "assistant", "content": "..."},                    # a reasoning-only step
        ...
        {"role": "assistant", "content": "18"}],
     "tools": [{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}]}

Each record is validated before it is written (roles, ordering, every tool call
answered once by a ``tool`` message, arguments are a JSON object, a final assistant
answer). :func:`load_finetune_jsonl` reads the file back into native trajectories
(``{"user", "steps": [{"reasoning", "tool_call", "tool_result"}], "answer"}``); the data
layer reads it too (``distillkit.data.load_trajectories``, OpenAI format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

__all__ = ["build_finetune_jsonl", "trajectory_to_messages", "messages_to_trajectory", "validate_record",
           "load_finetune_jsonl", "FinetuneDataError"]


class FinetuneDataError(ValueError):
    pass


def _as_trajectory(sample: Any) -> Mapping[str, Any]:
    if hasattr(sample, "to_trajectory"):
        return sample.to_trajectory()
    if isinstance(sample, Mapping):
        return sample
    raise FinetuneDataError(f"a sample must be a trajectory dict, got {type(sample).__name__}")


def _openai_tools(tools: Optional[Sequence[Mapping[str, Any]]]) -> Optional[list[dict]]:
    """Accepts OpenAI tool declarations or Anthropic ones (name, description, input_schema)."""
    if tools is None:
        return None
    out = []
    for tool in tools:
        if tool.get("type") == "function" and "function" in tool:
            out.append(dict(tool))
        else:
            out.append({"type": "function", "function": {
                "name": tool["name"], "description": tool.get("description", ""),
                "parameters": tool.get("input_schema", tool.get("parameters", {"type": "object"}))}})
    return out


def trajectory_to_messages(trajectory: Mapping[str, Any], system: Optional[str] = None) -> list[dict]:
    """One native trajectory as chat messages (one assistant turn with one tool call per step)."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": trajectory["user"]})
    for index, step in enumerate(trajectory.get("steps", ())):
        call = step.get("tool_call")
        if call is None:  # a reasoning-only step: an assistant message without tool calls
            if step.get("tool_result") is not None:
                raise FinetuneDataError(f"step {index} has a tool_result without a tool_call")
            if not step.get("reasoning"):
                raise FinetuneDataError(f"step {index} has neither reasoning nor a tool_call")
            messages.append({"role": "assistant", "content": step["reasoning"]})
            continue
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
            raise FinetuneDataError(f"step {index} has a malformed tool_call")
        call_id = f"call_{index}"
        messages.append({"role": "assistant", "content": step.get("reasoning") or None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": str(step.get("tool_result", ""))})
    messages.append({"role": "assistant", "content": str(trajectory["answer"])})
    return messages


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise :class:`FinetuneDataError` unless ``record`` is a well-formed chat fine-tuning example."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FinetuneDataError("'messages' must be a non-empty list")
    roles = [m.get("role") for m in messages]
    start = 1 if roles[0] == "system" else 0
    if len(roles) <= start or roles[start] != "user":
        raise FinetuneDataError("the first message (after an optional system message) must be from the user")
    open_calls: dict[str, str] = {}
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant", "tool"):
            raise FinetuneDataError(f"message {i}: unknown role {role!r}")
        if role == "system" and i != 0:
            raise FinetuneDataError(f"message {i}: a system message must come first")
        if role in ("system", "user") and not isinstance(m.get("content"), str):
            raise FinetuneDataError(f"message {i}: {role} content must be a string")
        if role == "assistant":
            if open_calls:
                raise FinetuneDataError(f"message {i}: tool calls {sorted(open_calls)} were not answered")
            calls = m.get("tool_calls") or []
            if not calls and not isinstance(m.get("content"), str):
                raise FinetuneDataError(f"message {i}: an assistant message needs content or tool_calls")
            for call in calls:
                fn = call.get("function") or {}
                if call.get("type") != "function" or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise FinetuneDataError(f"message {i}: malformed tool call {call!r}")
                try:
                    args = json.loads(fn.get("arguments"))
                except (TypeError, json.JSONDecodeError):
                    raise FinetuneDataError(f"message {i}: tool call arguments must be a JSON string") from None
                if not isinstance(args, dict):
                    raise FinetuneDataError(f"message {i}: tool call arguments must be a JSON object")
                if not isinstance(call.get("id"), str) or call["id"] in open_calls:
                    raise FinetuneDataError(f"message {i}: tool call ids must be unique strings")
                open_calls[call["id"]] = fn["name"]
        if role == "tool":
            if m.get("tool_call_id") not in open_calls:
                raise FinetuneDataError(f"message {i}: tool message answers no open tool call")
            if not isinstance(m.get("content"), str):
                raise FinetuneDataError(f"message {i}: tool content must be a string")
            del open_calls[m["tool_call_id"]]
    last = messages[-1]
    if last.get("role") != "assistant" or last.get("tool_calls") or not isinstance(last.get("content"), str):
        raise FinetuneDataError("the last message must be the assistant's final answer")
    if "tools" in record:
        for tool in record["tools"]:
            if tool.get("type") != "function" or not isinstance((tool.get("function") or {}).get("name"), str):
                raise FinetuneDataError(f"malformed tool declaration {tool!r}")


def build_finetune_jsonl(samples: Iterable[Any], path: Union[str, Path], *,
                         tools: Optional[Sequence[Mapping[str, Any]]] = None, system: Optional[str] = None,
                         skip_failed: bool = True) -> int:
    """Write trajectories as chat-format fine-tuning JSONL; returns the number of records written.

    samples: native trajectories (dicts) or objects with ``to_trajectory()`` (e.g. agent episodes).
    tools: tool declarations (OpenAI or Anthropic style) stored with every record.
    skip_failed: leave out trajectories with an ``error`` or without an answer (else they raise).
    Every record is validated before writing; an invalid one raises :class:`FinetuneDataError` and
    the file is not left half-written.
    """
    path = Path(path)
    declared = _openai_tools(tools)
    records = []
    for index, sample in enumerate(samples):
        trajectory = _as_trajectory(sample)
        if trajectory.get("error") or trajectory.get("answer") is None:
            if skip_failed:
                continue
            raise FinetuneDataError(f"sample {index} failed or has no answer")
        try:
            record: dict[str, Any] = {"messages": trajectory_to_messages(trajectory, system)}
            if declared is not None:
                record["tools"] = declared
            validate_record(record)
        except FinetuneDataError as exc:
            raise FinetuneDataError(f"sample {index}: {exc}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise FinetuneDataError(f"sample {index}: missing or malformed field ({exc!r})") from None
        records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(records)


def messages_to_trajectory(messages: Sequence[Mapping[str, Any]]) -> dict:
    """Inverse of :func:`trajectory_to_messages` (the system message is dropped)."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    steps: list[dict] = []
    by_id: dict[str, dict] = {}
    answer = None
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m.get("tool_calls") and i != last:
            steps.append({"reasoning": m.get("content") or ""})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            for k, call in enumerate(m["tool_calls"]):
                step = {"reasoning": (m.get("content") or "") if k == 0 else "",
                        "tool_call": {"name": call["function"]["name"],
                                      "arguments": json.loads(call["function"]["arguments"])},
                        "tool_result": None}
                steps.append(step)
                by_id[call["id"]] = step
        elif m["role"] == "tool":
            by_id[m["tool_call_id"]]["tool_result"] = m["content"]
        elif m["role"] == "assistant":
            answer = m.get("content")
    return {"user": user, "steps": steps, "answer": answer}


def load_finetune_jsonl(path: Union[str, Path]) -> list[dict]:
    """Read a file written by :func:`build_finetune_jsonl` back as native trajectories (validated)."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            try:
                validate_record(record)
            except FinetuneDataError as exc:
                raise FinetuneDataError(f"{path}:{line_no}: {exc}") from None
            out.append(messages_to_trajectory(record["messages"]))
    return out
