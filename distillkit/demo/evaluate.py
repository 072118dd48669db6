"""Metrics of the demo: success, tool-call accuracy, calibration, escalation curves and cascades.

Definitions (also in docs/DEMO.md):

- success: the agent's final answer has the gold number (:func:`~distillkit.demo.env.check_answer`);
- tool-call accuracy: the fraction of the gold plan's tool calls that the agent reproduces at their
  position in its own rollout (same tool, same result when executed);
- step correctness (for calibration): step k of a rollout is correct when it is the gold tool call
  k (same tool and result) or, at k = plan length, a correct final answer;
- confidence of a step: the probability the model gives to its greedy action/answer line;
- ECE (vs correctness): 10 equal-width confidence bins, sum over bins of (bin share) x
  |mean confidence - fraction correct|;
- ECE vs teacher: the same bins of the student's confidence, against the teacher's probability
  of the very same action line in the same context: sum of (bin share) x |mean student
  confidence - mean teacher probability|;
- escalation rate: escalated steps / all steps (a step escalates when the student's confidence
  is below the threshold and the teacher re-proposes it);
- forward FLOPs per task: 2 x parameters x tokens each model reads, summed over the steps and the tiers a
  step tried; a step reads its whole context and writes its step (the agents keep no KV cache from one
  step to the next), a tier whose step was rejected is counted with the accepted step's length, and
  attention's own FLOPs are left out. Relative cost: a row's FLOPs per task over the teacher's alone.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, Mapping, Optional, Sequence

from ..agents.agent import Cascade, Episode, LMPolicy
from .env import Task, check_answer

NUM_BINS = 10


def step_correct(task: Task, k: int, step) -> bool:
    if step.tool_call is not None:
        if k >= len(task.plan) or step.tool_call.get("name") != task.plan[k]["name"]:
            return False
        try:
            return Fraction(step.tool_result) == Fraction(task.results[k])
        except (TypeError, ValueError, ZeroDivisionError):
            return False
    if step.answer is not None:
        return k == len(task.plan) and check_answer(task, step.answer)
    return False


def tool_calls_matched(task: Task, episode: Episode) -> int:
    return sum(step_correct(task, k, s) for k, s in enumerate(episode.steps[:len(task.plan)])
               if s.tool_call is not None)


def ece(confidences: Sequence[float], targets: Sequence[float], bins: int = NUM_BINS) -> Optional[float]:
    """Expected calibration error of ``confidences`` against ``targets`` (0/1 labels or probabilities)."""
    if not confidences:
        return None
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo <= c < hi) or (b == bins - 1 and c == 1.0)]
        if idx:
            mean_c = sum(confidences[i] for i in idx) / len(idx)
            mean_t = sum(targets[i] for i in idx) / len(idx)
            total += len(idx) / len(confidences) * abs(mean_c - mean_t)
    return total


def reliability(confidences: Sequence[float], labels: Sequence[float], bins: int = NUM_BINS) -> list[dict]:
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo <= c < hi) or (b == bins - 1 and c == 1.0)]
        if idx:
            out.append({"lo": lo, "hi": hi, "count": len(idx),
                        "confidence": sum(confidences[i] for i in idx) / len(idx),
                        "accuracy": sum(labels[i] for i in idx) / len(idx)})
    return out


def forward_flops(episodes: Sequence[Episode], tiers: Sequence[LMPolicy]) -> float:
    """Forward FLOPs of the episodes (module docstring): 2 x parameters x tokens read, per tier tried."""
    lengths: dict[tuple[int, str], int] = {}

    def tokens(tier: int, lines) -> int:
        total = 0
        for line in lines:
            key = (tier, line)
            if key not in lengths:
                lengths[key] = len(tiers[tier].encode_lines([line]))
            total += lengths[key]
        return total

    params = [t.num_parameters for t in tiers]
    flops = 0.0
    for episode in episodes:
        for step in episode.steps:
            for tier in range(len(step.confidences)):
                read = tokens(tier, step.context) + tokens(tier, [ln for ln in step.text.split("\n") if ln])
                flops += 2.0 * params[tier] * read
    return flops


def summarize(tasks: Sequence[Task], episodes: Sequence[Episode], num_tiers: int = 1,
              policies: Optional[Sequence[LMPolicy]] = None) -> dict:
    """Success, tool-call accuracy, success by number of steps, escalation and tier shares; with the tiers'
    policies, forward FLOPs per task."""
    success = [check_answer(t, e.answer) for t, e in zip(tasks, episodes)]
    by_steps = {}
    for n in sorted({t.num_steps for t in tasks}):
        s = [ok for t, ok in zip(tasks, success) if t.num_steps == n]
        by_steps[str(n)] = sum(s) / len(s)
    gold_calls = sum(len(t.plan) for t in tasks)
    steps = sum(len(e.steps) for e in episodes)
    tiers = [0] * num_tiers
    for e in episodes:
        for i, c in enumerate(e.tier_counts(num_tiers)):
            tiers[i] += c
    return {
        "success": sum(success) / len(success),
        "tool_call_accuracy": sum(tool_calls_matched(t, e) for t, e in zip(tasks, episodes)) / gold_calls,
        "success_by_steps": by_steps,
        "steps": steps,
        "escalation_rate": sum(e.num_escalations for e in episodes) / max(1, steps),
        "tier_share": [c / max(1, steps) for c in tiers],
        "unparseable": sum(1 for e in episodes if e.error and e.error.startswith("unparseable")),
        **({"flops_per_task": forward_flops(episodes, policies) / max(1, len(tasks))} if policies else {}),
    }


def calibration(tasks: Sequence[Task], episodes: Sequence[Episode], teacher: Optional[LMPolicy] = None) -> dict:
    """ECE of the acting model's step confidence vs correctness, and vs the teacher's probability."""
    conf, correct, contexts, lines = [], [], [], []
    for task, episode in zip(tasks, episodes):
        for k, step in enumerate(episode.steps):
            conf.append(step.confidences[0])
            correct.append(float(step_correct(task, k, step)))
            contexts.append(step.context + step.reasoning_lines)
            lines.append(step.final_line)
    out = {"ece": ece(conf, correct), "mean_confidence": sum(conf) / max(1, len(conf)),
           "step_accuracy": sum(correct) / max(1, len(correct)), "reliability": reliability(conf, correct)}
    if teacher is not None:
        teacher_p = teacher.score(contexts, lines)
        out["ece_vs_teacher"] = ece(conf, teacher_p)
        out["mean_teacher_probability"] = sum(teacher_p) / max(1, len(teacher_p))
    return out


def run_agent(tiers: Sequence[LMPolicy], thresholds: Sequence[float], tasks: Sequence[Task], tools: Mapping,
              max_steps: int = 8, bar_factory: Optional[Callable] = None, desc: str = "") -> list[Episode]:
    """Run the cascade of ``tiers`` (one tier: the model alone) on the tasks with the environment's tools."""
    cascade = Cascade(list(tiers), list(thresholds), tools, max_steps=max_steps)
    if bar_factory is None:
        return cascade.run([t.question for t in tasks])
    with bar_factory(total=len(tasks), desc=desc) as bar:
        state = {"done": 0}

        def progress(done):
            bar.update(done - state["done"])
            state["done"] = done

        episodes = cascade.run([t.question for t in tasks], progress=progress)
        bar.update(len(tasks) - state["done"])
    return episodes


