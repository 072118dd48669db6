"""On-policy rollouts: an agent acting in its environments, and the trainer's rollout for agents.

:func:`rollout` runs a policy (sampling, for on-policy data) on tasks, one fresh environment
(:mod:`distillkit.agents.environment`) per task; :class:`AgentRollout` is the ``on_policy_rollout`` of
:class:`distillkit.training.DistillationTrainer` for agents: the student acts, the tools answer, and the
episodes come back as token and span ids (observations and prompts are never trained on).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from .agent import Cascade
from .environment import Environment, encode_episode
from .policy import LMPolicy
from .protocol import ReActFormat, decode_ids

__all__ = ["rollout", "AgentRollout"]


def rollout(policy, tasks: Sequence[Any], environment: Callable[[], Environment], *, max_steps: int = 8,
            fmt: ReActFormat = ReActFormat(), progress: Optional[Callable] = None):
    """Run ``policy`` (an LMPolicy; sampling when its temperature > 0) on every task, one fresh environment
    per task, all tasks as one batch; returns the episodes."""
    return Cascade([policy], [], environment=environment, max_steps=max_steps, fmt=fmt).run(tasks, progress)


class AgentRollout:
    """The trainer's on-policy rollout for agents (``DistillationTrainer(on_policy_rollout=AgentRollout(...))``).

    Each prompt's text, with the prompt prefix removed, is the task given to a fresh ``environment()``; the
    student then acts in it (sampling at the on-policy temperature) and the episode comes back as token and
    span ids: the student's reasoning, actions and answers are trained, the prompt and observations are not.
    """

    def __init__(self, environment: Callable[[], Environment], tokenizer, *, fmt: ReActFormat = ReActFormat(),
                 max_steps: int = 8, max_lines: int = 4, seed: int = 0):
        self.environment, self.tokenizer, self.fmt = environment, tokenizer, fmt
        self.max_steps, self.max_lines, self.seed, self.calls = max_steps, max_lines, seed, 0

    def question(self, prompt_ids: Sequence[int]) -> str:
        lines = decode_ids(self.tokenizer, prompt_ids).split("\n")
        prefix = self.fmt.prompt.rstrip()
        return "\n".join(ln[len(prefix):].lstrip() if ln.startswith(prefix) else ln for ln in lines).strip("\n")

    def __call__(self, model, prompts: Sequence[Sequence[int]], config) -> list[tuple[list[int], list[int]]]:
        was_training = model.training
        self.calls += 1
        policy = LMPolicy(model, self.tokenizer, fmt=self.fmt, max_new_tokens=config.max_new_tokens,
                          max_lines=self.max_lines, batch_size=max(1, len(prompts)), memoize=False,
                          temperature=config.temperature, seed=self.seed + self.calls)
        try:
            episodes = rollout(policy, [self.question(p) for p in prompts], self.environment,
                               max_steps=self.max_steps, fmt=self.fmt)
        finally:
            model.train(was_training)
        return [encode_episode(self.tokenizer, e, self.fmt) for e in episodes]
