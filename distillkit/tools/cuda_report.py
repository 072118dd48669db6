"""Ahead-of-time resource report of the CUDA kernels in csrc/ (no GPU needed).

Every ``csrc/*.cu`` file is compiled with ``nvcc -cubin`` for each target
architecture (sm_80 and sm_90), with ptxas' verbose output, and the cubin is read
back with ``cuobjdump --dump-resource-usage``. One row per kernel and arch:
registers, spill bytes (ptxas spill stores/loads and cuobjdump LOCAL), stack and
shared memory, and (``model``) the per-element GPU model of gpu_model.py on the
kernel's vocabulary loops, read from ``cuobjdump -sass`` (see ``vocab_model``).
Results are cached by the hash of the sources, flags and compiler
version, so an unchanged tree is not recompiled (``cache=False`` forces it).

    python -m distillkit.tools.cuda_report [--check] [--json FILE] [--no-model]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

ARCHS = (80, 90)
# Block sizes the launchers use, for the occupancy column of `distillkit kernels`.
_WARPS = {"forward_stream_kernel": 16, "forward_smem_kernel": 16, "backward_kernel": 8}
_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_PTXAS_FN = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                       r"(\d+) bytes spill loads")
_TEMPLATE = re.compile(r"(?:\w+::)*(\w+)<(\d+), ([\w:]+), ([\w:]+)>")


def csrc_dir() -> Path:
    """The kernel sources: $DISTILLKIT_CSRC, else csrc/ next to the package (source checkouts)."""
    env = os.environ.get("DISTILLKIT_CSRC")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "csrc"


def _cuda_homes():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            yield Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc:
        yield Path(os.path.realpath(nvcc)).parent.parent


def find_nvcc() -> Optional[str]:
    for home in _cuda_homes():
        if (home / "bin" / "nvcc").exists():
            return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_cuobjdump(prefer_triton: bool = False) -> Optional[str]:
    """cuobjdump from the toolkit, PATH, or the one the Triton wheel ships; with prefer_triton the wheel's first
    (it reads the cubins of the wheel's own ptxas, which may be newer than the toolkit's)."""
    spec = importlib.util.find_spec("triton")
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump" if spec and spec.origin else None
    bundled = str(path) if path is not None and path.exists() else None
    if prefer_triton and bundled:
        return bundled
    for home in _cuda_homes():
        if (home / "bin" / "cuobjdump").exists():
            return str(home / "bin" / "cuobjdump")
    return shutil.which("cuobjdump") or bundled


# What torch.utils.cpp_extension adds to every nvcc command of the extension build
# (COMMON_NVCC_FLAGS); spelled out so that this module does not import cpp_extension,
# which guesses (and warns about) CUDA_HOME at import.
TORCH_NVCC_FLAGS = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr")


def nvcc_flags(arch: int) -> list[str]:
    """The extension's device flags (setup.py + torch's defaults) for one real architecture."""
    import torch

    torch_include = Path(torch.__file__).parent / "include"
    includes = [f"-I{torch_include}", f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}",
                f"-I{csrc_dir()}"]
    return ["-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++20", "-Xptxas=-v", *TORCH_NVCC_FLAGS, *includes]


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _split_name(pretty: str) -> tuple[str, str]:
    """('forward_stream_kernel', 'div=1 student=float teacher=__half') from the demangled name."""
    m = _TEMPLATE.search(pretty)
    if not m:
        return pretty.split("(")[0], "cuda"
    return m.group(1), f"div={m.group(2)} student={m.group(3)} teacher={m.group(4)}"


def parse(cuobjdump_text: str, ptxas_text: str, arch: int, source: str) -> list[dict]:
    """Rows from `cuobjdump --dump-resource-usage` and `ptxas -v` output of one cubin."""
    spills = {m.group(1): (int(m.group(3)), int(m.group(4))) for m in _PTXAS_FN.finditer(ptxas_text)}
    found = _RESOURCE.findall(cuobjdump_text)
    pretty = _demangle([f[0] for f in found])
    rows = []
    for mangled, reg, stack, shared, local in found:
        kernel, variant = _split_name(pretty[mangled])
        stores, loads = spills.get(mangled, (0, 0))
        rows.append({
            "kernel": kernel, "variant": variant, "arch": f"sm_{arch}", "source": source, "mangled": mangled,
            "registers": int(reg), "stack_bytes": int(stack), "shared_bytes": int(shared),
            "local_bytes": int(local), "spill_stores": stores, "spill_loads": loads,
            "spill_bytes": max(int(local), stores, loads), "num_warps": _WARPS.get(kernel, 8),
        })
    return rows


# -- the per-element model of the vocabulary loops ------------------------------------------------
# A CUDA kernel's loops are found as gpu_model finds the Triton ones (a backward branch), but these
# loops hold cold paths too (the masked edge groups, the rescale when the running max moves, CE's
# own exponentials when T != 1), so each is counted along its hot path: the fewest instructions
# from the loop head to its back-edge that still issue every 128-bit load and store of the loop
# (the whole, aligned group). That path is the steady state at T = 1 with CE sharing the student's
# sums (or no CE): forward no new max, backward no NaN row. kVec = 8 elements per group. (So a cold
# path must hold no 16-byte access: the kernels' masked edge groups go element by element.)
KVEC = 8
MODEL_VERSION = 1  # in the cache key: a change of the model recompiles
_VECTOR = ("LDG.128", "STG.128", "LDS.128", "STS.128")
_GUARD = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+@(!?)U?P(T|\d)", re.MULTILINE)
_OPERAND_PRED = re.compile(r"^!?U?P[T0-9]+\s*,")


def _guarded(body: str) -> set[int]:
    """Addresses of the instructions under a predicate (not @PT) in one function's SASS."""
    return {int(m.group(1), 16) for m in _GUARD.finditer(body) if not (m.group(3) == "T" and not m.group(2))}


