"""The line-based ReAct text protocol the agents speak, and its tokenization.

::

    Q: How much do 3 kiwis cost?            <- prompt (the user's question)
    T: Look up the kiwi price.              <- reasoning
    A: lookup {"key": "kiwi.price"}         <- action: tool name, then JSON arguments
    O: 6                                    <- observation (tool result, written by the loop)
    T: Now calculate 3*6.
    A: calc {"expr": "3*6"}
    O: 18
    F: 18                                   <- final answer

A model proposes one step at a time (reasoning lines, then one action or answer
line); :meth:`ReActFormat.parse_step` reads it back (``json.loads`` for the arguments).
Each line is tokenized on its own, so the span of every token is exact.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

from ..core.spans import Span

__all__ = ["ReActFormat", "ParsedStep", "encode_trajectory", "encode_text", "decode_ids"]


@dataclasses.dataclass
class ParsedStep:
    reasoning: str = ""
    tool_call: Optional[dict] = None  # {"name": str, "arguments": dict}
    answer: Optional[str] = None
    error: Optional[str] = None  # why the text is not a valid step


@dataclasses.dataclass(frozen=True)
class ReActFormat:
    """Line prefixes of the protocol; every line ends with a newline."""

    prompt: str = "Q: "
    reason: str = "T: "
    action: str = "A: "
    observation: str = "O: "
    answer: str = "F: "

    def render_action(self, name: str, arguments: Mapping[str, Any]) -> str:
        return f"{self.action}{name} {json.dumps(dict(arguments), separators=(',', ':'))}\n"

    def _lines(self, prefix: str, text: str) -> list[str]:
        return [f"{prefix}{line}\n" for line in str(text).split("\n")]

    def segments(self, trajectory: Mapping[str, Any]) -> list[tuple[Span, str]]:
        """A trajectory (native schema) as ``(span, text)`` segments, one per line."""
        out = [(Span.PROMPT, line) for line in self._lines(self.prompt, trajectory["user"])]
        for step in trajectory.get("steps", ()):
            if step.get("reasoning"):
                out += [(Span.REASON, line) for line in self._lines(self.reason, step["reasoning"])]
            call = step.get("tool_call")
            if call is not None:
                out.append((Span.ACTION, self.render_action(call["name"], call.get("arguments", {}))))
                if step.get("tool_result") is not None:
                    out += [(Span.OBSERVATION, line)
                            for line in self._lines(self.observation, step["tool_result"])]
        if trajectory.get("answer") is not None:
            out += [(Span.ANSWER, line) for line in self._lines(self.answer, trajectory["answer"])]
        return out

    def is_final_line(self, line: str) -> bool:
        return line.startswith(self.action.rstrip()) or line.startswith(self.answer.rstrip())

    def parse_step(self, text: str) -> ParsedStep:
        """Parse generated text: reasoning lines, then one action line or one answer line."""
        reasoning: list[str] = []
        for line in text.split("\n"):
            if line.startswith(self.reason.rstrip()):
                reasoning.append(line[len(self.reason.rstrip()):].strip())
            elif line.startswith(self.action.rstrip()):
                body = line[len(self.action.rstrip()):].strip()
                name, _, raw_args = body.partition(" ")
                if not name:
                    return ParsedStep("\n".join(reasoning), error="action without a tool name")
                try:
                    arguments = json.loads(raw_args) if raw_args.strip() else {}
                except json.JSONDecodeError as exc:
                    return ParsedStep("\n".join(reasoning), error=f"arguments are not JSON: {exc.msg}")
                if not isinstance(arguments, dict):
                    return ParsedStep("\n".join(reasoning), error="arguments are not a JSON object")
                return ParsedStep("\n".join(reasoning), tool_call={"name": name, "arguments": arguments})
            elif line.startswith(self.answer.rstrip()):
                return ParsedStep("\n".join(reasoning), answer=line[len(self.answer.rstrip()):].strip())
            elif line.strip():
                return ParsedStep("\n".join(reasoning), error=f"unexpected line {line[:40]!r}")
        return ParsedStep("\n".join(reasoning), error="no action or answer line")


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, no special tokens: ``tokenizers.Tokenizer`` or a Hugging Face tokenizer."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    """The text of ``ids``, special tokens and spacing kept as generated."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.decode(list(ids), skip_special_tokens=False)
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def encode_trajectory(tokenizer, trajectory: Mapping[str, Any], fmt: ReActFormat = ReActFormat(),
                      bos_id: Optional[int] = None) -> tuple[list[int], list[int]]:
    """Token ids and span ids of a trajectory: each line is tokenized on its own, so spans are exact."""
    ids: list[int] = [] if bos_id is None else [bos_id]
    spans: list[int] = [] if bos_id is None else [int(Span.PROMPT)]
    for span, text in fmt.segments(trajectory):
        piece = encode_text(tokenizer, text)
        ids += piece
        spans += [int(span)] * len(piece)
    return ids, spans
