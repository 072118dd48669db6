"""Environments for agent rollouts: the protocol the agent loop talks to, the tool environment, on-policy rollouts.

An environment holds one episode's state. The loop asks it for the task's first observation, then
hands it every step the agent proposes and gets the next observation back::

    class Environment(Protocol):
        def reset(self, task) -> str: ...                          # the question the agent sees
        def step(self, action: ParsedStep) -> tuple[str, bool]: ...  # (observation, done)

``action`` is the agent's parsed step: a tool call (``action.tool_call = {"name", "arguments"}``) or a
final answer (``action.answer``). A step the agent wrote that does not parse ends the episode in the
loop itself and never reaches the environment. :class:`ToolEnvironment` is the environment of a
dictionary of Python tools (the demo's); a user's environment plugs in the same way::

    class Shell:                                   # one instance per episode
        def reset(self, task):
            self.sandbox = make_sandbox(task)
            return task.question
        def step(self, action):
            if action.answer is not None:
                return "", True                    # the loop records the answer
            return self.sandbox.run(action.tool_call), False

    episodes = rollout(LMPolicy(student, tokenizer, temperature=1.0, seed=0), tasks, Shell)

(:func:`distillkit.agents.rollout.rollout`.) Observations become ``O:`` lines of the context: span
"observation", which no span table trains on. :func:`encode_episode` turns an episode (the agent's own
steps, unparseable ones included, and the observations) into token and span ids for a training batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

from ..core.spans import Span
from .protocol import ParsedStep, ReActFormat, encode_text

__all__ = ["Environment", "ToolEnvironment", "execute_tool", "encode_episode", "line_span"]


@runtime_checkable
class Environment(Protocol):
    def reset(self, task: Any) -> str:
        """Start an episode of ``task``; returns the question the agent sees (its prompt)."""

    def step(self, action: ParsedStep) -> tuple[str, bool]:
        """Answer the agent's tool call or final answer: (observation, done)."""


def execute_tool(tools: Mapping[str, Callable[..., Any]], call: Mapping[str, Any]) -> str:
    """Run one tool call; any exception becomes an ``error: ...`` observation for the agent."""
    fn = tools.get(call.get("name"))
    if fn is None:
        return f"error: unknown tool {call.get('name')!r}"
    try:
        return str(fn(**call.get("arguments", {})))
    except Exception as exc:  # the agent sees the error and may recover
        return f"error: {exc}"


class ToolEnvironment:
    """Python functions as tools: ``step`` runs the called tool (errors become observations); an answer ends
    the episode. ``reset`` takes a question string or an object with a ``question`` attribute."""

    def __init__(self, tools: Mapping[str, Callable[..., Any]]):
        self.tools = tools

    def reset(self, task: Any) -> str:
        return task if isinstance(task, str) else str(task.question)

    def step(self, action: ParsedStep) -> tuple[str, bool]:
        if action.answer is not None:
            return "", True
        if action.tool_call is None:
            raise ValueError("a step with neither a tool call nor an answer reached the environment")
        return execute_tool(self.tools, action.tool_call), False


def line_span(line: str, fmt: ReActFormat) -> Span:
    """The span of one context line, from its prefix; a line the agent wrote without a known prefix is
    reasoning (it is the agent's text, and the teacher grades it like any other)."""
    for prefix, span in ((fmt.prompt, Span.PROMPT), (fmt.observation, Span.OBSERVATION), (fmt.action, Span.ACTION),
                         (fmt.answer, Span.ANSWER), (fmt.reason, Span.REASON)):
        if line.startswith(prefix.rstrip()):
            return span
    return Span.REASON


def encode_episode(tokenizer, episode, fmt: ReActFormat = ReActFormat(),
                   bos_id: Optional[int] = None) -> tuple[list[int], list[int]]:
    """Token ids and span ids of an episode's lines (the context the agent saw, plus its last step), each line
    tokenized on its own as the policy and :func:`encode_trajectory` do."""
    ids: list[int] = [] if bos_id is None else [bos_id]
    spans: list[int] = [] if bos_id is None else [int(Span.PROMPT)]
    for line in episode.lines:
        piece = encode_text(tokenizer, line)
        ids += piece
        spans += [int(line_span(line, fmt))] * len(piece)
    return ids, spans
