"""Subprocess entry point of the benchmarks: ``python -m distillkit.tools.bench.child '<json spec>'``.

Tasks:
  {"task": "rss", "provider": NAME, "case": {...}, "mode": MODE}
      peak RSS of one step above the RSS before it (CPU; a fresh process per measurement)
  {"task": "traffic", "provider": NAME, "cases": [{...}, ...]}
      forward and backward traffic per case (run with TRITON_INTERPRET=1 so Triton lanes count)

Prints one line ``DISTILLKIT_BENCH_RESULT <json>`` at the end.
"""

from __future__ import annotations

import json
import sys
import warnings


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    warnings.filterwarnings("ignore")
    import torch

    from . import measure
    from . import providers as P
    from .cases import Case

    torch.manual_seed(0)
    provider = P.get(spec["provider"])
    if spec["task"] == "rss":
        case = Case(**spec["case"])
        reason = provider.unavailable(case, "cpu", "memory")
        if reason:
            result = {"error": reason, "skipped": True}
        else:
            loss_fn, inputs = measure.prepare(provider, case, "cpu")
            result = measure.rss_step(loss_fn, inputs, spec["mode"])
    elif spec["task"] == "traffic":
        result = {}
        for raw in spec["cases"]:
            case = Case(**raw)
            reason = provider.unavailable(case, "cpu", "traffic")
            if reason:
                result[case.label] = {"error": reason, "skipped": True}
                continue
            try:
                result[case.label] = measure.count_case(provider.build(case), case)
            except Exception as exc:  # a peer failing on this case: record it, go on
                result[case.label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    else:
        raise ValueError(f"unknown task {spec['task']!r}")
    print(measure.RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
