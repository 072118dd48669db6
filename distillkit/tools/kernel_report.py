"""Ahead-of-time compilation report of every shipped GPU kernel, for sm_80 and sm_90.

Triton specializations are compiled with `triton.compile` for an explicit
`GPUTarget` (no GPU needed) and their cubins read with `cuobjdump
--dump-resource-usage` (registers, spill/local bytes, shared memory); the CUDA
kernels of the extension come from `distillkit.tools.cuda_report` when nvcc is present.
`distillkit kernels` prints the table; `--check` exits non-zero on any spill.

Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler);
`main` re-executes itself in a clean subprocess when it is set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import NamedTuple

from ..core.divergences import IDS, NO_DIVERGENCE, TOPK_NAMES, TWO_PASS_IDS

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
# Per-SM limits used for the occupancy estimate: (registers, max warps, shared bytes).
SM_LIMITS = {80: (65536, 64, 164 * 1024), 90: (65536, 64, 228 * 1024)}
_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class KernelResources:
    kernel: str
    variant: str
    arch: str
    registers: int
    spill_bytes: int  # LOCAL: per-thread local memory, where spilled registers go
    stack_bytes: int
    shared_bytes: int
    num_warps: int
    occupancy: float  # resident warps / max warps per SM implied by registers, warps and shared memory


def occupancy(arch: int, registers: int, num_warps: int, shared: int) -> float:
    reg_file, max_warps, smem = SM_LIMITS[arch]
    regs_per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    blocks = min(reg_file // max(regs_per_warp * num_warps, 1), max_warps // num_warps,
                 smem // shared if shared else 10**9, 32)
    return round(blocks * num_warps / max_warps, 3)


class Specialization(NamedTuple):
    module: str  # under distillkit.kernels
    kernel: str
    constexprs: dict
    pointer_dtypes: dict  # argument name -> Triton dtype, for the pointers whose dtype varies
    num_warps: int

    @property
    def variant(self) -> str:
        parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items()
                 if k not in ("BLOCK_V",)]
        parts += [f"{k.replace('_ptr', '')}={v}" for k, v in self.pointer_dtypes.items()]
        return " ".join(parts)


def _distill_specializations():
    from ..core.backends.triton_rows import BACKWARD_CONFIG, FORWARD_CONFIG

    for kernel, config in (("distill_forward_kernel", FORWARD_CONFIG), ("distill_backward_kernel", BACKWARD_CONFIG)):
        for divergence, with_ce in itertools.product((NO_DIVERGENCE, *IDS.values()), (False, True)):
            if divergence == 0 and not with_ce:
                continue  # nothing to compute; the functional layer never launches it
            for student_dtype, teacher_dtype in itertools.product(DTYPES, DTYPES):
                if divergence == 0 and teacher_dtype != student_dtype:
                    continue  # the teacher is not read
                dtypes = {"student_ptr": student_dtype, "teacher_ptr": teacher_dtype}
                if kernel == "distill_backward_kernel":
                    dtypes["grad_ptr"] = student_dtype
                yield Specialization("distill", kernel, dict(DIVERGENCE=divergence, WITH_CE=with_ce,
                                                             BLOCK_V=config["BLOCK_V"]), dtypes, config["num_warps"])


def _topk_specializations():
    from ..sparse.tails import TAIL_REGISTRY
    from ..sparse.topk_ops import BLOCK_K_SIZES, BLOCK_V, CE_ONLY_TAIL, NUM_WARPS, kernel_switches

    for kernel in ("topk_forward_kernel", "topk_backward_kernel"):
        for divergence, tail, with_ce in itertools.product((NO_DIVERGENCE, *(IDS[n] for n in TOPK_NAMES)),
                                                           TAIL_REGISTRY, (False, True)):
            if divergence == 0 and (tail.id != CE_ONLY_TAIL or not with_ce):
                continue  # CE only runs as one tail; nothing at all is never launched
            if divergence != 0 and divergence not in (IDS[n] for n in tail.divergences):
                continue  # the tail does not define it (the ops refuse it)
            for dtype, block_k in itertools.product(DTYPES, BLOCK_K_SIZES):
                dtypes = {"student_ptr": dtype}
                if kernel == "topk_backward_kernel":
                    dtypes["grad_ptr"] = dtype
                yield Specialization("topk", kernel, dict(**kernel_switches(divergence, tail.id, with_ce),
                                                          BLOCK_V=BLOCK_V, BLOCK_K=block_k), dtypes, NUM_WARPS)


def _vocab_parallel_specializations():
    from ..parallel.shards import SHARD_BACKWARD_CONFIG, SHARD_TERMS_CONFIG

    for student_dtype, teacher_dtype in itertools.product(DTYPES, DTYPES):
        dtypes = {"student_ptr": student_dtype, "teacher_ptr": teacher_dtype}
        for divergence in TWO_PASS_IDS:  # the second pass exists for the two-pass divergences only
            yield Specialization("vocab_parallel", "shard_terms_kernel",
                                 dict(DIVERGENCE=divergence, BLOCK_V=SHARD_TERMS_CONFIG["BLOCK_V"]), dtypes,
                                 SHARD_TERMS_CONFIG["num_warps"])
        for divergence, with_ce in itertools.product((NO_DIVERGENCE, *IDS.values()), (False, True)):
            if divergence == 0 and (teacher_dtype != student_dtype or not with_ce):
                continue
            yield Specialization("vocab_parallel", "shard_backward_kernel",
                                 dict(DIVERGENCE=divergence, WITH_CE=with_ce, BLOCK_V=SHARD_BACKWARD_CONFIG["BLOCK_V"]),
                                 {**dtypes, "grad_ptr": student_dtype}, SHARD_BACKWARD_CONFIG["num_warps"])


def shipped_specializations() -> list[Specialization]:
    """Every variant the launchers can use (they pick only from these block sizes and switches)."""
    return [*_distill_specializations(), *_topk_specializations(), *_vocab_parallel_specializations()]


# Scalar arguments that are floats; every other non-pointer, non-constexpr argument is an i32.
_FLOAT_ARGS = {"param_a", "param_b", "inv_temperature", "rest_floor"}
# Pointer arguments that are not fp32 unless listed in a specialization's pointer_dtypes.
_POINTER_DEFAULTS = {"labels_ptr": "i64", "ids_ptr": "i64"}


def _signature(fn, spec: Specialization) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in spec.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + spec.pointer_dtypes.get(name, _POINTER_DEFAULTS.get(name, "fp32"))
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else "cuobjdump"


def parse_resource_usage(text: str) -> list[tuple[str, int, int, int, int]]:
    """[(function, REG, STACK, SHARED, LOCAL)] from `cuobjdump --dump-resource-usage`."""
    return [(m[0], int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in _RESOURCE.findall(text)]


def _compile_one(job) -> list[KernelResources]:
    spec, arch = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"distillkit.kernels.{spec.module}"), spec.kernel)
    src = ASTSource(fn=fn, signature=_signature(fn, spec), constexprs=spec.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    rows = []
    for name, reg, stack, shared, local in parse_resource_usage(text):
        shared = max(shared, compiled.metadata.shared)
        rows.append(KernelResources(name, spec.variant, f"sm_{arch}", reg, local, stack, shared, spec.num_warps,
                                    occupancy(arch, reg, spec.num_warps, shared)))
    return rows


def triton_report(workers: int | None = None) -> list[KernelResources]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the Triton report needs the compiler: unset TRITON_INTERPRET")
    jobs = [(spec, arch) for spec in shipped_specializations() for arch in ARCHS]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    if workers == 1:
        results = map(_compile_one, jobs)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_compile_one, jobs, chunksize=4)
    rows = [row for rs in results for row in rs]
    if workers != 1:
        pool.shutdown()
    return rows


def cuda_rows() -> tuple[list[KernelResources], str]:
    """Rows for the CUDA kernels of csrc/, or an empty list and the reason."""
    try:
        from . import cuda_report
    except ImportError as e:
        return [], f"CUDA report unavailable ({e})"
    try:
        rows = cuda_report.report()
    except Exception as e:  # noqa: BLE001 - any toolchain failure is reported, not raised
        return [], f"CUDA kernels not compiled: {e}"
    out = []
    for r in sorted(rows, key=lambda r: (r["kernel"], r["variant"], str(r["arch"]))):
        warps = int(r.get("num_warps", 8))
        arch = int(str(r["arch"]).replace("sm_", ""))
        out.append(KernelResources(r["kernel"], r.get("variant", "cuda"), f"sm_{arch}", r["registers"],
                                   r["spill_bytes"], r.get("stack_bytes", 0), r["shared_bytes"], warps,
                                   occupancy(arch, r["registers"], warps, r["shared_bytes"])))
    return out, ""


def format_table(rows: list[KernelResources]) -> str:
    """One line per kernel, variant and arch; the variant in full, divergences and tails by name."""
    from .cuda_report import format_columns, readable_variant

    body = [[r.kernel, readable_variant(r.variant), r.arch, str(r.registers), str(r.spill_bytes), str(r.shared_bytes),
             str(r.num_warps), f"{r.occupancy:.2f}"] for r in rows]
    return format_columns(["kernel", "variant", "arch", "regs", "spill", "smem", "warps", "occ"], body,
                          right={3, 4, 5, 6, 7})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distillkit kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel spills registers")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of csrc/")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "distillkit.tools.kernel_report", *(argv or sys.argv[1:])],
                               env=env)
    rows = triton_report()
    note = ""
    if not args.no_cuda:
        extra, note = cuda_rows()
        rows += extra
    print(format_table(rows))
    if note:
        print(note)
    spilled = [r for r in rows if r.spill_bytes > 0]
    print(f"{len(rows)} kernels compiled for {', '.join(f'sm_{a}' for a in ARCHS)}; {len(spilled)} spill")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if (args.check and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
