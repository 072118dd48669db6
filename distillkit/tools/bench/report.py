"""``distillkit bench``: run or read the benchmark suite's results, print tables, draw a comparison.

    distillkit bench                          # read bench-results/results.json, print the tables
    distillkit bench --run [--size quick]     # run `pytest benchmarks/` first (source checkout only),
                                              # a progress bar per case; --verbose: pytest's output too
    distillkit bench --plot out.png           # and draw traffic / peak memory / time per provider
    distillkit bench --markdown               # the tables as Markdown (docs/PERFORMANCE.md is made of them)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .rows import DEFAULT_DIR, read_rows

METRICS = [("traffic_units", "traffic (units)", "{:.2f}"), ("modeled_h100_time", "H100 time, modeled (ms)", "{:.3f}"),
           ("peak_memory", "peak memory (MiB)", "{:.1f}"), ("time", "time (ms)", "{:.2f}"),
           ("achieved_bandwidth", "bandwidth (GB/s)", "{:.0f}"), ("fraction_of_peak_bandwidth", "of peak", "{:.0%}")]
PROVIDER_ORDER = ["distillkit-triton", "distillkit-cuda", "distillkit-cpu", "distillkit-torch", "eager", "reference",
                  "compile", "liger", "trl", "torchtune"]


def _provider_key(name: str) -> tuple:
    return (PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER), name)


def benchmarks_dir() -> Optional[Path]:
    root = Path(__file__).resolve().parents[3]
    path = root / "benchmarks"
    return path if (path / "conftest.py").exists() else None


def suite_command(bench: Path, results: str, size: str, extra: list[str], verbose: bool) -> list[str]:
    """The pytest command line of `--run`: pytest-benchmark's summary only with --verbose (and narrowed to a
    few columns unless `extra` picks them)."""
    cmd = [sys.executable, "-m", "pytest", str(bench), "-q", "-p", "no:cacheprovider", f"--bench-size={size}",
           f"--bench-dir={results}"]
    if not verbose:
        cmd.append("--benchmark-quiet")
    elif not any(arg.startswith("--benchmark-columns") for arg in extra):
        cmd.append("--benchmark-columns=min,median,max,rounds")
    return [*cmd, *extra]


def run_suite(results: str, size: str, extra: list[str], *, verbose: bool = False, progress: bool = True) -> int:
    """Run `pytest benchmarks/` with a progress bar (one step per case) on stderr. Its output is shown when
    it fails, or with `verbose`; otherwise only a one-line summary."""
    from .progress import make_bar, run_pytest

    bench = benchmarks_dir()
    if bench is None:
        print("distillkit bench --run: the benchmarks/ directory is not here (it ships with the source "
              "checkout, not the wheel); run `pytest benchmarks/` from a checkout", file=sys.stderr)
        return 2
    cmd = suite_command(bench, results, size, extra, verbose)
    if verbose:
        print("running:", " ".join(cmd), flush=True)
    started = time.perf_counter()
    code, output, summary = run_pytest(cmd, cwd=str(bench.parent), bar=make_bar(f"bench ({size})", not progress))
    if code not in (0, 5):
        print(output.rstrip(), file=sys.stderr)
        print(f"distillkit bench: `{' '.join(cmd)}` exited {code} ({summary})", file=sys.stderr)
        return code
    if verbose:
        print(output.rstrip(), flush=True)
    print(f"distillkit bench: {summary} in {time.perf_counter() - started:.0f} s; results in {results}/",
          file=sys.stderr, flush=True)
    return code


def group_rows(rows: list[dict]):
    """{(op, shape, n, v, dtype, mode): {provider: {metric: row}}}, ok rows only; and the skip reasons."""
    table = defaultdict(lambda: defaultdict(dict))
    skipped = {}
    for row in rows:
        key = (row["op"], row["shape"], row["n"], row["v"], row["dtype"], row["mode"])
        if row["metric"] == "modeled_h100_time":  # modeled at the nominal shape: file it under the measured one
            key = next((k for k in table if k[0] == row["op"] and k[1] == row["shape"] and k[4] == row["dtype"]
                        and k[5] == row["mode"]), key)
        if row["status"] == "ok":
            table[key][row["provider"]][row["metric"]] = row
        else:
            skipped.setdefault((row["provider"], row["note"]), []).append(row)
    return table, skipped


def format_tables(rows: list[dict], *, markdown: bool = False, modes=("forward+backward",)) -> str:
    table, skipped = group_rows(rows)
    out = []
    if rows:
        first = rows[0]
        out.append(f"device: {first['device']}; torch {first['torch']}; triton {first['triton']}; "
                   f"commit {first['commit']}")
    for key in sorted(table, key=lambda k: (k[0], k[1], k[4], k[5])):
        op, shape, n, v, dtype, mode = key
        if mode not in modes:
            continue
        providers = sorted(table[key], key=_provider_key)
        metrics = [m for m in METRICS if any(m[0] in table[key][p] for p in providers)]
        if not metrics:
            continue
        nominal = max((r.get("nominal_n") or n) for p in providers for r in table[key][p].values())
        title = f"{op}, {dtype}, {mode}, N={n} V={v}" + (f" (nominal N={nominal})" if nominal != n else "")
        header = ["provider"] + [label for _, label, _ in metrics]
        body = []
        for p in providers:
            cells = [p]
            for metric, _, fmt in metrics:
                row = table[key][p].get(metric)
                cells.append(fmt.format(row["value"]) if row and row["value"] is not None else "-")
            body.append(cells)
        out.append("")
        out.extend(_render(title, header, body, markdown))
    if skipped:
        out.append("")
        out.append("### Not measured" if markdown else "not measured:")
        for (provider, note), skipped_rows in sorted(skipped.items()):
            if "does not implement" in note:
                continue  # the op is outside the provider's scope: not news
            metrics = sorted({r["metric"] for r in skipped_rows})
            out.append(f"- {provider} ({', '.join(metrics)}): {note}")
    return "\n".join(out)


def format_summary(rows: list[dict], metric: str, *, markdown: bool = False, shape: Optional[str] = None,
                   fmt: str = "{:.2f}") -> str:
    """One table per metric: rows (op, dtype), columns providers, cells "forward / backward / total"
    (forward+backward only where the other modes were not measured), at `shape` (default: the largest)."""
    cells = defaultdict(dict)
    providers = set()
    chosen = {}
    for row in rows:
        if row["metric"] != metric or row["status"] != "ok" or (shape and row["shape"] != shape):
            continue
        key = (row["op"], row["dtype"])
        size = row["n"] * row["v"]
        if key in chosen and chosen[key][0] > size:
            continue
        if key not in chosen or chosen[key][0] < size:  # a larger shape replaces what was kept
            chosen[key] = (size, row["shape"], row["n"], row["v"])
            cells[key] = {}
        providers.add(row["provider"])
        cells[key].setdefault(row["provider"], {})[row["mode"]] = row["value"]
    providers = sorted(providers, key=_provider_key)
    header = ["op", "dtype", "N x V"] + providers
    body = []
    for key in sorted(cells):
        _, _, n, v = chosen[key]
        line = [key[0], key[1], f"{n}x{v}"]
        for p in providers:
            modes = cells[key].get(p, {})
            parts = [modes.get(m) for m in ("forward", "backward", "forward+backward")]
            if all(x is not None for x in parts):
                line.append(" / ".join(fmt.format(x) for x in parts))
            elif parts[2] is not None:
                line.append(fmt.format(parts[2]))
            else:
                line.append("-")
        body.append(line)
    title = f"{metric}: forward / backward / forward+backward" if any(" / " in c for r in body for c in r) \
        else f"{metric}: forward+backward"
    return "\n".join(_render(title, header, body, markdown))


def _render(title: str, header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return lines + [""]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [title, "  " + "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return lines


def plot(rows: list[dict], path: str, mode: str = "forward+backward") -> str:
    """Bars per provider: traffic units, peak memory, time; one group per (op, dtype) at the largest shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, _ = group_rows(rows)
    panels = [("traffic_units", "traffic (units of one [N, V] tensor)"), ("peak_memory", "peak memory (MiB)"),
              ("time", "time (ms)")]
    fig = plt.figure(figsize=(16, 10))
    grid = fig.add_gridspec(2, 2)
    axes = [fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])]
    everyone = sorted({p for by_provider in table.values() for p in by_provider}, key=_provider_key)
    colors = {p: f"C{i % 10}" for i, p in enumerate(everyone)}
    for ax, (metric, label) in zip(axes, panels):
        largest = {}  # (op, dtype) -> the largest shape measured for it
        for (op, shape, n, v, dtype, m), by_provider in table.items():
            if m == mode and any(metric in metrics for metrics in by_provider.values()):
                if n * v > largest.get((op, dtype), (0, None))[0]:
                    largest[(op, dtype)] = (n * v, (op, shape, n, v, dtype, m))
        entries, groups = {}, []
        for (op, dtype), (_, key) in sorted(largest.items()):
            group = f"{op} {dtype}\n{key[2]}x{key[3]}"
            groups.append(group)
            entries[group] = {p: ms[metric]["value"] for p, ms in table[key].items() if metric in ms}
        providers = sorted({p for g in groups for p in entries[g]}, key=_provider_key)
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            xs = [j + i * width for j, g in enumerate(groups) if provider in entries[g]]
            ys = [entries[g][provider] for g in groups if provider in entries[g]]
            ax.bar(xs, ys, width, label=provider, color=colors[provider])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=7, rotation=30, ha="right")
        ax.set_title(label)
        if metric == "time":
            ax.set_yscale("log")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in everyone]
    fig.legend(handles, everyone, loc="lower center", ncol=len(everyone), fontsize=8)
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"distillkit vs eager / compile / peers, {mode} — {device}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distillkit bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=DEFAULT_DIR, help=f"results directory (default {DEFAULT_DIR}/)")
    parser.add_argument("--run", action="store_true", help="run `pytest benchmarks/` first")
    parser.add_argument("--size", choices=["quick", "default", "full"], default="default",
                        help="benchmark matrix for --run")
    parser.add_argument("--plot", metavar="PNG", help="draw the comparison to this file (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--summary", metavar="METRIC", action="append",
                        help="instead of the per-case tables, one table of METRIC (e.g. traffic_units, time, "
                             "peak_memory) with op x dtype rows and provider columns (repeatable)")
    parser.add_argument("--mode", action="append", choices=["forward", "backward", "forward+backward"],
                        help="modes to tabulate (default forward+backward; repeatable)")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="with --run: also print pytest's and pytest-benchmark's own output")
    parser.add_argument("--no-progress", action="store_true", help="with --run: no progress bar")
    args, extra = parser.parse_known_args(argv)
    if args.run:
        code = run_suite(args.results, args.size, extra, verbose=args.verbose, progress=not args.no_progress)
        if code not in (0, 5):
            return code
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rows = read_rows(args.results)
    except FileNotFoundError:
        print(f"distillkit bench: no results in {args.results}/ (run `distillkit bench --run` or "
              f"`pytest benchmarks/`)", file=sys.stderr)
        return 2
    if args.summary:
        for metric in args.summary:
            print(format_summary(rows, metric, markdown=args.markdown))
            print()
    else:
        print(format_tables(rows, markdown=args.markdown, modes=tuple(args.mode or ["forward+backward"])))
    if args.plot:
        try:
            print(f"wrote {plot(rows, args.plot)}")
        except ImportError:
            print("distillkit bench --plot needs matplotlib (pip install 'distillkit[plot]')", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
