"""Ahead-of-time compilation report of every shipped GPU kernel, for sm_80 and sm_90.

Triton specializations are compiled with `triton.compile` for an explicit
`GPUTarget` (no GPU needed) and their cubins read with `cuobjdump
--dump-resource-usage` (registers, spill/local bytes, shared memory); the CUDA
kernels of the extension come from `distillkit.tools.cuda_report` when nvcc is present.
`distillkit kernels` prints the table; `--check` exits non-zero on any spill.

Each specialization is compiled as the JIT compiles it for a typical launch (SPECIALIZATION):
contiguous [N, V] logits, so every pointer 16-byte aligned and every size and stride divisible
by 16 (`tt.divisibility = 16`, the JIT's "D" specialization), `*_n_inner` = 1 (the JIT turns an
integer argument equal to 1 into a constant), `ignore_index` (-100) and top-k `k` unspecialized.
Without it the SASS would load 16-bit logits one by one where the running code loads 128 bits.
Its SASS (`cuobjdump -sass`) then feeds the GPU time model of `distillkit.tools.gpu_model`:
instructions per element of the vocabulary loop and the modeled H100 / A100 time.

Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler);
`main` re-executes itself in a clean subprocess when it is set.
"""

from __future__ import annotations

import argparse
import inspect
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
    model: dict | None = None  # SASS counts and modeled time (gpu_model.summary + model_time); Triton only


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
                 if k not in ("BLOCK_V",) and not (k == "SHARED_STUDENT" and not v)]
        parts += [f"{k.replace('_ptr', '')}={v}" for k, v in self.pointer_dtypes.items()]
        return " ".join(parts)


def _distill_specializations():
    from ..core.backends.triton_rows import BACKWARD_CONFIG, FORWARD_CONFIG, shares_student

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
                for shared in (False, True) if shares_student(divergence, with_ce, student_dtype == teacher_dtype) \
                        else (False,):
                    yield Specialization("distill", kernel, dict(DIVERGENCE=divergence, WITH_CE=with_ce,
                                                                 BLOCK_V=config["BLOCK_V"], SHARED_STUDENT=shared),
                                         dtypes, config["num_warps"])


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


SPECIALIZATION = ("pointers 16-byte aligned; sizes and strides divisible by 16; *_n_inner = 1 (contiguous [N, V]); "
                  "ignore_index and k unspecialized")
_UNSPECIALIZED = {"ignore_index", "k"}  # runtime values not assumed divisible by 16 (-100; any top-k size)


def jit_specialization(fn, spec: Specialization) -> tuple[dict, dict]:
    """(constexprs, attrs) as the JIT would build them for a contiguous [N, V] launch: `*_n_inner` = 1 becomes a
    constant; pointers and the other integer arguments get `tt.divisibility = 16` (triton/backends/compiler.py
    `parse_attr` of the JIT's "D" specialization, keyed by the argument's index path)."""
    constexprs, attrs = dict(spec.constexprs), {}
    # A constexpr switch with a default that the spec leaves out takes its default, as a launch without it does.
    constexprs.update({p.name: p.default for p in inspect.signature(fn.fn).parameters.values()
                       if "constexpr" in str(p.annotation) and p.name not in constexprs
                       and p.default is not inspect.Parameter.empty})
    for i, name in enumerate(fn.arg_names):
        if name in constexprs or name in _FLOAT_ARGS or name in _UNSPECIALIZED:
            continue
        if name.endswith("_n_inner"):
            constexprs[name] = 1
        else:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return constexprs, attrs


def _model(spec: Specialization, arch: int, sass: str, name: str) -> dict | None:
    from . import gpu_model

    functions = gpu_model.parse_sass(sass)
    instructions = functions.get(name) or next(iter(functions.values()), [])
    if not instructions:
        return None
    if spec.kernel == "topk_forward_kernel" and not spec.constexprs["FULL_PASS"]:
        return None  # reads the K ids of a row, not the row: the vocabulary-stream model does not apply
    counts = gpu_model.loop_counts(instructions)
    block_v = spec.constexprs["BLOCK_V"]
    streamed = {k: v for k, v in spec.pointer_dtypes.items()
                if not (k == "teacher_ptr" and spec.constexprs.get("DIVERGENCE") == NO_DIVERGENCE)}
    two_pass = spec.kernel == "distill_forward_kernel" and spec.constexprs.get("DIVERGENCE") in TWO_PASS_IDS
    nbytes = gpu_model.streamed_bytes(streamed, 2 if two_pass else 1)
    t = gpu_model.model_time(gpu_model.GPUS[arch], counts, block_v, spec.num_warps, nbytes)
    return {**gpu_model.summary(counts, block_v, spec.num_warps), "classes_per_iteration": counts.classes,
            "memory_per_iteration": counts.memory, "mufu_per_iteration": counts.mufu, "bytes_per_element": nbytes,
            "gpu": t.gpu, "memory_ms": t.memory_ms, "mufu_ms": t.mufu_ms, "issue_ms": t.issue_ms,
            "time_ms": t.time_ms, "bound": t.bound, "specialization": SPECIALIZATION}


