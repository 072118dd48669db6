"""The demo's on-policy student: the distilled student's first steps, then its own rollouts graded by the teacher.

After ``warm_steps`` off-policy steps (shared with the distilled student: the same model, data and batches up
to that step), each step is on-policy with probability ``fraction`` (GKD's mixing; the others are the
distilled student's off-policy steps on the teacher's trajectories). On an on-policy step the student has
acted in the environment on the student queries, sampling at ``temperature``; its episodes (its reasoning,
actions and answers, and the tools' real observations) are scored by the teacher, and the loss is the
divergence on the student's own spans, nothing on the prompt and the observations, and no CE term (which
would reinforce the student's own samples, right or wrong).

Each rollout round runs ``rollouts`` episodes as one batch and trains ``passes`` times over them in batches
of the student's batch size, so the student trains on its own samples of at most one round earlier.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

from ..agents.environment import ToolEnvironment, encode_episode
from ..agents.rollout import rollout
from ..agents.policy import LMPolicy
from ..core.modules import SpanDistillationLoss
from .models import DISTILL_WEIGHTS, Example, attach_teacher_logits, train

# reverse KL on everything the student wrote; nothing on prompts and observations
ON_POLICY_WEIGHTS = {"reason": (1.0, 0.0), "action": (1.0, 0.0), "answer": (1.0, 0.0)}


@dataclasses.dataclass(frozen=True)
class OnPolicyPlan:
    warm_steps: int  # off-policy steps, shared with the distilled student
    rollouts: int = 96  # episodes per rollout round
    passes: int = 2  # training passes over each round's episodes
    temperature: float = 1.0  # the student samples its actions at this temperature
    divergence: str = "reverse_kl"
    fraction: float = 1.0  # share of the phase's steps on rollouts; the others on the teacher's trajectories
    max_steps: int = 6  # of an episode
    gen_tokens: int = 64  # most new tokens per step


@dataclasses.dataclass
class OnPolicyContext:
    """What the rollouts need: the teacher, the tokenizer, the tools and the tasks to act on."""

    teacher: Any
    tokenizer: Any
    tools: Any
    tasks: Sequence[Any]

    def train(self, student, job, examples: Sequence[Example], optimizer_state=None, bar=None) -> list[float]:
        return train_on_policy(student, job, examples, self, optimizer_state, bar=bar)


class RolloutBatches:
    """A callable giving each step's (batch, loss): the student's own episodes with the teacher's logits and the
    on-policy loss (probability ``plan.fraction``), else a draw of the teacher's trajectories with the
    off-policy loss."""

    def __init__(self, student, context: OnPolicyContext, plan: OnPolicyPlan, batch_size: int, seed: int,
                 on_policy_loss, examples: Sequence[Example] = (), off_policy_loss=None):
        if plan.fraction < 1 and not examples:
            raise ValueError("an on-policy fraction below 1 needs the off-policy examples")
        self.student, self.context, self.plan, self.batch_size = student, context, plan, batch_size
        self.on_policy_loss, self.examples, self.off_policy_loss = on_policy_loss, examples, off_policy_loss
        self.rng = random.Random(seed)
        self.queue: list[list[Example]] = []
        self.generated_tokens = self.episodes = self.on_policy_steps = 0

    def __call__(self):
        if self.rng.random() >= self.plan.fraction:
            return [self.examples[self.rng.randrange(len(self.examples))] for _ in range(self.batch_size)], \
                self.off_policy_loss
        if not self.queue:
            self._refill()
        self.on_policy_steps += 1
        return self.queue.pop(), self.on_policy_loss

    def _refill(self) -> None:
        ctx, plan = self.context, self.plan
        tasks = [ctx.tasks[self.rng.randrange(len(ctx.tasks))] for _ in range(plan.rollouts)]
        policy = LMPolicy(self.student, ctx.tokenizer, max_new_tokens=plan.gen_tokens, batch_size=plan.rollouts,
                          memoize=False, temperature=plan.temperature, seed=self.rng.randrange(2**31))
        try:
            episodes = rollout(policy, tasks, lambda: ToolEnvironment(ctx.tools), max_steps=plan.max_steps)
        finally:
            self.student.train()  # the policy put it in eval mode to generate
        examples = [Example(*encode_episode(ctx.tokenizer, e)) for e in episodes]
        attach_teacher_logits(ctx.teacher, examples)
        self.generated_tokens += policy.generated_tokens
        self.episodes += len(episodes)
        batches = []
        for _ in range(plan.passes):
            order = list(range(len(examples)))
            self.rng.shuffle(order)
            batches += [[examples[i] for i in order[k:k + self.batch_size]]
                        for k in range(0, len(order) - self.batch_size + 1, self.batch_size)]
        self.queue = batches[::-1]


def train_on_policy(student, job, examples: Sequence[Example], context: OnPolicyContext, optimizer_state=None,
                    bar=None) -> list[float]:
    """Continue `student` (and its optimizer state) from step plan.warm_steps to job.steps of the same schedule
    with job.on_policy's plan; returns the losses of those steps. Off-policy steps use the distilled student's
    loss (DISTILL_WEIGHTS, job.divergence) on `examples`."""
    plan: OnPolicyPlan = job.on_policy
    on_policy_loss = SpanDistillationLoss(dict(job.span_weights), divergence=plan.divergence,
                                          temperature=job.temperature)
    off_policy_loss = SpanDistillationLoss(DISTILL_WEIGHTS, divergence=job.divergence, temperature=job.temperature)
    batches = RolloutBatches(student, context, plan, job.batch_size, job.seed, on_policy_loss, examples,
                             off_policy_loss)
    return train(student, (), steps=job.steps, batch_size=job.batch_size, lr=job.lr, loss_fn=on_policy_loss,
                 teacher="logits", seed=job.seed, bar=bar, next_batch=batches, start_step=plan.warm_steps,
                 optimizer_state=optimizer_state)
