"""The ``distillkit`` command: train, cache-teacher, demo, compare, bench, env, kernels.

    distillkit train --config run.yaml [--resume] [--set KEY=VALUE]   distill a teacher into a student (YAML)
    distillkit cache-teacher --config run.yaml --out DIR --k K        run the teacher once: a top-k/sampled cache
    distillkit demo [--smoke|--full] [--out DIR]                      agent distillation on a synthetic environment
    distillkit compare [--device cpu|cuda] [--json PATH] [--quick]   every backend vs the float64 reference
    distillkit bench [--run] [--plot out.png] [--results DIR]         benchmark results: table and figure
    distillkit env                                                    what was built, which backends run here, library versions
    distillkit kernels                                                compiled-kernel report (registers, spills)

Each subcommand has its own --help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("distillkit.training.cli", "distill a teacher into a student from a YAML config"),
    "cache-teacher": ("distillkit.training.cache_cli",
                      "run the teacher once over the training data: a top-k or sampled teacher cache"),
    "demo": ("distillkit.demo.cli", "end-to-end agent distillation on a synthetic tool-use environment"),
    "compare": ("distillkit.tools.compare",
                "every available backend against the float64 reference (exit 1 on failure)"),
    "bench": ("distillkit.tools.bench.report", "run or read the benchmark suite; print a table, draw a comparison"),
    "env": ("distillkit.tools.envinfo", "what was built and which backends run here"),
    "kernels": ("distillkit.tools.kernel_report", "register and spill report of the compiled kernels"),
}


def _load(command: str):
    module_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            return None, f"`distillkit {command}` is not available in this installation ({module_name} is missing)"
        raise
    if not hasattr(module, "main"):
        return None, f"`distillkit {command}` is not available: {module_name} has no main()"
    return module.main, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distillkit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1].splitlines()))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)  # the subcommand's own parser handles --help
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    entry, problem = _load(args.command)
    if entry is None:
        print(f"distillkit: {problem}", file=sys.stderr)
        return 2
    code = entry(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
