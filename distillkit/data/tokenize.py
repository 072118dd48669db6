"""Render a trajectory as text pieces that each carry a span id, then tokenize once.

The text is built as a list of (text, span id) pieces, so every character has a span. One call of
a Hugging Face *fast* tokenizer with `return_offsets_mapping=True` then gives every token the span
of the characters it covers (docs/DATA.md states the rules):

- a token takes the span of its first non-whitespace character (whitespace is glue between
  pieces), of its first character if it is all whitespace, and of the previous token if it
  covers no characters at all;
- labels follow the Hugging Face convention: aligned with input_ids (the model shifts), equal
  to the token id on REASON, ACTION and ANSWER tokens and ignore_index (-100) elsewhere.
  span_ids are aligned the same way: span_ids[i] is the span of token i, i.e. of labels[i];
- labels come from spans only, never from comparing ids with pad_token_id, so an EOS that is
  also the pad token stays a target.
"""

from __future__ import annotations

import json
import logging
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Literal, Optional

from ..core.spans import PAD_SPAN, Span
from .limits import find_surrogate, has_surrogate
from .trajectory import Trajectory, TrajectoryError

logger = logging.getLogger("distillkit.data")

IGNORE_INDEX = -100
TRAINED_SPANS = frozenset({Span.REASON, Span.ACTION, Span.ANSWER})
TRUNCATION_MODES = ("drop_partial_span", "error")


class RenderError(ValueError):
    """The chat template's output cannot be mapped back onto the trajectory's pieces."""


class TruncationError(ValueError):
    """max_length cuts through a span and truncation="error" was asked for."""


@dataclass(frozen=True)
class RenderedTrajectory:
    """The rendered text as consecutive (text, span id) pieces; their concatenation is `text`."""

    pieces: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)

    def starts(self) -> list[int]:
        """Character offset where each piece begins."""
        out, at = [], 0
        for text, _ in self.pieces:
            out.append(at)
            at += len(text)
        return out


def _call_text(name: str, arguments: dict) -> str:
    return f"{name} {json.dumps(arguments, ensure_ascii=False)}"


# ----------------------------------------------------------------------------- plain rendering

def render_plain(trajectory: Trajectory, *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None) -> RenderedTrajectory:
    """The rendering used without a chat template (readable back by the ReAct parser):

        {bos}System: …\\n Tools: [json]\\n User: …\\n        PROMPT
        Thought: …\\n                                        REASON
        Action: name {json arguments}\\n                     ACTION
        Observation: …\\n                                    OBSERVATION
        Final Answer: …{eos}                                 ANSWER (eos only after an answer)
    """
    pieces: list[tuple[str, int]] = []
    prompt = bos_token or ""
    if trajectory.system is not None:
        prompt += f"System: {trajectory.system}\n"
    if trajectory.tools:
        prompt += f"Tools: {json.dumps(trajectory.tools, ensure_ascii=False)}\n"
    pieces.append((prompt + f"User: {trajectory.user}\n", Span.PROMPT))
    for step in trajectory.steps:
        if step.reasoning is not None:
            pieces.append((f"Thought: {step.reasoning}\n", Span.REASON))
        if step.tool_call is not None:
            pieces.append((f"Action: {_call_text(step.tool_call.name, step.tool_call.arguments)}\n", Span.ACTION))
        if step.tool_result is not None:
            pieces.append((f"Observation: {step.tool_result}\n", Span.OBSERVATION))
    if trajectory.answer is not None:
        pieces.append((f"Final Answer: {trajectory.answer}{eos_token or ''}", Span.ANSWER))
    return RenderedTrajectory(tuple(pieces))


# ----------------------------------------------------------------------------- chat-template rendering

@dataclass
class _Turn:
    """One chat message and the pieces it carries (in the order the template writes them)."""

    message: dict[str, Any]
    parts: list[tuple[int, str]] = field(default_factory=list)  # (span, text) of content pieces
    calls: list[str] = field(default_factory=list)  # tool names, in order