def fallback_curve(student: LMPolicy, teacher: LMPolicy, tasks: Sequence[Task], tools: Mapping,
                   thresholds: Sequence[float], max_steps: int = 8, bar=None) -> list[dict]:
    """Success and escalation rate of the student with teacher fallback, for each threshold."""
    points = []
    for threshold in thresholds:
        episodes = run_agent([student, teacher], [threshold], tasks, tools, max_steps)
        summary = summarize(tasks, episodes, 2, [student, teacher])
        points.append({"threshold": threshold, "success": summary["success"],
                       "escalation_rate": summary["escalation_rate"],
                       "tool_call_accuracy": summary["tool_call_accuracy"],
                       "success_by_steps": summary["success_by_steps"], "flops_per_task": summary["flops_per_task"]})
        if bar is not None:
            bar.update(1)
    return points


def pick_fallback_threshold(points: Sequence[dict], budget: float = 0.2) -> dict:
    """The operating point chosen on validation: the most successful threshold escalating at most
    ``budget`` of the steps (ties: the least escalating); if none is within budget, the least
    escalating point."""
    within = [p for p in points if p["escalation_rate"] <= budget + 1e-12]
    if not within:
        return min(points, key=lambda p: (p["escalation_rate"], -p["success"]))
    return max(within, key=lambda p: (p["success"], -p["escalation_rate"]))


def cascade_cost(summary: dict, tier_calls: Sequence[float], params: Sequence[int]) -> float:
    """Relative compute per step: parameters of every tier tried, normalized by the last tier's."""
    return sum(c * p for c, p in zip(tier_calls, params)) / params[-1]


def cascade_point(tiers: Sequence[LMPolicy], thresholds: Sequence[float], tasks: Sequence[Task], tools: Mapping,
                  max_steps: int = 8) -> dict:
    """One setting of a cascade's thresholds on a validation split: success, tier shares and cost (parameters
    of every tier tried per step, relative to the last tier)."""
    params = [t.num_parameters for t in tiers]
    episodes = run_agent(tiers, thresholds, tasks, tools, max_steps)
    summary = summarize(tasks, episodes, len(tiers))
    steps = max(1, summary["steps"])
    tried = [0.0] * len(tiers)
    for e in episodes:
        for s in e.steps:
            for i in range(len(s.confidences)):
                tried[i] += 1
    tried = [c / steps for c in tried]
    return {"thresholds": list(thresholds), "success": summary["success"], "tier_share": summary["tier_share"],
            "tier_calls_per_step": tried, "cost": cascade_cost(summary, tried, params)}


def pick_cascade(points: Sequence[dict], target: float) -> list[float]:
    """The cheapest setting whose success reaches ``target``; if none does, the most successful one."""
    ok = [r for r in points if r["success"] >= target - 1e-12]
    best = min(ok, key=lambda r: (r["cost"], -r["success"])) if ok else max(
        points, key=lambda r: (r["success"], -r["cost"]))
    return best["thresholds"]
