"""Collect a teacher's agent trajectories by running it in a tool loop.

:func:`collect_teacher_trajectories` has two backends:

- a local Hugging Face causal LM (plus its tokenizer) speaking the ReAct text protocol of
  :mod:`distillkit.agents.agent`: greedy generation with a KV cache, many queries per batch; each step is
  parsed (``json.loads`` for the tool arguments), the tool is executed locally and its result is
  appended as an observation, until the model writes a final answer (greedy, or sampled at a
  temperature: sampled rollouts cover the teacher's alternatives, better data for distillation);
- the Anthropic Messages API through the ``anthropic`` SDK: the tools are declared with their JSON
  schemas, ``thinking`` / ``text`` blocks become the step's reasoning, every ``tool_use`` block is
  executed locally and answered with a ``tool_result``, looping until ``stop_reason != "tool_use"``.

Rate limits (429), overload (529), server errors (5xx), timeouts and connection errors are retried
with exponential backoff (the ``retry-after`` header is honoured, capped at ``max_backoff``); a query
that still fails, or fails with a non-retryable error, is recorded with its ``error`` and
``answer: null`` instead of stopping the collection. The API key is read by the SDK from
``ANTHROPIC_API_KEY`` and never appears in the output or in log messages: every error text that is
stored (``error``, a tool's ``error: ...`` result) or logged goes through
:func:`distillkit.agents.redact.redact`, with the client's key, the key-like environment variables and
any ``secrets=`` as known secrets, plus key-shaped tokens (``sk-ant-...``, ``Bearer ...``, ...).

Output: one trajectory per query in the native schema::

    {"user": str, "steps": [{"reasoning": str, "tool_call": {"name": str, "arguments": {...}},
                             "tool_result": str}], "answer": str | null}

plus ``"error": str`` for a failed query. ``out_path`` also writes them as JSONL.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .agent import Cascade, LMPolicy, ReActFormat, execute_tool
from .redact import redact, secrets_from_environment

__all__ = ["collect_teacher_trajectories", "AnthropicTeacher", "LocalTeacher", "RetryPolicy", "tool_specs_from",
           "known_secrets"]

log = logging.getLogger(__name__)


class RetryPolicy:
    """Exponential backoff: ``min(max_backoff, base * 2**attempt)`` seconds, times a jitter in [0.5, 1].

    A ``retry-after`` header (seconds) replaces the computed delay, capped at ``max_backoff``.
    """

    RETRY_STATUS = frozenset({408, 409, 429, 529})

    def __init__(self, max_retries: int = 5, base: float = 1.0, max_backoff: float = 60.0,
                 jitter: bool = True, sleep: Callable[[float], None] = time.sleep, seed: Optional[int] = None,
                 secrets: Sequence[str] = ()):
        self.max_retries, self.base, self.max_backoff = max_retries, base, max_backoff
        self.jitter, self.sleep = jitter, sleep
        self.secrets = tuple(secrets)  # redacted from the retry warnings (AnthropicTeacher adds its key)
        self._rng = random.Random(seed)
        self.delays: list[float] = []  # every delay slept, for inspection

    @classmethod
    def retryable(cls, exc: BaseException) -> bool:
        status = getattr(exc, "status_code", None)
        if status is not None:
            return status in cls.RETRY_STATUS or status >= 500
        name = type(exc).__name__
        return name in ("APIConnectionError", "APITimeoutError") or isinstance(exc, (ConnectionError, TimeoutError))

    def delay(self, attempt: int, exc: BaseException) -> float:
        retry_after = None
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        if headers is not None:
            try:
                retry_after = float(headers.get("retry-after"))
            except (TypeError, ValueError):
                retry_after = None
        if retry_after is not None and retry_after >= 0:
            return min(self.max_backoff, retry_after)
        delay = min(self.max_backoff, self.base * 2 ** attempt)
        return delay * (0.5 + 0.5 * self._rng.random()) if self.jitter else delay

    def call(self, fn: Callable[[], Any]) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except Exception as exc:
                if attempt >= self.max_retries or not self.retryable(exc):
                    raise
                wait = self.delay(attempt, exc)
                log.warning("teacher request failed (%s); retry %d/%d in %.2fs", _describe(exc, self.secrets),
                            attempt + 1, self.max_retries, wait)
                self.delays.append(wait)
                self.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _describe(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """One redacted line for a stored ``error`` or a log message: type, HTTP status, first message line."""
    status = getattr(exc, "status_code", None)
    # Redact the whole text before cutting it, so that a key split by the cut cannot survive as a prefix.
    text = redact(str(exc), secrets)
    message = text.splitlines()[0][:300] if text else ""
    return f"{type(exc).__name__}" + (f" (HTTP {status})" if status is not None else "") + (
        f": {message}" if message else "")


def known_secrets(client=None, secrets: Sequence[str] = ()) -> tuple[str, ...]:
    """The secrets to redact: ``secrets``, the client's API key / auth token, key-like environment variables."""
    found = [s for s in secrets if isinstance(s, str) and s]
    found += [value for attr in ("api_key", "auth_token")
              if isinstance(value := getattr(client, attr, None), str) and value]
    found += secrets_from_environment()
    return tuple(dict.fromkeys(found))