def hot_path(instructions: list, lo: int, hi: int, guarded: set[int]) -> list:
    """The instructions of the shortest path from `lo` to the back-edge at `hi` that passes every
    128-bit global/shared access of [lo, hi] (a forward-edge DAG: branches leaving the range are
    not followed; NOPs cost nothing). Raises ValueError when no such path exists."""
    from .gpu_model import memory_key

    ins = [i for i in instructions if lo <= i.address <= hi]
    required = [i.address for i in ins if memory_key(i.opcode) in _VECTOR]
    leaders = {lo} | {i.target for i in ins if i.target is not None and lo < i.target <= hi}
    ends = {j + 1 for j, i in enumerate(ins) if i.opcode.split(".")[0] in ("BRA", "EXIT", "RET", "BRX", "JMP")}
    blocks, cur = [], []
    for j, i in enumerate(ins):
        if cur and (i.address in leaders or j in ends):
            blocks.append(cur)
            cur = []
        cur.append(i)
    blocks.append(cur)
    start_of = {b[0].address: k for k, b in enumerate(blocks)}
    inf = float("inf")
    dist, prev = [inf] * len(blocks), [None] * len(blocks)
    dist[0] = 0

    def edge(a: int, b: int):
        skipped = (blocks[a][-1].address, blocks[b][0].address)
        if b > a and not any(skipped[0] < r < skipped[1] for r in required):
            cost = dist[a] + sum(i.opcode != "NOP" for i in blocks[a])
            if cost < dist[b]:
                dist[b], prev[b] = cost, a

    for k, block in enumerate(blocks):
        if dist[k] == inf or k == len(blocks) - 1:
            continue
        last = block[-1]
        base = last.opcode.split(".")[0]
        conditional = last.address in guarded or bool(_OPERAND_PRED.match(last.operands))
        if base in ("BRA", "JMP", "BRX") and last.target is not None:
            if last.target in start_of:
                edge(k, start_of[last.target])
            if conditional:
                edge(k, k + 1)
        elif base not in ("EXIT", "RET") or conditional:
            edge(k, k + 1)
    k = len(blocks) - 1
    if dist[k] == inf:
        raise ValueError(f"no path from {lo:#x} to {hi:#x} through every 128-bit access")
    path = []
    while k is not None:
        path[:0] = blocks[k]
        k = prev[k]
    return [i for i in path if i.opcode != "NOP"]


