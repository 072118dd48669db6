"""The ``distillkit`` command: one subcommand per entry of COMMANDS, each with its own --help.

`distillkit --help` lists every command on one line (COMMANDS' one-liner) and how each is usually
called (USAGE); both come from the tables below, so a new command goes into both.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with main(argv), one-line description). Keep the line short: `--help` fits 80 columns.
COMMANDS = {
    "train": ("distillkit.training.cli", "distill a teacher into a student from a YAML config"),
    "cache-teacher": ("distillkit.training.cache_cli", "run the teacher once: a top-k or sampled cache"),
    "demo": ("distillkit.demo.cli", "agent distillation on a synthetic tool-use environment"),
    "compare": ("distillkit.tools.compare", "every backend vs the float64 reference (exit 1 on failure)"),
    "bench": ("distillkit.tools.bench.report", "run or read the benchmarks: tables and a figure"),
    "env": ("distillkit.tools.envinfo", "what was built, which backends run here, versions"),
    "kernels": ("distillkit.tools.kernel_report", "compiled-kernel report: registers, spills, modeled GPU time"),
}
# name -> the usual arguments (the epilog of `distillkit --help`).
USAGE = {
    "train": "--config run.yaml [--resume] [--set KEY=VALUE]",
    "cache-teacher": "--config run.yaml --out DIR --k K [--mode topk|sample] [--resume]",
    "demo": "[--smoke|--full] [--out DIR]",
    "compare": "[--device cpu|cuda] [--json PATH] [--quick]",
    "bench": "[--run [--size quick|default|full] [--verbose]] [--plot PNG] [--markdown]",
    "env": "",
    "kernels": "[--check] [--json PATH] [--no-cuda] [--no-model]",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The command list one line per command: the help column starts after the longest name (argparse
    measures the subcommands one indent short, and would put the longest one's help on the next line)."""

    def __init__(self, prog: str):
        longest = max(map(len, COMMANDS))
        super().__init__(prog, max_help_position=longest + 6)
        self._action_max_length = longest + 4  # the names are listed 4 columns in


def build_parser() -> argparse.ArgumentParser:
    epilog = "\n".join(["usage of each command (details: distillkit COMMAND --help):",
                        *(f"  distillkit {name} {USAGE.get(name, '')}".rstrip() for name in COMMANDS)])
    parser = argparse.ArgumentParser(prog="distillkit", formatter_class=_HelpFormatter, epilog=epilog,
                                     description=f"The distillkit command: {', '.join(COMMANDS)}.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)  # the subcommand's own parser handles --help
    return parser


def _load(command: str):
    module_name = COMMANDS[command][0]
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
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    entry, problem = _load(args.command)
    if entry is None:
        print(f"distillkit: {problem}", file=sys.stderr)
        return 2
    code = entry(rest)
    if args.command == "kernels":
        _cuda_model_table(rest)
    return int(code or 0)


def _cuda_model_table(rest: list[str]) -> None:
    """After `distillkit kernels`' tables: the CUDA kernels' per-element model (distillkit.tools.cuda_report,
    from the rows the report just compiled or cached), unless --no-cuda or --no-model."""
    if {"-h", "--help", "--no-cuda", "--no-model"} & set(rest):
        return
    try:
        from distillkit.tools import cuda_report

        rows = cuda_report.report()
    except Exception as e:  # noqa: BLE001 - the Triton report above has already said why, if it could not
        print(f"CUDA kernel model unavailable: {e}")
        return
    print()
    cuda_report.print_model_table(rows)


if __name__ == "__main__":
    sys.exit(main())