def _redact_record(trajectory: dict, secrets: Sequence[str]) -> dict:
    """Redact the error texts of a trajectory in place: ``error`` and tool results built from exceptions."""
    if trajectory.get("error"):
        trajectory["error"] = redact(str(trajectory["error"]), secrets)
    for step in trajectory.get("steps", []):
        result = step.get("tool_result")
        if isinstance(result, str) and result.startswith("error:"):  # execute_tool's "error: {exc}"
            step["tool_result"] = redact(result, secrets)
    return trajectory


def tool_specs_from(tools: Mapping[str, Callable]) -> list[dict]:
    """Minimal Anthropic tool declarations (name, docstring, free-form object input) for plain callables."""
    return [{"name": name, "description": (fn.__doc__ or name).strip().splitlines()[0],
             "input_schema": {"type": "object"}} for name, fn in tools.items()]


class AnthropicTeacher:
    """The Messages API as a teacher: ``AnthropicTeacher(anthropic.Anthropic(), model="...")``.

    The client's own retries are switched off (``with_options(max_retries=0)``) so that
    :class:`RetryPolicy` alone decides; pass ``thinking={"type": "enabled", "budget_tokens": N}``
    to capture extended thinking as reasoning. ``secrets``: more strings to redact from errors, besides
    the client's key and the key-like environment variables (:func:`known_secrets`).
    """

    def __init__(self, client, model: str, *, tool_specs: Optional[Sequence[dict]] = None,
                 system: Optional[str] = None, max_tokens: int = 1024, thinking: Optional[dict] = None,
                 max_steps: int = 8, retry: Optional[RetryPolicy] = None, secrets: Sequence[str] = (),
                 **create_kw):
        self.client = client.with_options(max_retries=0) if hasattr(client, "with_options") else client
        self.model, self.tool_specs, self.system = model, tool_specs, system
        self.max_tokens, self.thinking, self.max_steps = max_tokens, thinking, max_steps
        self.secrets = known_secrets(client, secrets)
        self.retry = retry or RetryPolicy()
        self.retry.secrets = tuple(dict.fromkeys(self.retry.secrets + self.secrets))
        self.create_kw = create_kw

    @staticmethod
    def _block_param(block) -> Optional[dict]:
        kind = getattr(block, "type", None)
        if kind == "text":
            return {"type": "text", "text": block.text}
        if kind == "thinking":
            return {"type": "thinking", "thinking": block.thinking, "signature": getattr(block, "signature", "")}
        if kind == "redacted_thinking":
            return {"type": "redacted_thinking", "data": block.data}
        if kind == "tool_use":
            return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
        return None

    def run(self, query: str, tools: Mapping[str, Callable]) -> dict:
        specs = list(self.tool_specs) if self.tool_specs is not None else tool_specs_from(tools)
        messages: list[dict] = [{"role": "user", "content": query}]
        trajectory: dict[str, Any] = {"user": query, "steps": [], "answer": None}
        kwargs = dict(self.create_kw)
        if self.system is not None:
            kwargs["system"] = self.system
        if self.thinking is not None:
            kwargs["thinking"] = self.thinking
        try:
            for _ in range(self.max_steps):
                response = self.retry.call(lambda: self.client.messages.create(
                    model=self.model, max_tokens=self.max_tokens, messages=messages, tools=specs, **kwargs))
                reasoning, texts, uses = [], [], []
                for block in response.content:
                    if block.type == "thinking":
                        reasoning.append(block.thinking)
                    elif block.type == "text":
                        (texts if not uses else []).append(block.text)
                    elif block.type == "tool_use":
                        uses.append(block)
                messages.append({"role": "assistant", "content": [
                    p for p in map(self._block_param, response.content) if p is not None]})
                if response.stop_reason != "tool_use" or not uses:
                    if reasoning:  # thinking before the answer: a reasoning-only step
                        trajectory["steps"].append({"reasoning": "\n".join(reasoning)})
                    trajectory["answer"] = "\n".join(t for t in texts if t).strip()
                    trajectory["stop_reason"] = response.stop_reason
                    return trajectory
                results = []
                for k, use in enumerate(uses):
                    thought = "\n".join(x for x in reasoning + texts if x).strip() if k == 0 else ""
                    call = {"name": use.name, "arguments": dict(use.input or {})}
                    result = execute_tool(tools, call)
                    if result.startswith("error:"):  # built from an exception: redact before sending and storing
                        result = redact(result, self.secrets)
                    trajectory["steps"].append({"reasoning": thought, "tool_call": call, "tool_result": result})
                    results.append({"type": "tool_result", "tool_use_id": use.id, "content": result,
                                    "is_error": result.startswith("error:")})
                messages.append({"role": "user", "content": results})
            trajectory["error"] = f"no final answer within {self.max_steps} model turns"
        except Exception as exc:  # recorded, not fatal
            trajectory["error"] = _describe(exc, self.secrets)
        return trajectory


