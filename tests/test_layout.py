"""The package's shape (docs/DESIGN.md, "The map"): few modules at the top of distillkit/, no file over
the size limit, and no import cycle between modules (imports inside functions and the implicit import
of a module's parent package included)."""

from __future__ import annotations

import ast
import importlib
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_TOP_MODULES = 12
MAX_LINES = 450


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.split() if (ROOT / line).is_file()]


def _modules() -> dict[str, Path]:
    """distillkit's modules by dotted name (kernels/ is shipped as distillkit.kernels)."""
    mods = {}
    for path in _tracked("distillkit/*.py", "kernels/*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "kernels":
            parts.insert(0, "distillkit")
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                # importing a.b.c runs a.b's __init__ first
                parts = target.split(".")
                for k in range(2, len(parts) + 1):
                    prefix = ".".join(parts[:k])
                    if prefix in mods and prefix != name and not name.startswith(prefix + "."):
                        edges[name].add(prefix)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_import_graph(_modules())) == []


def test_few_modules_at_the_top():
    top = sorted(p.name for p in (ROOT / "distillkit").glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_no_file_over_the_limit():
    sources = _tracked("distillkit", "kernels", "csrc", "tests", "benchmarks")
    too_long = {str(p.relative_to(ROOT)): n for p in sources if p.suffix in (".py", ".h", ".cpp", ".cu", ".cuh")
                for n in [len(p.read_text().splitlines())] if n > MAX_LINES}
    assert not too_long, too_long


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_the_documented_02_import_paths_still_work():
    """The imports the 0.2 README documented, now re-exported from their layers."""
    pytest.importorskip("transformers")  # distillkit.trainer

    for module, names in {
        "distillkit.reference": ["distill_loss"],
        "distillkit.trainer": ["DistillationConfig", "DistillationTrainer", "CurriculumConfig"],
        "distillkit.collect": ["collect_teacher_trajectories"],
        "distillkit.finetune_data": ["build_finetune_jsonl"],
        "distillkit.distributed": ["shutdown", "global_token_count", "world_size"],
        "distillkit.data": ["load_trajectories", "TrajectoryTokenizer", "DistillationCollator"],
        "distillkit.parallel": ["distill_loss_vocab_parallel", "replicated_input", "vocab_shard_range"],
        "distillkit.compat.trl": ["patch_gkd_trainer"],
        "distillkit.compat.torchtune": ["ForwardKLWithChunkedOutputLoss"],
    }.items():
        loaded = importlib.import_module(module)
        for name in names:
            assert hasattr(loaded, name), f"{module}.{name}"
