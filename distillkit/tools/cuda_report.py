"""Ahead-of-time resource report of the CUDA kernels in csrc/ (no GPU needed).

Every ``csrc/*.cu`` file is compiled with ``nvcc -cubin`` for each target
architecture (sm_80 and sm_90), with ptxas' verbose output, and the cubin is read
back with ``cuobjdump --dump-resource-usage``. One row per kernel and arch:
registers, spill bytes (ptxas spill stores/loads and cuobjdump LOCAL), stack and
shared memory. Results are cached by the hash of the sources, flags and compiler
version, so an unchanged tree is not recompiled (``cache=False`` forces it).

    python -m distillkit.tools.cuda_report [--check] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
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


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from the toolkit, PATH, or the one the Triton wheel ships."""
    for home in _cuda_homes():
        if (home / "bin" / "cuobjdump").exists():
            return str(home / "bin" / "cuobjdump")
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(path) if path.exists() else None
    except ImportError:
        return None


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


def compile_one(source: Path, arch: int, workdir: str) -> list[dict]:
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        raise RuntimeError(f"needs nvcc and cuobjdump (found {nvcc}, {cuobjdump})")
    cubin = os.path.join(workdir, f"{source.stem}.sm_{arch}.cubin")
    proc = subprocess.run([nvcc, *nvcc_flags(arch), str(source), "-o", cubin], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {source.name} sm_{arch}:\n{proc.stderr[-4000:]}")
    dump = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True)
    return parse(dump.stdout, proc.stdout + proc.stderr, arch, source.name)


def _cache_key(sources: list[Path], archs) -> str:
    h = hashlib.sha256()
    for path in sorted(csrc_dir().glob("*")):
        if path.suffix in (".cu", ".cuh", ".h"):
            h.update(path.name.encode() + path.read_bytes())
    nvcc = find_nvcc() or ""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    h.update(json.dumps([version, [str(s) for s in sources], list(archs), nvcc_flags(0)]).encode())
    return h.hexdigest()[:24]


def report(archs=ARCHS, sources: Optional[list[Path]] = None, cache: bool = True,
           jobs: Optional[int] = None) -> list[dict]:
    """Rows for every kernel of every .cu file and arch (raises RuntimeError without the toolchain)."""
    sources = sorted(sources or csrc_dir().glob("*.cu"))
    if not sources:
        raise RuntimeError(f"no .cu files under {csrc_dir()}")
    if find_nvcc() is None or find_cuobjdump() is None:
        raise RuntimeError("nvcc or cuobjdump not found")
    cache_file = Path(os.environ.get("DISTILLKIT_CACHE", Path.home() / ".cache" / "distillkit")) / \
        "cuda_report" / f"{_cache_key(sources, archs)}.json"
    if cache and cache_file.exists():
        return json.loads(cache_file.read_text())
    jobs = jobs or max(1, min(len(sources) * len(archs), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(jobs) as pool:
        parts = pool.map(lambda job: compile_one(job[0], job[1], workdir),
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillkit.tools.cuda_report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel spills")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--no-cache", action="store_true", help="recompile even if the sources are unchanged")
    args = parser.parse_args(argv)
    rows = report(cache=not args.no_cache)
    print(format_table(rows))
    spilled = [r for r in rows if r["spill_bytes"]]
    print(f"{len(rows)} CUDA kernels for {', '.join(f'sm_{a}' for a in ARCHS)}; {len(spilled)} spill")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if args.check and spilled else 0


if __name__ == "__main__":
    sys.exit(main())
