"""A GPU time model from the SASS of a compiled kernel: memory, MUFU and instruction issue.

`parse_sass` reads `cuobjdump -sass` text; `loop_counts` finds a kernel's vocabulary loop
(the innermost loops: a backward branch, `BRA <target>` with target <= its own address)
and counts its instructions by class, statically (each instruction of the loop body once,
whatever its predicate: a guarded instruction still issues). A kernel with no loop (the
backward kernels: one program per vocabulary block) is counted whole, as one "iteration".
When a kernel has several innermost loops (a two-pass forward), each is assumed to sweep
the whole vocabulary, so their counts are added.

Each iteration handles BLOCK_V elements of one row with 32 * num_warps threads: the Triton
layout of a 1-D `tl.arange(0, BLOCK_V)` block gives every thread BLOCK_V / (32 * num_warps)
elements (16 for BLOCK_V = 4096, 8 warps), so per element = per iteration / that number.

Modeled time of one launch over an N x V problem = max of
  memory: N * V * (sum of the element sizes of the [N, V] tensors it reads or writes once,
          twice for a two-pass forward) / HBM bandwidth  (the traffic model of docs/PERFORMANCE.md)
  MUFU:   N * V * MUFU lanes per element / (MUFU results per clock per SM * SMs * clock)
  issue:  N * V / 32 * warp-instructions per element / (warp-instructions per clock per SM * SMs * clock)
and the binding resource is the largest. This is a model, not a measurement: it ignores
latency, occupancy, dual issue limits, bank conflicts and caches, so it is a lower bound on
each resource taken alone.

Hardware figures (assumptions, from published numbers):
- H100 SXM5: 3.35 TB/s HBM3, 132 SMs, 1.98 GHz max boost (NVIDIA H100 Tensor Core GPU datasheet).
- A100 SXM4 80GB: 2.039 TB/s HBM2e, 108 SMs, 1.41 GHz boost (NVIDIA A100 datasheet).
- Issue: 4 warp-instructions per clock per SM (4 sub-partitions with one scheduler each,
  one instruction per clock: NVIDIA Hopper / Ampere architecture whitepapers).
- MUFU: 16 results per clock per SM for 32-bit exp2/log2/rcp/rsqrt/sin/cos at compute
  capability 8.0 and 9.0 (CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*([^;]*);",
                    re.MULTILINE)
_LABEL = re.compile(r"^\s*(\.L_\w+):", re.MULTILINE)
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)", re.MULTILINE)
_TARGET = re.compile(r"(?:`\((\.L_\w+)\)|\b(0x[0-9a-f]+))")

FP32 = {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND", "FSWZADD", "FMUL32I", "FADD32I",
        "FFMA32I", "HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2"}
INTEGER = {"IADD3", "IADD", "IADD32I", "IMAD", "IMADSP", "IMUL", "IMUL32I", "LOP3", "LOP", "LOP32I", "ISETP", "SHF",
           "SHL", "SHR", "LEA", "PRMT", "SEL", "IABS", "IMNMX", "VIMNMX", "VIADD", "POPC", "FLO", "BREV", "ISCADD",
           "BMSK", "UIADD3", "UIMAD", "ULOP3", "USHF", "ULEA", "UISETP", "USEL", "UPRMT", "UFLO", "UPOPC"}
MEMORY = {"LDG", "STG", "LDS", "STS", "LD", "ST", "LDL", "STL", "ATOM", "ATOMG", "ATOMS", "RED", "REDG", "LDGSTS",
          "LDSM", "LDC", "ULDC"}
CLASSES = ("mufu", "fp32", "integer", "memory", "shuffle", "barrier", "other")
_WIDTH_BITS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


class Instruction(NamedTuple):
    address: int
    opcode: str  # with modifiers: "LDG.E.128"
    operands: str
    target: int | None  # branch target address, for BRA


def instruction_class(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base == "MUFU":
        return "mufu"
    if base in FP32:
        return "fp32"
    if base in INTEGER:
        return "integer"
    if base in MEMORY:
        return "memory"
    if base == "SHFL":
        return "shuffle"
    if base == "BAR":
        return "barrier"
    return "other"


def memory_key(opcode: str) -> str:
    """'LDG.E.128' -> 'LDG.128', 'LDG.E.U16' -> 'LDG.16', 'STS' -> 'STS.32': the access width in bits."""
    parts = opcode.split(".")
    bits = next((_WIDTH_BITS[p] for p in parts[1:] if p in _WIDTH_BITS), 32)
    return f"{parts[0]}.{bits}"


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """{function: [Instruction]} from `cuobjdump -sass`; labels (`.L_x_3:`) resolve to the next address."""
    functions: dict[str, list[Instruction]] = {}
    starts = [(m.start(), m.group(1)) for m in _FUNCTION.finditer(text)] or [(0, "")]
    for i, (start, name) in enumerate(starts):
        body = text[start:starts[i + 1][0] if i + 1 < len(starts) else len(text)]
        labels, pending, raw = {}, [], []
        tokens = sorted([(m.start(), "label", m) for m in _LABEL.finditer(body)]
                        + [(m.start(), "instr", m) for m in _INSTR.finditer(body)], key=lambda t: t[0])
        for _, kind, m in tokens:
            if kind == "label":
                pending.append(m.group(1))
                continue
            address = int(m.group(1), 16)
            for label in pending:
                labels[label] = address
            pending = []
            raw.append((address, m.group(2), m.group(3).strip()))
        out = []
        for address, opcode, operands in raw:
            target = None
            if opcode.split(".")[0] in ("BRA", "JMP", "BRX"):
                t = _TARGET.search(operands)
                if t:
                    target = labels.get(t.group(1)) if t.group(1) else int(t.group(2), 16)
            out.append(Instruction(address, opcode, operands, target))
        functions[name] = out
    return functions


def find_loops(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """Innermost loops as (first, last) addresses: a backward branch's target up to the branch,
    keeping only the ranges that contain no other loop (a branch to itself, a trap, is not a loop)."""
    loops = sorted({(i.target, i.address) for i in instructions
                    if i.target is not None and i.target < i.address})
    return [(a, b) for a, b in loops
            if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]


@dataclass
class LoopCounts:
    loops: int  # innermost loops counted (0: the whole kernel, which has none)
    instructions: int  # per iteration (per vocabulary block), summed over the loops
    classes: dict = field(default_factory=dict)  # class -> count per iteration
    memory: dict = field(default_factory=dict)  # 'LDG.128' -> count per iteration
    mufu: dict = field(default_factory=dict)  # 'MUFU.EX2' -> count per iteration
    fmnmx: int = 0


def loop_counts(instructions: list[Instruction]) -> LoopCounts:
    """Counts per iteration of the innermost loops (or of the whole kernel when it has none); NOPs excluded."""
    loops = find_loops(instructions)
    ranges = loops or [(instructions[0].address, instructions[-1].address)] if instructions else []
    body = [i for i in instructions if any(a <= i.address <= b for a, b in ranges) and i.opcode != "NOP"]
    classes = Counter(instruction_class(i.opcode) for i in body)
    memory = Counter(memory_key(i.opcode) for i in body if instruction_class(i.opcode) == "memory")
    mufu = Counter(i.opcode for i in body if i.opcode.startswith("MUFU"))
    return LoopCounts(len(loops), len(body), {c: classes.get(c, 0) for c in CLASSES}, dict(sorted(memory.items())),
                      dict(sorted(mufu.items())), sum(i.opcode.startswith("FMNMX") for i in body))


class GPU(NamedTuple):
    name: str
    arch: int
    bandwidth: float  # bytes / s
    sms: int
    clock: float  # Hz
    issue_per_sm: int = 4  # warp-instructions per clock per SM
    mufu_per_sm: int = 16  # MUFU lane results per clock per SM


H100 = GPU("H100 SXM", 90, 3.35e12, 132, 1.98e9)
A100 = GPU("A100 SXM", 80, 2.039e12, 108, 1.41e9)
GPUS = {90: H100, 80: A100}
NOMINAL_N, NOMINAL_V = 16384, 131072  # the shape of docs/PERFORMANCE.md and issue 18


@dataclass
class Modeled:
    gpu: str
    memory_ms: float
    mufu_ms: float
    issue_ms: float
    time_ms: float
    bound: str  # "memory" | "mufu" | "issue"


def per_element(block_v: int, num_warps: int) -> float:
    """Elements each thread handles per iteration: BLOCK_V / (32 * num_warps)."""
    return block_v / (32 * num_warps)


def model_time(gpu: GPU, counts: LoopCounts, block_v: int, num_warps: int, bytes_per_element: float,
               n: int = NOMINAL_N, v: int = NOMINAL_V) -> Modeled:
    """max(memory, MUFU, issue) seconds for an n x v launch, in ms, with the binding resource."""
    elems_per_thread = per_element(block_v, num_warps)
    instr_per_elem = counts.instructions / elems_per_thread
    mufu_per_elem = counts.classes.get("mufu", 0) / elems_per_thread
    elements = n * v
    times = {"memory": elements * bytes_per_element / gpu.bandwidth,
             "mufu": elements * mufu_per_elem / (gpu.mufu_per_sm * gpu.sms * gpu.clock),
             "issue": elements / 32 * instr_per_elem / (gpu.issue_per_sm * gpu.sms * gpu.clock)}
    bound = max(times, key=times.get)
    return Modeled(gpu.name, *(round(times[k] * 1e3, 3) for k in ("memory", "mufu", "issue")),
                   round(times[bound] * 1e3, 3), bound)


ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def streamed_bytes(pointer_dtypes: dict, passes: int = 1) -> float:
    """Bytes per [N, V] element: each V-wide tensor (student, teacher, grad) moved once per pass."""
    return passes * sum(ELEMENT_BYTES.get(d, 4) for d in pointer_dtypes.values())


def summary(counts: LoopCounts, block_v: int, num_warps: int) -> dict:
    """The per-element and per-iteration figures the report prints."""
    e = per_element(block_v, num_warps)
    loads = ", ".join(f"{n}x{k}" for k, n in counts.memory.items() if k.startswith(("LDG", "STG")))
    return {"elements_per_thread": e, "instructions_per_iteration": counts.instructions,
            "instructions_per_element": round(counts.instructions / e, 2),
            "mufu_per_element": round(counts.classes.get("mufu", 0) / e, 2),
            "fp32_per_element": round(counts.classes.get("fp32", 0) / e, 2),
            "integer_per_element": round(counts.classes.get("integer", 0) / e, 2),
            "shuffles_per_iteration": counts.classes.get("shuffle", 0),
            "barriers_per_iteration": counts.classes.get("barrier", 0),
            "fmnmx_per_iteration": counts.fmnmx, "global_accesses": loads, "loops": counts.loops}


MODEL_NOTE = (f"Modeled, not measured: time = max(memory, MUFU, issue) at N = {NOMINAL_N}, V = {NOMINAL_V};\n"
              "per element = per loop iteration / (BLOCK_V / (32 * num_warps)) elements per thread; static counts of\n"
              "the innermost vocabulary loops (the whole kernel when it has none); memory = each V-wide tensor once per\n"
              "pass / HBM bandwidth; H100 SXM 3.35 TB/s, 132 SMs, 1.98 GHz (from the sm_90 SASS); A100 SXM 2.039 TB/s,\n"
              "108 SMs, 1.41 GHz (from the sm_80 SASS); 4 warp-instructions and 16 MUFU results per clock per SM\n"
              "(assumptions: see distillkit/tools/gpu_model.py).")