def to_chat_messages(trajectory: Trajectory) -> tuple[list[dict[str, Any]], list[_Turn]]:
    """OpenAI-format messages for apply_chat_template (tool-call arguments as dicts, as HF expects).

    Consecutive reasoning / tool calls without a result in between share one assistant message;
    text after a tool call opens a new one, since the OpenAI format writes content before calls.
    """
    turns: list[_Turn] = []
    if trajectory.system is not None:
        turns.append(_Turn({"role": "system", "content": trajectory.system}, [(Span.PROMPT, trajectory.system)]))
    turns.append(_Turn({"role": "user", "content": trajectory.user}, [(Span.PROMPT, trajectory.user)]))
    open_turn: Optional[_Turn] = None

    def assistant_for_text() -> _Turn:
        nonlocal open_turn
        if open_turn is None or open_turn.calls:
            open_turn = _Turn({"role": "assistant", "content": ""})
            turns.append(open_turn)
        return open_turn

    for index, step in enumerate(trajectory.steps):
        if step.reasoning is not None:
            assistant_for_text().parts.append((Span.REASON, step.reasoning))
        if step.tool_call is not None:
            turn = open_turn if open_turn is not None else assistant_for_text()
            turn.message.setdefault("tool_calls", []).append(
                {"id": f"call_{index}", "type": "function",
                 "function": {"name": step.tool_call.name, "arguments": step.tool_call.arguments}})
            turn.calls.append(step.tool_call.name)
        if step.tool_result is not None:
            open_turn = None
            turns.append(_Turn({"role": "tool", "tool_call_id": f"call_{index}", "name": step.tool_call.name,
                                "content": step.tool_result}, [(Span.OBSERVATION, step.tool_result)]))
    if trajectory.answer is not None:
        assistant_for_text().parts.append((Span.ANSWER, trajectory.answer))
    for turn in turns:
        if turn.message["role"] == "assistant":
            turn.message["content"] = "\n\n".join(text for _, text in turn.parts)
    return [turn.message for turn in turns], turns


def _apply_template(tokenizer, messages, tools) -> str:
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": False}
    if tools:
        kwargs["tools"] = tools
    text = tokenizer.apply_chat_template(messages, **kwargs)
    if not isinstance(text, str):
        raise RenderError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _turn_bounds(tokenizer, messages, tools, full: str) -> list[int]:
    """Character offset where each message's turn begins in `full` (plus len(full)).

    A turn begins where the rendering of the messages before it ends. Templates that rewrite the
    end of a shorter conversation (e.g. closing a group of tool results) are handled by taking the
    longest common prefix with the full rendering.
    """
    bounds = [0]
    for k in range(1, len(messages)):
        try:
            prefix = _apply_template(tokenizer, messages[:k], tools)
        except RenderError:
            raise
        except Exception as exc:  # templates raise arbitrary jinja / TemplateError exceptions
            raise RenderError(f"the chat template cannot render the first {k} messages ({exc}); "
                              "use use_chat_template=False for the plain rendering") from exc
        end = len(prefix) if full.startswith(prefix) else len(os.path.commonprefix([prefix, full]))
        bounds.append(max(end, bounds[-1]))
    bounds.append(len(full))
    return bounds


def _find(full: str, needle: str, start: int, end: int, what: str) -> int:
    """Offset of needle in full[start:end]. Not finding it means the template rewrote or moved the
    text (or renders a shorter conversation differently, so turn bounds are wrong): refuse rather
    than label the wrong characters."""
    found = full.find(needle, start, end)
    if found < 0:
        raise RenderError(f"cannot find {what} {needle[:60]!r} in its turn of the chat template output; "
                          "the template rewrites or moves it, or renders a conversation's last message "
                          "differently: use use_chat_template=False for the plain rendering")
    return found


def _assistant_pieces(full: str, start: int, end: int, turn: _Turn) -> list[tuple[int, int, int]]:
    """(start, end, span) of an assistant turn: markup before a text piece joins that piece, the
    rest of the turn after the last text (tool-call markup, end of turn) is ACTION if the turn
    makes calls, else it joins the last text piece (so the final end-of-turn token is ANSWER)."""
    out: list[tuple[int, int, int]] = []
    cursor = start
    for span, text in turn.parts:
        needle = text.strip()  # templates often trim content
        if not needle:
            continue
        found = _find(full, needle, cursor, end, f"the {Span(span).name} text")
        out.append((out[-1][1] if out else start, found + len(needle), span))
        cursor = found + len(needle)
    if turn.calls:
        for name in turn.calls:  # the calls must lie in this turn, after its text
            cursor = _find(full, name, cursor, end, "the tool name") + len(name)
        out.append((out[-1][1] if out else start, end, Span.ACTION))
    elif out:
        out[-1] = (out[-1][0], end, out[-1][2])
    else:  # an empty assistant message: nothing trainable in it
        out.append((start, end, Span.PROMPT))
    return out


