"""`distillkit demo`: end-to-end agent distillation on a synthetic tool-use environment.

    distillkit demo                 # default: about 5 minutes on a 2-core CPU
    distillkit demo --full          # larger models, more steps (about half an hour on a CPU)
    distillkit demo --smoke         # a few seconds: checks the pipeline, the numbers mean nothing
    distillkit demo --out DIR       # table + report.json + demo.png (+ tokenizer, trajectories) in DIR

Everything is built locally (environment, tokenizer, models); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def _num(x: Optional[float], digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(report: dict) -> str:
    res, params = report["results"], report["parameters"]
    steps = sorted(res["teacher"]["success_by_steps"])
    head = (f"{'agent':<30}{'params':>9}{'success':>9}{'tool acc':>9}"
            + "".join(f"{k + '-step':>8}" for k in steps) + f"{'OOD':>8}{'OOD acc':>8}{'cost':>7}{'ECE':>7}{'ECE/T':>7}{'escal.':>8}")
    rows = [head, "-" * len(head)]

    def row(label, summary, n_params, calib=None, escalation=None):
        calib = calib or {}
        cost = summary.get("relative_cost")
        rows.append(f"{label:<30}{n_params:>9}{_pct(summary['success']):>9}"
                    f"{_pct(summary.get('tool_call_accuracy')):>9}"
                    + "".join(f"{_pct(summary.get('success_by_steps', {}).get(k)):>8}" for k in steps)
                    + f"{_pct(summary.get('ood_success')):>8}{_pct(summary.get('ood_tool_call_accuracy')):>8}"
                    + f"{('-' if cost is None else f'{cost:.2f}x'):>7}"
                    + f"{_num(calib.get('ece')):>7}{_num(calib.get('ece_vs_teacher')):>7}"
                    + f"{(_pct(escalation) if escalation is not None else '-'):>8}")

    offline = res.get("offline_topk")
    for name, label in (("teacher", "teacher"), ("distilled", "student, distilled (span KD)"),
                        ("offline_topk", f"student, offline top-k (K={offline['cache']['k']})" if offline else ""),
                        ("on_policy", "student, on-policy KD"),
                        ("sft", "student, SFT baseline"), ("tiny", "tiny, distilled")):
        if name in res:
            row(label[:30], res[name], params[name], res[name]["calibration"])
    for name, label in (("distilled", "distilled + fallback"), ("sft", "SFT + fallback")):
        fb = report["fallback"][name]
        point = res.get(f"{name}_fallback", fb["test_at_threshold"])
        row(f"{label} @{fb['threshold']:g}"[:30], point, params[name], None, point["escalation_rate"])
    casc = report["cascade"]
    thr = "/".join(f"{t:g}" for t in casc["thresholds"])
    row(f"cascade @{thr}"[:30], res.get("cascade", casc["test"]), "3 tiers", None, casc["teacher_step_share"])
    rows.append("")
    rows.append("tool acc: gold tool calls reproduced; OOD, OOD acc: success and tool acc on tasks with 5 and 6 tool "
                "calls (training has 1 to 4); cost: forward FLOPs per test task relative to the teacher alone; ECE: step "
                "confidence vs correctness; ECE/T: vs the teacher's probability of the same action; escal.: "
                "share of steps taken by the teacher.")
    share = casc["test"]["tier_share"]
    rows.append("cascade tiny/distilled/teacher share of steps: "
                + " / ".join(_pct(s).strip() for s in share))
    if offline:
        cache = offline["cache"]
        rows.append(f"offline top-k: trained from a top-{cache['k']} teacher cache of {cache['tokens']} tokens, "
                    f"{cache['bytes'] / 2**20:.2f} MiB ({cache['bytes_per_token']:.0f} bytes/token; the dense "
                    f"logits would take {4 * report['data']['vocab_size']} bytes/token in fp32)")
    rows.append("")
    rows.append("goals (reported as measured):")
    for name, goal in report["goals"].items():
        detail = ", ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in goal.items() if k != "met")
        rows.append(f"  [{'met' if goal['met'] else 'NOT met'}] {name}: {detail}")
    return "\n".join(rows)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    res = report["results"]
    teacher = res["teacher"]["success"]
    ax = axes[0]
    for name, style in (("distilled", "o-"), ("sft", "s--")):
        pts = sorted(report["fallback"][name]["test_curve"], key=lambda p: p["escalation_rate"])
        ax.plot([100 * p["escalation_rate"] for p in pts], [100 * p["success"] for p in pts], style,
                label=f"{name} student + teacher fallback")
    casc = report["cascade"]["test"]
    ax.plot([100 * report["cascade"]["teacher_step_share"]], [100 * casc["success"]], "k*", markersize=14,
            label="cascade tiny/distilled/teacher")
    ax.axhline(100 * teacher, color="gray", linestyle=":", label="teacher alone")
    ax.axhline(98 * teacher, color="gray", linestyle="-.", linewidth=0.8, label="98% of teacher")
    ax.axvline(20, color="red", linestyle=":", linewidth=0.8)
    ax.set_xlabel("steps escalated to the teacher (%)")
    ax.set_ylabel("task success (%)")
    ax.set_title("success vs escalation (test)")
    ax.legend(fontsize=7)

    ax = axes[1]
    steps = sorted(res["teacher"]["success_by_steps"])
    names = [name for name in ("teacher", "distilled", "offline_topk", "on_policy", "sft", "tiny") if name in res]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([int(k) + (i - (len(names) - 1) / 2) * width for k in steps],
               [100 * res[name]["success_by_steps"][k] for k in steps], width, label=name)
    ax.set_xticks([int(k) for k in steps])
    ax.set_xlabel("tool calls needed")
    ax.set_ylabel("task success (%)")
    ax.set_title("success by number of steps (test)")
    ax.legend(fontsize=7)

    ax = axes[2]
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
    for name in (name for name in ("teacher", "distilled", "offline_topk", "on_policy", "sft", "tiny") if name in res):
        rel = res[name]["calibration"]["reliability"]
        if rel:
            ax.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], "o-",
                    label=f"{name} (ECE {res[name]['calibration']['ece']:.3f})")
    ax.set_xlabel("step confidence (P of the action line)")
    ax.set_ylabel("fraction of steps correct")
    ax.set_title("calibration (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillkit demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="larger models and more steps (longer run)")
    size.add_argument("--smoke", action="store_true", help="a few seconds; checks the pipeline only")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of the main process: teacher, evaluation (default 1: tiny models "
                             "gain little from more, and lose a lot when the cores are shared)")
    parser.add_argument("--teacher-steps", type=int, help="override the preset's teacher training steps")
    parser.add_argument("--student-steps", type=int, help="override the preset's student training steps")
    parser.add_argument("--jobs", type=int, default=4,
                        help="forked processes of one thread each that train the students and evaluate the "
                             "agents at the same time (default 4: every student at once; 1 runs everything "
                             "in this process, one after the other, with the same results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    import torch

    from .pipeline import PRESETS, machine_info, run_demo, write_report

    torch.set_num_threads(max(1, args.threads))
    settings = PRESETS["full" if args.full else "smoke" if args.smoke else "default"]
    overrides = {"seed": args.seed}
    if args.teacher_steps is not None:
        overrides["teacher_steps"] = args.teacher_steps
    if args.student_steps is not None:
        overrides["student_steps"] = args.student_steps
        overrides["tiny_steps"] = round(args.student_steps * settings.tiny_steps / max(1, settings.student_steps))
    settings = dataclasses.replace(settings, **overrides)
    info = machine_info(torch.get_num_threads())
    print(f"distillkit demo ({settings.name}): {info['cpu_count']} CPU cores, {info['torch_threads']} torch "
          f"thread(s), {'CUDA available (unused)' if info['cuda'] else 'no GPU'}; output in {args.out}",
          flush=True)
    report = run_demo(settings, args.out, progress=not args.no_progress, workers=args.jobs)
    report["wall_time_s"] = round(time.perf_counter() - start, 1)
    plot(report, args.out / "demo.png")
    report["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_report(report, args.out)
    print()
    print(format_table(report))
    print()
    timings = ", ".join(f"{k} {v:.0f}s" for k, v in report["timings_s"].items() if k != "total")
    print(f"time: {report['wall_time_s']:.0f}s wall ({timings})")
    print(f"wrote {args.out / 'report.json'}, {args.out / 'demo.png'}, {args.out / 'teacher_trajectories.jsonl'}, "
          f"{args.out / 'finetune.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