class LocalTeacher:
    """A local Hugging Face causal LM speaking the ReAct text protocol (batched greedy decoding)."""

    def __init__(self, model, tokenizer=None, *, max_steps: int = 8, batch_size: int = 64,
                 max_new_tokens: int = 96, fmt: ReActFormat = ReActFormat(), temperature: float = 0.0,
                 seed: Optional[int] = None, secrets: Sequence[str] = ()):
        self.secrets = known_secrets(None, secrets)
        if isinstance(model, LMPolicy):
            self.policy = model
            if temperature:
                raise ValueError("pass temperature to the LMPolicy itself")
        else:
            if tokenizer is None:
                raise ValueError("a local teacher needs its tokenizer")
            self.policy = LMPolicy(model, tokenizer, name="teacher", fmt=fmt, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.max_steps, self.fmt = max_steps, fmt

    def run_batch(self, queries: Sequence[str], tools: Mapping[str, Callable], progress=None) -> list[dict]:
        cascade = Cascade([self.policy], [], tools, max_steps=self.max_steps, fmt=self.fmt)
        try:
            episodes = cascade.run(queries, progress=progress)
        except Exception as exc:  # e.g. out of memory on a huge batch: fall back to one at a time
            if len(queries) == 1:
                return [{"user": queries[0], "steps": [], "answer": None, "error": _describe(exc, self.secrets)}]
            return [t for q in queries for t in self.run_batch([q], tools)]
        return [_redact_record(e.to_trajectory(), self.secrets) for e in episodes]


TeacherLike = Union[AnthropicTeacher, LocalTeacher, LMPolicy, Any]


def collect_teacher_trajectories(
    queries: Sequence[str], teacher: TeacherLike, tools: Mapping[str, Callable], *,
    tokenizer=None, model: Optional[str] = None, tool_specs: Optional[Sequence[dict]] = None,
    system: Optional[str] = None, max_steps: int = 8, max_tokens: int = 1024, thinking: Optional[dict] = None,
    max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0, batch_size: int = 64,
    temperature: float = 0.0, seed: Optional[int] = None,
    out_path: Union[str, Path, None] = None, progress: bool = True,
    sleep: Callable[[float], None] = time.sleep, secrets: Sequence[str] = (),
) -> list[dict]:
    """Run ``teacher`` on every query with ``tools`` (``name -> fn(**arguments)``) and return trajectories.

    ``teacher`` is one of:

    - an ``anthropic.Anthropic`` client (anything with ``.messages.create``): pass ``model=`` (the model
      name) and ``tool_specs=`` (Anthropic tool declarations with JSON schemas; default: a minimal
      declaration per tool); ``system``, ``max_tokens`` and ``thinking`` go to ``messages.create``;
    - a Hugging Face causal LM with ``tokenizer=`` (or an :class:`distillkit.agents.agent.LMPolicy`), speaking
      the ReAct text protocol of :mod:`distillkit.agents.agent`; queries run ``batch_size`` at a time,
      greedy (``temperature=0``) or sampled (``temperature > 0``, ``seed`` for reproducibility);
    - a prepared :class:`AnthropicTeacher` or :class:`LocalTeacher`.

    Retries (``max_retries``, ``backoff`` base seconds doubling per attempt, capped at ``max_backoff``)
    apply to the API backend. A failed query is kept in the output with ``answer: None`` and ``error``.
    Error texts are redacted (the client's key, key-like environment variables, ``secrets``, key-shaped
    tokens) before they are stored or logged.
    """
    from tqdm.auto import tqdm

    if isinstance(teacher, (AnthropicTeacher, LocalTeacher)):
        backend = teacher
    elif hasattr(teacher, "messages") and hasattr(teacher.messages, "create"):
        if not model:
            raise ValueError("the Anthropic backend needs model=<model name>")
        backend = AnthropicTeacher(teacher, model, tool_specs=tool_specs, system=system, max_tokens=max_tokens,
                                   thinking=thinking, max_steps=max_steps, secrets=secrets,
                                   retry=RetryPolicy(max_retries, backoff, max_backoff, sleep=sleep))
    else:
        backend = LocalTeacher(teacher, tokenizer, max_steps=max_steps, batch_size=batch_size,
                               temperature=temperature, seed=seed, secrets=secrets)
    all_secrets = tuple(dict.fromkeys((*secrets, *backend.secrets)))

    out: list[dict] = []
    bar = tqdm(total=len(queries), desc="collect", unit="query", disable=not progress, leave=False)
    try:
        if isinstance(backend, LocalTeacher):
            for start in range(0, len(queries), batch_size):
                chunk = list(queries[start:start + batch_size])
                out += backend.run_batch(chunk, tools)
                bar.update(len(chunk))
        else:
            for query in queries:
                out.append(backend.run(query, tools))
                bar.update(1)
    finally:
        bar.close()
    failed = 0
    for number, trajectory in enumerate(out, 1):
        _redact_record(trajectory, all_secrets)  # again: a prepared backend may not know `secrets`
        if trajectory.get("error"):
            failed += 1
            log.warning("query %d of %d failed: %s", number, len(out), trajectory["error"])
    if failed:
        log.warning("%d of %d queries failed (kept with their error)", failed, len(out))
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for trajectory in out:
                fh.write(json.dumps(trajectory, ensure_ascii=False) + "\n")
    return out