def _vectors_per_group(ctype: str) -> int:
    return 2 if ctype == "float" else 1  # 8 fp32 elements: two 16-byte accesses


def vocab_model(instructions: list, guarded: set[int], kernel: str, div: int, student: str, teacher: str,
                arch: int) -> dict | None:
    """gpu_model's per-element figures and modeled time for one kernel specialization's vocabulary loops.

    The vocabulary loops are the innermost loops whose 128-bit loads (LDG/LDS) number a multiple of the
    group's (student, and teacher when div != 0): that skips CE's tail over [div_vocab, V) (student only)
    and the block reductions' loops (none). Each is counted along its hot path (`hot_path`), divided by its
    unroll (loads / the group's). Forward: the first is pass 1 and the others pass 2, one copy per
    alpha-beta form (the costliest is taken): the two passes add. Backward: one loop per form, the
    costliest. Memory: the [N, V] tensors streamed (student, teacher, grad for the backward), twice for the
    two-pass streaming forward."""
    from . import gpu_model

    heads: dict = {}
    for i in instructions:
        if i.target is not None and i.target < i.address:
            heads[i.target] = max(heads.get(i.target, 0), i.address)
    per_group = _vectors_per_group(student) + (_vectors_per_group(teacher) if div else 0)
    loops = []
    for lo, hi in sorted(heads.items()):
        if any((c, d) != (lo, hi) and lo <= c and d <= hi for c, d in heads.items()):
            continue  # not innermost
        loads = sum(gpu_model.memory_key(i.opcode) in ("LDG.128", "LDS.128") for i in instructions
                    if lo <= i.address <= hi)
        if loads and loads % per_group == 0:
            try:
                path = hot_path(instructions, lo, hi, guarded)
            except ValueError:  # no such path: count the whole loop, as gpu_model does
                path = [i for i in instructions if lo <= i.address <= hi and i.opcode != "NOP"]
            loops.append((gpu_model.loop_counts(path), loads // per_group))
    if not loops:
        return None
    if kernel == "backward_kernel":
        parts = [max(loops, key=lambda lu: lu[0].instructions / lu[1])]
    else:
        parts = loops[:1] + ([max(loops[1:], key=lambda lu: lu[0].instructions / lu[1])] if len(loops) > 1 else [])
    counts = _per_group(parts, len(loops))
    sizes = {"student": _CUDA_DTYPES[student]}
    if div:
        sizes["teacher"] = _CUDA_DTYPES[teacher]
    if kernel == "backward_kernel":
        sizes["grad"] = _CUDA_DTYPES[student]
    passes = 2 if kernel == "forward_stream_kernel" and len(parts) == 2 else 1
    nbytes = gpu_model.streamed_bytes(sizes, passes)
    warps = _WARPS.get(kernel, 8)
    block = KVEC * 32 * warps  # one group per thread per iteration
    t = gpu_model.model_time(gpu_model.GPUS[arch], counts, block, warps, nbytes)
    out = gpu_model.summary(counts, block, warps)
    out["global_accesses"] = ", ".join(f"{n:g}x{k}" for k, n in counts.memory.items() if k[:3] in ("LDG", "STG"))
    out.update({"passes": len(parts), "bytes_per_element": nbytes, "mufu_per_group": counts.mufu,
                "memory_ms": t.memory_ms, "mufu_ms": t.mufu_ms, "issue_ms": t.issue_ms, "time_ms": t.time_ms,
                "bound": t.bound, "gpu": t.gpu})
    return out


def _per_group(loops: list, found: int):
    """One LoopCounts per group of 8 elements: each loop's (counts, unroll) divided by its unroll, summed."""
    from .gpu_model import LoopCounts

    def total(get) -> dict:
        keys = {k for c, _ in loops for k in get(c)}
        return {k: sum(get(c).get(k, 0) / u for c, u in loops) for k in sorted(keys)}

    return LoopCounts(found, sum(c.instructions / u for c, u in loops), total(lambda c: c.classes),
                      total(lambda c: c.memory), total(lambda c: c.mufu), sum(c.fmnmx / u for c, u in loops))


def sass_models(sass: str, arch: int) -> dict[str, dict]:
    """{mangled kernel name: vocab_model} for every kernel in a cubin's `cuobjdump -sass` text."""
    from . import gpu_model

    functions = gpu_model.parse_sass(sass)
    starts = [(m.start(), m.group(1)) for m in gpu_model._FUNCTION.finditer(sass)]
    bodies = {name: sass[a:starts[k + 1][0] if k + 1 < len(starts) else len(sass)]
              for k, (a, name) in enumerate(starts)}
    pretty = _demangle(list(functions))
    out = {}
    for name, instructions in functions.items():
        m = _TEMPLATE.search(pretty[name])
        if not m or not instructions:
            continue
        model = vocab_model(instructions, _guarded(bodies.get(name, "")), m.group(1), int(m.group(2)),
                            m.group(3).split("::")[-1], m.group(4).split("::")[-1], arch)
        if model:
            out[name] = model
    return out


def compile_one(source: Path, arch: int, workdir: str, model: bool = True) -> list[dict]:
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"needs nvcc and cuobjdump (found {nvcc}, {cuobjdump})")
    cubin = os.path.join(workdir, f"{source.stem}.sm_{arch}.cubin")
    proc = subprocess.run([nvcc, *nvcc_flags(arch), str(source), "-o", cubin], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source.name} sm_{arch}:\n{proc.stderr[-4000:]}")
    dump = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True)
    rows = parse(dump.stdout, proc.stdout + proc.stderr, arch, source.name)
    if model:
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
        models = sass_models(sass, arch)
        for row in rows:
            row["model"] = models.get(row["mangled"])
    return rows