def render_chat(trajectory: Trajectory, tokenizer) -> RenderedTrajectory:
    """Render through tokenizer.apply_chat_template; system/user turns are PROMPT (markup included),
    tool turns OBSERVATION, assistant turns as in _assistant_pieces."""
    messages, turns = to_chat_messages(trajectory)
    full = _apply_template(tokenizer, messages, trajectory.tools)
    bounds = _turn_bounds(tokenizer, messages, trajectory.tools, full)
    ranges: list[tuple[int, int, int]] = []
    for k, turn in enumerate(turns):
        start, end = bounds[k], bounds[k + 1]
        if turn.message["role"] == "assistant":
            ranges.extend(_assistant_pieces(full, start, end, turn))
        else:
            if turn.message["role"] == "tool" and turn.parts[0][1].strip():
                _find(full, turn.parts[0][1].strip(), start, end, "the tool result")
            ranges.append((start, end, turn.parts[0][0]))
    return RenderedTrajectory(tuple((full[s:e], span) for s, e, span in ranges if e > s))


def render_trajectory(trajectory: Trajectory, tokenizer=None, *, use_chat_template: Optional[bool] = None,
                      add_bos: Optional[bool] = None, add_eos: bool = True) -> RenderedTrajectory:
    """Chat-template rendering when the tokenizer has a chat_template (or use_chat_template=True),
    else the plain one. add_bos / add_eos only apply to the plain rendering (a template writes its
    own markup); add_bos=None prepends bos_token when the tokenizer would add it by itself."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_template
    if use_chat_template:
        if not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        return render_chat(trajectory, tokenizer)
    if add_bos is None:
        add_bos = tokenizer is not None and _adds_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token", None) if add_bos else None
    eos = getattr(tokenizer, "eos_token", None) if add_eos else None
    return render_plain(trajectory, bos_token=bos, eos_token=eos)


def _adds_bos(tokenizer) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos_id and \
        len(with_special) > len(tokenizer("a", add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- tokenization

@dataclass
class TokenizeStats:
    """Counts of the last `tokenize_all` call (reset at its start; direct calls of the tokenizer add to it)."""

    examples: int = 0
    truncated: int = 0  # examples longer than max_length
    dropped_partial_spans: int = 0  # truncated examples whose trailing cut span was dropped
    empty: int = 0  # examples with no trainable token (see empty_ids)
    empty_ids: list[str] = field(default_factory=list)


def token_pieces(text: str, offsets: list[tuple[int, int]], starts: list[int]) -> list[int]:
    """Index of the piece each token belongs to (rules in the module docstring)."""
    out: list[int] = []
    previous = 0
    for begin, end in offsets:
        if end <= begin:  # special tokens added by the tokenizer cover no characters
            out.append(previous)
            continue
        at = begin
        while at < end and text[at].isspace():
            at += 1
        previous = max(bisect_right(starts, begin if at == end else at) - 1, 0)
        out.append(previous)
    return out


class TrajectoryTokenizer:
    """Trajectory -> {"input_ids", "labels", "span_ids", "attention_mask"} (lists of ints).

    max_length truncates on the right. truncation="drop_partial_span" keeps the tokens of a span
    that the cut splits as context but sets their labels to ignore_index and span ids to PAD_SPAN;
    truncation="error" raises TruncationError instead. `stats` counts truncated and empty examples of
    the last tokenize_all call (it starts afresh at each); an example with no trainable token is logged
    as a warning (and dropped by tokenize_all). A trajectory whose text holds a lone surrogate (possible
    when built in memory: load_trajectories rejects such lines) is a TrajectoryError naming the trajectory
    and the field; every error of tokenize_all names the trajectory's id and index.
    """

    def __init__(self, tokenizer, *, max_length: Optional[int] = None,
                 truncation: Literal["drop_partial_span", "error"] = "drop_partial_span",
                 use_chat_template: Optional[bool] = None, label_spans: Collection[int] = TRAINED_SPANS,
                 ignore_index: int = IGNORE_INDEX, add_bos: Optional[bool] = None, add_eos: bool = True):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("TrajectoryTokenizer needs a Hugging Face fast tokenizer (for offset mappings)")
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation
        self.use_chat_template = use_chat_template
        self.label_spans = frozenset(int(s) for s in label_spans)
        self.ignore_index = ignore_index
        self.add_bos = _adds_bos(tokenizer) if add_bos is None else add_bos
        self.add_eos = add_eos
        self.stats = TokenizeStats()

    def render(self, trajectory: Trajectory) -> RenderedTrajectory:
        return render_trajectory(trajectory, self.tokenizer, use_chat_template=self.use_chat_template,
                                 add_bos=self.add_bos, add_eos=self.add_eos)

    def __call__(self, trajectory: Trajectory) -> dict[str, list[int]]:
        return self._encode(trajectory, None)

    def _encode(self, trajectory: Trajectory, index: Optional[int]) -> dict[str, list[int]]:
        name = trajectory.id if trajectory.id is not None else f"#{self.stats.examples}"  # for stats.empty_ids
        label = _label(trajectory, index, self.stats.examples)  # for errors
        try:
            rendered = self.render(trajectory)
        except RenderError as exc:
            raise RenderError(f"trajectory {label}: {exc}") from exc
        text = rendered.text
        if has_surrogate(text):  # the tokenizer would fail on it with a TypeError naming nothing
            _raise_surrogate(trajectory, label)
        # Markup and BOS/EOS are already in the text, so the tokenizer must not add its own.
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(encoding["input_ids"])
        piece_of = token_pieces(text, encoding["offset_mapping"], rendered.starts())
        self.stats.examples += 1

        dropped_piece = None
        truncated = self.max_length is not None and len(input_ids) > self.max_length
        if truncated:
            self.stats.truncated += 1
            cut = self.max_length
            if piece_of[cut - 1] == piece_of[cut]:  # the cut splits this piece
                dropped_piece = piece_of[cut - 1]
                span = Span(rendered.pieces[dropped_piece][1]).name
                if self.truncation == "error":
                    raise TruncationError(f"trajectory {label}: max_length={cut} cuts a {span} span "
                                          f"({len(input_ids)} tokens in all)")
                self.stats.dropped_partial_spans += 1
            input_ids, piece_of = input_ids[:cut], piece_of[:cut]

        span_ids = [PAD_SPAN if p == dropped_piece else int(rendered.pieces[p][1]) for p in piece_of]
        labels = [t if s in self.label_spans else self.ignore_index for t, s in zip(input_ids, span_ids)]
        if all(label == self.ignore_index for label in labels):
            self.stats.empty += 1
            self.stats.empty_ids.append(name)
            logger.warning("trajectory %s has no trainable token (%d tokens%s)", name, len(input_ids),
                           f", truncated to max_length={self.max_length}" if truncated else "")
        return {"input_ids": input_ids, "labels": labels, "span_ids": span_ids,
                "attention_mask": [1] * len(input_ids)}

    def tokenize_all(self, trajectories: Iterable[Trajectory], *, drop_empty: bool = True) -> list[dict]:
        """Tokenize many; examples without a trainable token are left out unless drop_empty=False.

        `stats` is reset first, so afterwards it describes this call only. An error names the
        trajectory by id and index: in the message of TrajectoryError, RenderError and TruncationError,
        in a note (shown with the traceback) of any other exception.
        """
        self.stats = TokenizeStats()
        out = []
        for index, trajectory in enumerate(trajectories):
            try:
                example = self._encode(trajectory, index)
            except (TrajectoryError, RenderError, TruncationError):
                raise
            except Exception as exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11
                    exc.add_note(f"while tokenizing trajectory {_label(trajectory, index, index)}")
                raise
            if drop_empty and all(label == self.ignore_index for label in example["labels"]):
                continue
            out.append(example)
        return out


def _label(trajectory: Trajectory, index: Optional[int], number: int) -> str:
    """How errors name a trajectory: "'t1' (index 3)" in tokenize_all, "'t1'" in a direct call, and
    "#3" without an id (its index, or in a direct call the number of examples tokenized before it)."""
    trajectory_id = getattr(trajectory, "id", None)
    if trajectory_id is None:
        return f"#{index if index is not None else number}"
    return f"{trajectory_id!r} (index {index})" if index is not None else repr(trajectory_id)


def _raise_surrogate(trajectory: Trajectory, label: str):
    """The TrajectoryError for a trajectory whose rendered text holds a surrogate, naming its field."""
    found = find_surrogate(trajectory.to_dict())
    if found is None:  # not in the trajectory: in the tokenizer's bos/eos tokens or the chat template
        raise TrajectoryError("the rendered text holds a lone surrogate (not from the trajectory's fields), "
                              "which cannot be encoded as UTF-8", trajectory=label)
    raise TrajectoryError(found.reason, field=found.path or None, trajectory=label)


def tokenize_trajectory(trajectory: Trajectory, tokenizer, **options) -> dict[str, list[int]]:
    """One-off form of TrajectoryTokenizer(tokenizer, **options)(trajectory)."""
    return TrajectoryTokenizer(tokenizer, **options)(trajectory)
