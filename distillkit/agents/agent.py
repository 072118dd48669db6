"""Run language-model agents in a tool loop, with escalation to larger models when unsure.

The agents speak a line-based ReAct text protocol (:class:`ReActFormat`)::

    Q: How much do 3 kiwis cost?            <- prompt (the user's question)
    T: Look up the kiwi price.              <- reasoning
    A: lookup {"key": "kiwi.price"}         <- action: tool name, then JSON arguments
    O: 6                                    <- observation (tool result, written by the loop)
    T: Now calculate 3*6.
    A: calc {"expr": "3*6"}
    O: 18
    F: 18                                   <- final answer

A model proposes one step at a time (reasoning lines, then one action or answer
line); the loop parses it (``json.loads`` for the arguments), executes the tool
and appends the observation.

Confidence of a step: the probability the model gives to the action (or answer)
line it produced (greedily, unless the policy samples), i.e. the product of the token
probabilities of that line (a sequence probability in [0, 1]); 0 for a step with no
action or answer line.

- :class:`Cascade` runs any number of tiers (small to large): a tier's step is
  accepted when its confidence is at least that tier's threshold, otherwise the
  same step is re-proposed by the next tier; the last tier is always accepted.
- :class:`StudentAgent` is the two-tier case: a student with an optional teacher
  fallback.

Both accept Hugging Face causal LMs with a ``tokenizers.Tokenizer`` or a Hugging
Face tokenizer, run many queries as one batch (greedy decoding with a KV cache),
and memoize proposals per exact context, so sweeping thresholds is cheap.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..core.spans import Span

__all__ = ["ReActFormat", "ParsedStep", "Proposal", "LMPolicy", "StepRecord", "Episode", "Cascade",
           "StudentAgent", "encode_trajectory", "execute_tool"]


# --------------------------------------------------------------------------------------------
# The text protocol

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


def _encode(tokenizer, text: str) -> list[int]:
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def _kv_cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in newer transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _kv_cache_of(output):
    """The KV cache of a causal-LM output, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _decode(tokenizer, ids: Sequence[int]) -> str:
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
        piece = _encode(tokenizer, text)
        ids += piece
        spans += [int(span)] * len(piece)
    return ids, spans


def execute_tool(tools: Mapping[str, Callable[..., Any]], call: Mapping[str, Any]) -> str:
    """Run one tool call; any exception becomes an ``error: ...`` observation for the agent."""
    fn = tools.get(call.get("name"))
    if fn is None:
        return f"error: unknown tool {call.get('name')!r}"
    try:
        return str(fn(**call.get("arguments", {})))
    except Exception as exc:  # the agent sees the error and may recover
        return f"error: {exc}"


# --------------------------------------------------------------------------------------------
# A model that proposes steps

@dataclasses.dataclass
class Proposal:
    text: str  # the generated step (reasoning lines + action/answer line)
    confidence: float  # P(action or answer line) under the model; 0.0 when there is none
    num_tokens: int


