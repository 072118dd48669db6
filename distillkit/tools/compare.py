"""``distillkit compare``: every available backend against the float64 reference.

For each backend x divergence (and CE only) x dtype x shape, the backend runs on the dtype's
inputs and ``distillkit.reference.distill_loss`` on float64 copies of the same (already rounded)
inputs; the loss and the student gradient are held to the one tolerance table,
``distillkit.core.tolerances`` (the test suite uses the same). Prints a table and a summary; exits 1
if any case fails, 2 if no backend can run.

    distillkit compare                          # default sweep (V = 1271 and 50257)
    distillkit compare --quick                  # a smoke sweep (V = 1271, fp32 and bf16)
    distillkit compare --device cuda --json out.json

On CPU the Triton backend runs only in Triton's interpreter: set TRITON_INTERPRET=1 (before
Python starts) to include it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..core import backends
from ..core.divergences import NAMES as DIVERGENCES
from ..core.tolerances import TOLERANCES, compare

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CE_ONLY = "ce"
# (leading shape, vocabulary): a 3-D batch exercises the row addressing.
SHAPES = [((2, 3), 1271), ((1, 3), 50257)]
QUICK_SHAPES = [((2, 3), 1271)]
QUICK_DIVERGENCES = ["forward_kl", "jsd", CE_ONLY]
QUICK_DTYPES = ["fp32", "bf16"]
TEMPERATURE = 2.0


@dataclass
class Result:
    backend: str
    divergence: str
    dtype: str
    shape: str
    loss_abs: float
    loss_rel: float
    grad_abs: float
    grad_rel: float
    ok: bool
    detail: str = ""
    seconds: float = 0.0


def available_backends(device: torch.device) -> tuple[list[str], list[str]]:
    """(backends that run on device, notes on those that do not)."""
    names, notes = [], []
    if backends.triton_usable(device):
        names.append("triton")
        if device.type == "cpu":
            notes.append("triton: included, running in the Triton interpreter (TRITON_INTERPRET=1)")
    elif device.type == "cpu":
        notes.append("triton: skipped; on CPU it runs only in the Triton interpreter "
                     "(set TRITON_INTERPRET=1 before starting Python to include it)")
    names.append("torch")
    native = device.type
    if backends.native_usable(device):
        names.append(native)
    else:
        notes.append(f"{native}: skipped; the compiled extension is not built for {native} here (see `distillkit env`)")
    return names, notes


def _inputs(lead, vocab, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*lead, vocab, generator=gen) * 3).to(dtype).to(device)
    teacher = (torch.randn(*lead, vocab, generator=gen) * 3).to(dtype).to(device)
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels.view(-1)[::4] = -100  # some ignored labels
    return student, teacher, labels.to(device)


def _options(divergence: str) -> dict:
    if divergence == CE_ONLY:
        return dict(kl_weight=0.0, ce_weight=1.0)
    return dict(divergence=divergence, temperature=TEMPERATURE, kl_weight=0.5, ce_weight=0.5)


def run_case(backend: str, divergence: str, dtype_name: str, lead, vocab, device, seed: int = 0) -> Result:
    import distillkit
    from ..core import reference

    dtype = DTYPES[dtype_name]
    student, teacher, labels = _inputs(lead, vocab, dtype, device, seed)
    if divergence == CE_ONLY:
        teacher = None
    options = _options(divergence)
    start = time.perf_counter()
    s = student.detach().clone().requires_grad_()
    loss = distillkit.distill_loss(s, teacher, labels, backend=backend, **options)
    grad_out = torch.tensor(0.7, device=device)  # a non-unit grad_output, applied by the backend
    loss.backward(grad_out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    s64 = student.detach().double().requires_grad_()
    ref = reference.distill_loss(s64, None if teacher is None else teacher.double(), labels, **options)
    ref.backward(grad_out.double())
    loss_cmp = compare(loss, ref, dtype, "loss")
    grad_cmp = compare(s.grad, s64.grad, dtype, "grad")
    ok = loss_cmp.ok and grad_cmp.ok
    detail = "" if ok else "; ".join(f"{kind}: {c.describe()}" for kind, c in (("loss", loss_cmp), ("grad", grad_cmp))
                                     if not c.ok)
    return Result(backend, divergence, dtype_name, f"{'x'.join(map(str, lead))}x{vocab}", loss_cmp.max_abs,
                  loss_cmp.max_rel, grad_cmp.max_abs, grad_cmp.max_rel, ok, detail, seconds)


def cases(device: torch.device, quick: bool, only_backends: Optional[list[str]] = None):
    names, notes = available_backends(device)
    if only_backends:
        unknown = [b for b in only_backends if b not in names]
        if unknown:
            notes.append(f"requested but not available here: {', '.join(unknown)}")
        names = [b for b in names if b in only_backends]
    divergences = QUICK_DIVERGENCES if quick else list(DIVERGENCES) + [CE_ONLY]
    dtypes = QUICK_DTYPES if quick else list(DTYPES)
    shapes = QUICK_SHAPES if quick else SHAPES
    out = [(b, d, t, lead, v) for (lead, v) in shapes for b in names for t in dtypes for d in divergences]
    return out, names, notes


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else "nan" if math.isnan(x) else f"{x:.2e}"


def format_table(results: list[Result]) -> str:
    header = ["backend", "divergence", "dtype", "shape", "loss abs", "loss rel", "grad abs", "grad rel", "result"]
    rows = [[r.backend, r.divergence, r.dtype, r.shape, _fmt(r.loss_abs), _fmt(r.loss_rel), _fmt(r.grad_abs),
             _fmt(r.grad_rel), "ok" if r.ok else "FAIL"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def tolerance_table() -> str:
    lines = ["tolerances (distillkit.core.tolerances): |err| <= atol * scale + rtol * |expected|, "
             "scale = 1 (loss) or max|expected grad| (grad)"]
    for (dtype, kind), tol in TOLERANCES.items():
        name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        lines.append(f"  {name:5s} {kind:5s} atol={tol.atol:.0e} rtol={tol.rtol:.0e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distillkit compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--json", metavar="PATH", help="write every case and the summary to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a small sweep (V=1271; fp32, bf16; 3 ops)")
    parser.add_argument("--backend", action="append", dest="backends", metavar="NAME",
                        help="only this backend (repeatable): triton, torch, cpu, cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("distillkit compare: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    todo, names, notes = cases(device, args.quick, args.backends)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"distillkit compare on {device} ({device_name}); torch {torch.__version__}; "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}")
    print(f"backends: {', '.join(names) or 'none'}")
    for note in notes:
        print(f"  note: {note}")
    print("reference: distillkit.reference.distill_loss on float64 copies of the same inputs; "
          f"loss = 0.5 CE + 0.5 T^2 D at T={TEMPERATURE} (ce: CE only), 1 in 4 labels ignored, grad_output 0.7")
    if not todo:
        print("distillkit compare: no backend can run here", file=sys.stderr)
        return 2

    try:
        from tqdm import tqdm
        progress = tqdm(todo, desc="compare", unit="case", file=sys.stderr, disable=args.no_progress,
                        dynamic_ncols=True)
    except ImportError:  # tqdm is a dependency; stay usable without it
        progress = todo
    results = []
    started = time.perf_counter()
    for backend, divergence, dtype, lead, vocab in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(f"{backend} {divergence} {dtype} V={vocab}")
        try:
            results.append(run_case(backend, divergence, dtype, lead, vocab, device))
        except Exception as exc:  # a crashing backend is a failed case, not a crashed sweep
            results.append(Result(backend, divergence, dtype, f"{'x'.join(map(str, lead))}x{vocab}", math.inf,
                                  math.inf, math.inf, math.inf, False, f"{type(exc).__name__}: {exc}"))
    if hasattr(progress, "close"):
        progress.close()
    elapsed = time.perf_counter() - started

    print(format_table(results))
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAIL {r.backend} {r.divergence} {r.dtype} {r.shape}: {r.detail}")
    print(tolerance_table())
    summary = {"cases": len(results), "passed": len(results) - len(failed), "failed": len(failed),
               "seconds": round(elapsed, 2), "device": str(device), "backends": names, "notes": notes}
    print(f"summary: {summary['passed']} passed, {summary['failed']} failed "
          f"({len(results)} cases, {', '.join(names)}; {elapsed:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": [asdict(r) for r in results]}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
