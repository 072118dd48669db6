"""Run language-model agents in a tool loop, with escalation to larger models when unsure.

The agents speak the ReAct text protocol of :mod:`distillkit.agents.protocol`; each step is
proposed by an :class:`~distillkit.agents.policy.LMPolicy` with a confidence (the probability of
its action or answer line), and this loop hands it to the episode's environment
(:mod:`distillkit.agents.environment`: a dictionary of tools, or any object with ``reset`` and
``step``) and appends the observation.

- :class:`Cascade` runs any number of tiers (small to large): a tier's step is
  accepted when its confidence is at least that tier's threshold, otherwise the
  same step is re-proposed by the next tier; the last tier is always accepted.
- :class:`StudentAgent` is the two-tier case: a student with an optional teacher
  fallback.

Both accept Hugging Face causal LMs with a ``tokenizers.Tokenizer`` or a Hugging
Face tokenizer, run many queries as one batch (greedy decoding with a KV cache),
and memoize proposals per exact context, so sweeping thresholds is cheap.

ReActFormat, ParsedStep, encode_trajectory, Proposal, LMPolicy and execute_tool are re-exported here,
where they were defined before the protocol, the policy and the environments got modules of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .environment import Environment, ToolEnvironment, execute_tool
from .policy import LMPolicy, Proposal
from .protocol import ParsedStep, ReActFormat, encode_trajectory

__all__ = ["ReActFormat", "ParsedStep", "Proposal", "LMPolicy", "StepRecord", "Episode", "Cascade",
           "StudentAgent", "encode_trajectory", "execute_tool", "Environment", "ToolEnvironment"]


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
    ``>= thresholds[i]``. The last tier's proposal is always accepted. The steps go to ``tools`` (a
    dictionary of functions: :class:`ToolEnvironment`) or to ``environment``, a callable returning a fresh
    :class:`Environment` per episode; exactly one of the two.
    """

    def __init__(self, tiers: Sequence[PolicyLike], thresholds: Sequence[float],
                 tools: Optional[Mapping[str, Callable]] = None, *,
                 environment: Optional[Callable[[], Environment]] = None, max_steps: int = 8,
                 fmt: ReActFormat = ReActFormat()):
        if not tiers:
            raise ValueError("a cascade needs at least one tier")
        if len(thresholds) < len(tiers) - 1:
            raise ValueError(f"{len(tiers)} tiers need {len(tiers) - 1} thresholds, got {len(thresholds)}")
        if (tools is None) == (environment is None):
            raise ValueError("pass tools (a mapping of functions) or environment (a factory of environments), "
                             "exactly one")
        self.fmt = fmt
        self.tiers = [_as_policy(t, fmt) for t in tiers]
        self.thresholds = [float(t) for t in thresholds[:len(tiers) - 1]]
        self.tools, self.max_steps = tools, max_steps
        self.environment = environment if environment is not None else (lambda: ToolEnvironment(tools))

    def run(self, tasks: Sequence, progress: Optional[Callable] = None) -> list[Episode]:
        """Run all tasks (questions, or whatever the environment's ``reset`` takes) to completion as one batch
        (one proposal round per step)."""
        envs = [self.environment() for _ in tasks]
        questions = [env.reset(task) for env, task in zip(envs, tasks)]
        episodes = [Episode(q, lines=[f"{self.fmt.prompt}{line}\n" for line in q.split("\n")])
                    for q in questions]
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
                self._apply(episodes[i], envs[i], *accepted[i])
            active = [i for i in active if not episodes[i].done]
            if progress is not None:
                progress(len(episodes) - len(active))
        for i in active:
            episodes[i].done, episodes[i].error = True, f"no answer within {self.max_steps} steps"
        return episodes

    def run_one(self, query: str) -> Episode:
        return self.run([query])[0]

    def _apply(self, episode: Episode, env: Environment, tier: int, prop: Proposal, confidences: list[float]) -> None:
        parsed = self.fmt.parse_step(prop.text)
        context = list(episode.lines)
        record = StepRecord(prop.text, parsed.reasoning, parsed.tool_call, None, parsed.answer, tier,
                            list(confidences), context)
        episode.steps.append(record)
        # The step's lines join the context even when it does not parse: an on-policy rollout trains on them.
        episode.lines += [ln + "\n" for ln in prop.text.split("\n") if ln]
        if parsed.error is not None:
            episode.done, episode.error = True, f"unparseable step: {parsed.error}"
            return
        observation, done = env.step(parsed)
        if parsed.answer is not None:
            episode.answer = parsed.answer
        else:
            record.tool_result = observation
        if done:
            episode.done = True
            return
        episode.lines += [f"{self.fmt.observation}{line}\n" for line in str(observation).split("\n")]


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