class LMPolicy:
    """A causal LM + tokenizer that proposes ReAct steps, batched and memoized.

    ``model`` is any Hugging Face causal LM (``model(input_ids, attention_mask, position_ids,
    past_key_values, use_cache)``); it is put in eval mode. Contexts are lists of text lines; each
    line is tokenized on its own (as :func:`encode_trajectory` does for training). Decoding is greedy
    (``temperature=0``) or sampled; a step ends with its action/answer line, after ``max_lines``
    lines, at an EOS token or after ``max_new_tokens``.
    """

    def __init__(self, model, tokenizer, *, name: Optional[str] = None, fmt: ReActFormat = ReActFormat(),
                 max_new_tokens: int = 64, max_lines: int = 4, batch_size: int = 64,
                 bos_id: Optional[int] = None, memoize: bool = True, temperature: float = 0.0,
                 seed: Optional[int] = None):
        self.model, self.tokenizer, self.fmt = model, tokenizer, fmt
        # temperature 0: greedy (deterministic, memoized); > 0: sampling (never memoized)
        self.temperature = float(temperature)
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.name = name or type(model).__name__
        self.max_new_tokens, self.max_lines, self.batch_size = max_new_tokens, max_lines, batch_size
        self.bos_id, self.memoize = bos_id, memoize
        self.cache: dict[tuple[int, ...], Proposal] = {}
        self.generated_tokens = 0  # tokens generated (cache misses only), for cost accounting
        self.calls = 0  # proposals requested (cache hits included)
        self._newline_ids: Optional[set[int]] = None
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        self._eos_ids = set(eos) if isinstance(eos, (list, tuple, set)) else ({eos} if eos is not None else set())
        model.eval()  # inference only (no dropout)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def encode_lines(self, lines: Sequence[str]) -> list[int]:
        ids = [] if self.bos_id is None else [self.bos_id]
        for line in lines:
            ids += _encode(self.tokenizer, line)
        return ids

    def _newlines(self) -> set[int]:
        if self._newline_ids is None:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._newline_ids = {i for i in range(vocab) if "\n" in _decode(self.tokenizer, [i])}
        return self._newline_ids

    def propose(self, contexts: Sequence[Sequence[str]]) -> list[Proposal]:
        """One proposed step per context; greedy proposals are memoized on the exact token ids."""
        keys = [tuple(self.encode_lines(c)) for c in contexts]
        self.calls += len(keys)
        memoize = self.memoize and self.temperature == 0
        todo = sorted({k for k in keys if k not in self.cache}, key=len) if memoize else keys
        fresh: list[Proposal] = []
        for start in range(0, len(todo), self.batch_size):
            fresh += self._generate([list(k) for k in todo[start:start + self.batch_size]])
        if memoize:
            self.cache.update(zip(todo, fresh))
            return [self.cache[k] for k in keys]
        return fresh

    @torch.no_grad()
    def _generate(self, batch: list[list[int]]) -> list[Proposal]:
        model = self.model
        device = next(model.parameters()).device
        newline_ids = self._newlines()
        size, width = len(batch), max(len(ids) for ids in batch)
        input_ids = torch.zeros(size, width, dtype=torch.long)
        mask = torch.zeros(size, width, dtype=torch.long)
        for row, ids in enumerate(batch):  # left padding
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        past, logits = _kv_cache_of(out), out.logits[:, -1]
        cache_kwarg = _kv_cache_kwarg(model)
        next_pos = positions[:, -1] + 1
        generated: list[list[int]] = [[] for _ in range(size)]
        probs_out: list[list[float]] = [[] for _ in range(size)]
        line_start = [0] * size  # index in generated[row] where the current line starts
        final_start: list[Optional[int]] = [None] * size
        lines_done = [0] * size
        done = [False] * size
        for _ in range(self.max_new_tokens):
            probs = torch.softmax(logits.float(), dim=-1)
            if self.temperature > 0:
                sample_probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
                chosen = torch.multinomial(sample_probs, 1, generator=self._generator).to(probs.device)
                top_p, top_id = probs.gather(-1, chosen).squeeze(-1), chosen.squeeze(-1)
            else:
                top_p, top_id = probs.max(dim=-1)
            top_p, top_id = top_p.tolist(), top_id.tolist()
            for row in range(size):
                if done[row]:
                    continue
                token = top_id[row]
                generated[row].append(token)
                probs_out[row].append(top_p[row])
                if token in self._eos_ids:
                    done[row] = True
                elif token in newline_ids:
                    line = _decode(self.tokenizer, generated[row][line_start[row]:]).lstrip("\n")
                    lines_done[row] += 1
                    if self.fmt.is_final_line(line):
                        final_start[row] = line_start[row]
                        done[row] = True
                    elif lines_done[row] >= self.max_lines:
                        done[row] = True
                    line_start[row] = len(generated[row])
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(size, 1)], dim=1)
            step_ids = torch.tensor(top_id, device=device).unsqueeze(1)
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                        use_cache=True, **{cache_kwarg: past})
            past, logits = _kv_cache_of(out), out.logits[:, -1]
            next_pos = next_pos + 1
        proposals = []
        for row in range(size):
            self.generated_tokens += len(generated[row])
            conf = 0.0
            if final_start[row] is not None:
                conf = float(torch.tensor(probs_out[row][final_start[row]:], dtype=torch.float64).prod())
            proposals.append(Proposal(_decode(self.tokenizer, generated[row]), conf, len(generated[row])))
        return proposals

    @torch.no_grad()
    def score(self, contexts: Sequence[Sequence[str]], continuations: Sequence[str]) -> list[float]:
        """P(continuation | context) under this model: the product of its token probabilities."""
        device = next(self.model.parameters()).device
        scores: list[float] = []
        pairs = [(self.encode_lines(c), _encode(self.tokenizer, x)) for c, x in zip(contexts, continuations)]
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            width = max(len(a) + len(b) for a, b in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (a, b) in enumerate(chunk):  # right padding
                ids[row, :len(a) + len(b)] = torch.tensor(a + b)
                mask[row, :len(a) + len(b)] = 1
            logp = torch.log_softmax(self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
                                     .logits.float(), dim=-1).cpu()
            for row, (a, b) in enumerate(chunk):
                pos = torch.arange(len(a) - 1, len(a) + len(b) - 1)
                target = torch.tensor(b, dtype=torch.long)
                scores.append(float(logp[row, pos, target].double().sum().exp()))
        return scores


# --------------------------------------------------------------------------------------------
# Episodes and the cascade loop

@dataclasses.dataclass
class StepRecord:
    text: str  # the accepted proposal
    reasoning: str
    tool_call: Optional[dict]
    tool_result: Optional[str]
    answer: Optional[str]
    tier: int  # index of the tier whose proposal was accepted
    confidences: list[float]  # confidence of each tier tried, in order
    context: list[str]  # the lines the step was proposed from (for scoring)

    @property
    def escalated(self) -> bool:
        return self.tier > 0

    @property
    def final_line(self) -> str:
        lines = [ln + "\n" for ln in self.text.split("\n") if ln]
        return lines[-1] if lines else ""

    @property
    def reasoning_lines(self) -> list[str]:
        lines = [ln + "\n" for ln in self.text.split("\n") if ln]
        return lines[:-1]


@dataclasses.dataclass
class Episode:
    query: str
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    answer: Optional[str] = None
    error: Optional[str] = None  # why the episode ended without an answer
    done: bool = False
    lines: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_escalations(self) -> int:
        return sum(step.escalated for step in self.steps)

    def tier_counts(self, num_tiers: int) -> list[int]:
        """Accepted steps per tier."""
        counts = [0] * num_tiers
        for step in self.steps:
            counts[step.tier] += 1
        return counts

    def to_trajectory(self) -> dict:
        """The episode in the native trajectory schema (``user``, ``steps``, ``answer``)."""
        steps = [{"reasoning": s.reasoning, "tool_call": s.tool_call, "tool_result": s.tool_result}
                 for s in self.steps if s.tool_call is not None]
        out: dict[str, Any] = {"user": self.query, "steps": steps, "answer": self.answer}
        if self.error:
            out["error"] = self.error
        return out


PolicyLike = Union[LMPolicy, tuple]


def _as_policy(tier: PolicyLike, fmt: ReActFormat) -> LMPolicy:
    if isinstance(tier, LMPolicy):
        return tier
    model, tokenizer = tier
    return LMPolicy(model, tokenizer, fmt=fmt)


class Cascade:
    """Tiers of models, cheapest first; a step escalates while its confidence is below the tier's threshold.

    tiers: ``LMPolicy`` objects or ``(model, tokenizer)`` pairs. thresholds: one per tier except the
    last (a longer list is cut); tier ``i``'s proposal is accepted when its confidence is
    ``>= thresholds[i]``. The last tier's proposal is always accepted.
    """

    def __init__(self, tiers: Sequence[PolicyLike], thresholds: Sequence[float], tools: Mapping[str, Callable],
                 *, max_steps: int = 8, fmt: ReActFormat = ReActFormat()):
        if not tiers:
            raise ValueError("a cascade needs at least one tier")
        if len(thresholds) < len(tiers) - 1:
            raise ValueError(f"{len(tiers)} tiers need {len(tiers) - 1} thresholds, got {len(thresholds)}")
        self.fmt = fmt
        self.tiers = [_as_policy(t, fmt) for t in tiers]
        self.thresholds = [float(t) for t in thresholds[:len(tiers) - 1]]
        self.tools, self.max_steps = tools, max_steps

    def run(self, queries: Sequence[str], progress: Optional[Callable] = None) -> list[Episode]:
        """Run all queries to completion as one batch (one proposal round per step)."""
        episodes = [Episode(q, lines=[f"{self.fmt.prompt}{line}\n" for line in q.split("\n")])
                    for q in queries]
        active = list(range(len(episodes)))
        for _ in range(self.max_steps):
            if not active:
                break
            pending = active
            accepted: dict[int, tuple[int, Proposal, list[float]]] = {}
            confs: dict[int, list[float]] = {i: [] for i in active}
            for tier_index, policy in enumerate(self.tiers):
                if not pending:
                    break
                proposals = policy.propose([episodes[i].lines for i in pending])
                last = tier_index == len(self.tiers) - 1
                still = []
                for i, prop in zip(pending, proposals):
                    confs[i].append(prop.confidence)
                    if last or prop.confidence >= self.thresholds[tier_index]:
                        accepted[i] = (tier_index, prop, confs[i])
                    else:
                        still.append(i)
                pending = still
            for i in active:
                self._apply(episodes[i], *accepted[i])
            active = [i for i in active if not episodes[i].done]
            if progress is not None:
                progress(len(episodes) - len(active))
        for i in active:
            episodes[i].done, episodes[i].error = True, f"no answer within {self.max_steps} steps"
        return episodes

    def run_one(self, query: str) -> Episode:
        return self.run([query])[0]

    def _apply(self, episode: Episode, tier: int, prop: Proposal, confidences: list[float]) -> None:
        parsed = self.fmt.parse_step(prop.text)
        context = list(episode.lines)
        record = StepRecord(prop.text, parsed.reasoning, parsed.tool_call, None, parsed.answer, tier,
                            list(confidences), context)
        episode.steps.append(record)
        if parsed.error is not None:
            episode.done, episode.error = True, f"unparseable step: {parsed.error}"
            return
        episode.lines += [ln + "\n" for ln in prop.text.split("\n") if ln]
        if parsed.answer is not None:
            episode.done, episode.answer = True, parsed.answer
            return
        record.tool_result = execute_tool(self.tools, parsed.tool_call)
        episode.lines += [f"{self.fmt.observation}{line}\n" for line in record.tool_result.split("\n")]


class StudentAgent(Cascade):
    """A student model that escalates a step to the teacher when its confidence is below ``threshold``.

    ``StudentAgent(student, tokenizer, tools)`` runs the student alone; with ``teacher=...`` each step
    whose confidence (probability of its action/answer line) is below ``threshold`` is re-proposed by
    the teacher from the same context. ``teacher_tokenizer`` defaults to ``tokenizer``.
    """

    def __init__(self, student, tokenizer, tools: Mapping[str, Callable], teacher=None, threshold: float = 0.5,
                 *, teacher_tokenizer=None, max_steps: int = 8, fmt: ReActFormat = ReActFormat(), **policy_kw):
        tiers = [student if isinstance(student, LMPolicy)
                 else LMPolicy(student, tokenizer, name="student", fmt=fmt, **policy_kw)]
        if teacher is not None:
            tiers.append(teacher if isinstance(teacher, LMPolicy)
                         else LMPolicy(teacher, teacher_tokenizer or tokenizer, name="teacher", fmt=fmt,
                                       **policy_kw))
        super().__init__(tiers, [threshold] if teacher is not None else [], tools, max_steps=max_steps, fmt=fmt)
        self.threshold = float(threshold)

    @staticmethod
    def escalation_rate(episodes: Sequence[Episode]) -> float:
        steps = sum(len(e.steps) for e in episodes)
        return sum(e.num_escalations for e in episodes) / max(1, steps)