def _cache_key(sources: list[Path], archs, model: bool = True) -> str:
    h = hashlib.sha256()
    for path in sorted(csrc_dir().glob("*")):
        if path.suffix in (".cu", ".cuh", ".h"):
            h.update(path.name.encode() + path.read_bytes())
    nvcc = find_nvcc() or ""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    h.update(json.dumps([version, [str(s) for s in sources], list(archs), nvcc_flags(0),
                         MODEL_VERSION if model else 0]).encode())
    return h.hexdigest()[:24]


def report(archs=ARCHS, sources: Optional[list[Path]] = None, cache: bool = True,
           jobs: Optional[int] = None, model: bool = True) -> list[dict]:
    """Rows for every kernel of every .cu file and arch (raises RuntimeError without the toolchain);
    with `model`, each row's "model" holds vocab_model's figures (None for a kernel without them)."""
    sources = sorted(sources or csrc_dir().glob("*.cu"))
    if not sources:
        raise RuntimeError(f"no .cu files under {csrc_dir()}")
    if find_nvcc() is None or find_cuobjdump() is None:
        raise RuntimeError("nvcc or cuobjdump not found")
    cache_file = Path(os.environ.get("DISTILLKIT_CACHE", Path.home() / ".cache" / "distillkit")) / \
        "cuda_report" / f"{_cache_key(sources, archs, model)}.json"
    if cache and cache_file.exists():
        return json.loads(cache_file.read_text())
    jobs = jobs or max(1, min(len(sources) * len(archs), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(jobs) as pool:
        parts = pool.map(lambda job: compile_one(job[0], job[1], workdir, model),
                         [(s, a) for s in sources for a in archs])
        rows = [row for part in parts for row in part]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(rows))
    except OSError:
        pass  # a read-only home only costs the next run a recompile
    return rows


_SWITCH = re.compile(r"\b(DIVERGENCE|div|TAIL)=(\d+)\b")
_CUDA_DTYPES = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}  # the C++ types of the templates


def _switch_name(match: re.Match) -> str:
    from ..core.divergences import NO_DIVERGENCE, from_id
    from ..sparse.tails import tail_from_id

    key, value = match.group(1), int(match.group(2))
    try:
        if key == "TAIL":
            name = tail_from_id(value).name
        else:
            name = "none" if value == NO_DIVERGENCE else from_id(value).name
    except ValueError:
        return match.group(0)  # an id the registries do not know: show it as it is
    return f"{key}={name}"