def cuobjdump() -> str:
    """The cuobjdump for Triton's cubins: the Triton wheel's own where it ships one."""
    from .cuda_report import find_cuobjdump

    return find_cuobjdump(prefer_triton=True) or "cuobjdump"


def parse_resource_usage(text: str) -> list[tuple[str, int, int, int, int]]:
    """[(function, REG, STACK, SHARED, LOCAL)] from `cuobjdump --dump-resource-usage`."""
    return [(m[0], int(m[1]), int(m[2]), int(m[3]), int(m[4])) for m in _RESOURCE.findall(text)]


def _compile_one(job) -> list[KernelResources]:
    spec, arch, model = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"distillkit.kernels.{spec.module}"), spec.kernel)
    constexprs, attrs = jit_specialization(fn, spec)
    signature = {k: "constexpr" if k in constexprs else v for k, v in _signature(fn, spec).items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout \
            if model else ""
    rows = []
    for name, reg, stack, shared, local in parse_resource_usage(text):
        shared = max(shared, compiled.metadata.shared)
        rows.append(KernelResources(name, spec.variant, f"sm_{arch}", reg, local, stack, shared, spec.num_warps,
                                    occupancy(arch, reg, spec.num_warps, shared),
                                    _model(spec, arch, sass, name) if model else None))
    return rows


def triton_report(workers: int | None = None, model: bool = True) -> list[KernelResources]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the Triton report needs the compiler: unset TRITON_INTERPRET")
    jobs = [(spec, arch, model) for spec in shipped_specializations() for arch in ARCHS]
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


def format_model_table(rows: list[KernelResources]) -> str:
    """One line per Triton kernel and variant: the sm_90 SASS counts per element / per loop iteration and the
    modeled H100 (from the sm_90 SASS) and A100 (from the sm_80 SASS) times at N = 16384, V = 131072."""
    from .cuda_report import format_columns, readable_variant

    by_key: dict = {}
    for r in rows:
        if r.model:
            by_key.setdefault((r.kernel, r.variant), {})[r.arch] = r.model
    body = []
    for (kernel, variant), archs in by_key.items():
        m = archs.get("sm_90") or next(iter(archs.values()))
        times = [f"{a['time_ms']:.2f} {a['bound']}" if a else "-" for a in (archs.get("sm_90"), archs.get("sm_80"))]
        body.append([kernel, readable_variant(variant), f"{m['instructions_per_element']:.1f}",
                     f"{m['mufu_per_element']:.2f}", str(m["shuffles_per_iteration"]), str(m["barriers_per_iteration"]),
                     m["global_accesses"] or "-", f"{m['memory_ms']:.2f}" if "memory_ms" in m else "-", *times])
    return format_columns(["kernel", "variant", "instr/elem", "MUFU/elem", "SHFL/it", "BAR/it", "global accesses/it",
                           "H100 mem ms", "H100 ms", "A100 ms"], body, right={2, 3, 4, 5, 7})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distillkit kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit 1 if any kernel spills registers")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of csrc/")
    parser.add_argument("--no-model", action="store_true", help="skip the SASS counts and the modeled GPU times")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "distillkit.tools.kernel_report", *(argv or sys.argv[1:])],
                               env=env)
    rows = triton_report(model=not args.no_model)
    note = ""
    if not args.no_cuda:
        extra, note = cuda_rows()
        rows += extra
    print(format_table(rows))
    if note:
        print(note)
    spilled = [r for r in rows if r.spill_bytes > 0]
    print(f"{len(rows)} kernels compiled for {', '.join(f'sm_{a}' for a in ARCHS)}; {len(spilled)} spill")
    print(f"specialization assumed (as the JIT at run time): {SPECIALIZATION}")
    if not args.no_model:
        from .gpu_model import MODEL_NOTE

        print()
        print(format_model_table(rows))
        print(MODEL_NOTE)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if (args.check and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
