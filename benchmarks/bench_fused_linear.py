"""Peak memory and time of the logits-free loss vs eager PyTorch (and Liger, when installed), on CPU.

    python benchmarks/bench_fused_linear.py                      # N=2048, H=512, V=32000, fp32
    python benchmarks/bench_fused_linear.py --tokens 4096 --vocab 50257 --repeats 5

Each variant runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own: the inputs (hidden
states, LM heads) are created and the variant's modules imported first, and that RSS is reported as
the baseline; then one warm-up and
`--repeats` timed forward+backward passes run. "peak - base" is what the loss itself adds. Variants:

    fused   distillkit.fused_linear_distill_loss (chunked; never holds [N, V] logits)
    eager   student/teacher matmuls + distillkit.reference.distill_loss (materializes the logits)
    liger   liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(compiled=False), if importable; it computes
            a JSD + CE, so all three variants here use divergence="jsd" (beta=0.5) + 0.5 CE.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(variant: str, n: int, h: int, v: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    student_hidden = torch.randn(n, h)
    student_weight = torch.randn(v, h) / h**0.5
    teacher_hidden = torch.randn(n, h)
    teacher_weight = torch.randn(v, h) / h**0.5
    labels = torch.randint(0, v, (n,))

    if variant == "fused":
        from distillkit.core.fused_linear import fused_linear_distill_loss

        def step(hid, w):
            return fused_linear_distill_loss(hid, w, teacher_hidden, teacher_weight, labels, divergence="jsd",
                                             kl_weight=0.5, ce_weight=0.5, backend="torch")
    elif variant == "eager":
        from distillkit.core import reference

        def step(hid, w):
            with torch.no_grad():
                t = teacher_hidden @ teacher_weight.T
            return reference.distill_loss(hid @ w.T, t, labels, divergence="jsd", kl_weight=0.5, ce_weight=0.5)
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, compiled=False)

        def step(hid, w):
            return liger(hid, w, teacher_hidden, teacher_weight, labels)
    else:
        raise ValueError(variant)

    baseline = _rss_mib()  # inputs allocated and the variant's modules imported
    times = []
    for i in range(repeats + 1):
        hid = student_hidden.detach().requires_grad_()
        w = student_weight.detach().requires_grad_()
        start = time.perf_counter()
        loss = step(hid, w)
        loss.backward()
        if i:  # the first pass is a warm-up
            times.append(time.perf_counter() - start)
    return {"variant": variant, "loss": float(loss), "baseline_rss_mib": baseline, "peak_rss_mib": _rss_mib(),
            "median_s": statistics.median(times), "min_s": min(times), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="fused,eager,liger")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.hidden, args.vocab, args.repeats)))
        return

    print(f"N={args.tokens} H={args.hidden} V={args.vocab} fp32, CPU; one fresh process per variant; "
          f"forward+backward, median of {args.repeats}")
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"(one [N, V] fp32 logits tensor is {logits_mib:.0f} MiB)")
    print(f"{'variant':<8} {'loss':>10} {'baseline MiB':>13} {'peak MiB':>9} {'peak - base':>12} {'median s':>9}")
    for variant in args.variants.split(","):
        if variant == "liger":
            try:
                import liger_kernel.chunked_loss  # noqa: F401
            except ImportError:
                print(f"{'liger':<8} (liger_kernel not importable: skipped)")
                continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{variant:<8} failed:\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{variant:<8} {r['loss']:>10.5f} {r['baseline_rss_mib']:>13.0f} {r['peak_rss_mib']:>9.0f} "
              f"{r['peak_rss_mib'] - r['baseline_rss_mib']:>12.0f} {r['median_s']:>9.3f}")


if __name__ == "__main__":
    main()