def readable_variant(variant: str) -> str:
    """A variant with divergence and tail names for their ids (from the registries, core.divergences and
    sparse.tails) and fp32/fp16/bf16 for the CUDA templates' C++ types; `distillkit kernels` shows these."""
    variant = _SWITCH.sub(_switch_name, variant)
    return " ".join(f"{k}={_CUDA_DTYPES.get(v, v)}" if k in ("student", "teacher") else part
                    for part in variant.split() for k, _, v in [part.partition("=")])


def format_columns(header: list[str], body: list[list[str]], right: set[int] = frozenset()) -> str:
    """A plain-text table, each column as wide as its longest cell (nothing is cut); columns in `right`
    right-aligned."""
    widths = [max([len(h), *(len(row[i]) for row in body)]) for i, h in enumerate(header)]

    def line(cells):
        return " ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(header), "-" * (sum(widths) + len(widths) - 1)]
    lines += [line(row).rstrip() for row in body]
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    body = [[r["kernel"], readable_variant(r["variant"]), r["arch"], str(r["registers"]),
             str(r["spill_stores"] + r["spill_loads"]), str(r["local_bytes"]), str(r["shared_bytes"])]
            for r in sorted(rows, key=lambda r: (r["kernel"], r["variant"], r["arch"]))]
    return format_columns(["kernel", "variant", "arch", "regs", "spill", "local", "smem"], body, right={3, 4, 5, 6})


def format_model_table(rows: list[dict]) -> str:
    """One line per CUDA kernel and variant: the sm_90 hot-path counts per element and per group, the modeled
    H100 (from the sm_90 SASS) and A100 (from the sm_80 SASS) times at N = 16384, V = 131072."""
    by_key: dict = {}
    for r in rows:
        if r.get("model"):
            by_key.setdefault((r["kernel"], r["variant"]), {})[r["arch"]] = r["model"]
    body = []
    for (kernel, variant), archs in sorted(by_key.items()):
        m = archs.get("sm_90") or next(iter(archs.values()))
        times = [f"{a['time_ms']:.2f} {a['bound']}" if a else "-" for a in (archs.get("sm_90"), archs.get("sm_80"))]
        body.append([kernel, readable_variant(variant), str(m["passes"]), f"{m['instructions_per_element']:.1f}",
                     f"{m['mufu_per_element']:.2f}", f"{m['integer_per_element']:.1f}",
                     f"{m['shuffles_per_iteration']:g}, {m['barriers_per_iteration']:g}",
                     m["global_accesses"] or "-", f"{m['memory_ms']:.2f}", f"{m['issue_ms']:.2f}", *times])
    return format_columns(["kernel", "variant", "passes", "instr/elem", "MUFU/elem", "int/elem", "SHFL, BAR/group",
                           "global accesses/group", "H100 mem ms", "H100 issue ms", "H100 ms", "A100 ms"], body,
                          right={2, 3, 4, 5, 8, 9})


MODEL_NOTE = ("Modeled, not measured (gpu_model.py): static counts along each vocabulary loop's hot path (a whole,\n"
              "aligned group of 8 elements per thread; T = 1 with CE sharing the student's exponentials; no new\n"
              "running max), per element = per group / 8; forward = pass 1 + pass 2; N = 16384, V = 131072.")


def print_model_table(rows: list[dict] | None = None) -> None:
    """The model table and its note (the report's rows, compiled or cached, by default)."""
    rows = report() if rows is None else rows
    print(format_model_table(rows))
    print(MODEL_NOTE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillkit.tools.cuda_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel spills")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--no-cache", action="store_true", help="recompile even if the sources are unchanged")
    parser.add_argument("--no-model", action="store_true", help="skip the SASS counts and modeled GPU times")
    args = parser.parse_args(argv)
    rows = report(cache=not args.no_cache, model=not args.no_model)
    print(format_table(rows))
    spilled = [r for r in rows if r["spill_bytes"]]
    print(f"{len(rows)} CUDA kernels for {', '.join(f'sm_{a}' for a in ARCHS)}; {len(spilled)} spill")
    if not args.no_model:
        print()
        print_model_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if args.check and spilled else 0


if __name__ == "__main__":
    sys.exit(main())
