"""The per-element model of the CUDA kernels (distillkit.tools.cuda_report: hot_path, vocab_model) on
hand-written cuobjdump text; a small templated kernel through nvcc and cuobjdump; and the shipped kernels'
figures (issue 18: bf16 KL forward and backward at <= 32 instructions per element on sm_90)."""

from __future__ import annotations

import re

import pytest

from distillkit.tools import cuda_report
from distillkit.tools.gpu_model import parse_sass

# One vocabulary loop (0x10 .. 0x140) as nvcc lays it out: a masked edge path (scalar loads) beside the
# vector one, a rescale branch taken when the running max moves, then the steady-state work. Branch
# predicates both ways cuobjdump prints them: a guard (@!P1 BRA) and an operand (BRA P0, target).
BODY = [  # (address, predicate, instruction); {x} in a branch target is that address + the loop's base
    (0x10, "", "ISETP.GT.AND P0, PT, R2, R3, PT"), (0x20, "", "BRA P0, {0x60}"),
    (0x30, "", "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]"), (0x40, "", "LDG.E.128.CONSTANT R8, desc[UR4][R6.64]"),
    (0x50, "", "BRA {0x90}"), (0x60, "", "LDG.E.U16 R4, desc[UR4][R2.64]"), (0x70, "", "LDG.E.U16 R8, desc[UR4][R6.64]"),
    (0x80, "", "IMAD.U32 R4, R4, 0x10000, RZ"), (0x90, "", "FMNMX R12, R4, R5, !PT"),
    (0xa0, "", "FSETP.GT.AND P1, PT, R12, R13, PT"), (0xb0, "@!P1", "BRA {0xf0}"), (0xc0, "", "FADD R14, R13, -R12"),
    (0xd0, "", "MUFU.EX2 R14, R14"), (0xe0, "", "FMUL R15, R15, R14"), (0xf0, "", "FMUL R16, R4, 1.4426950216293334961"),
    (0x100, "", "MUFU.EX2 R16, R16"), (0x110, "", "FADD R15, R15, R16"), (0x120, "", "IADD3 R2, P2, R2, 0x10, RZ"),
    (0x130, "", "ISETP.GE.AND P3, PT, R2, R17, PT"), (0x140, "@!P3", "BRA {0x10}"),
]
HOT = [0x10, 0x20, 0x30, 0x40, 0x50, 0x90, 0xa0, 0xb0, 0xf0, 0x100, 0x110, 0x120, 0x130, 0x140]


def sass(name: str, *bases: int) -> str:
    """cuobjdump -sass text of a function holding one copy of BODY at each base address."""
    lines = [f"\t\tFunction : {name}", "        /*0000*/                   MOV R0, RZ ;"]
    for base in bases:
        for address, pred, text in BODY:
            text = re.sub(r"\{(0x[0-9a-f]+)\}", lambda m, b=base: hex(int(m.group(1), 16) + b), text)
            lines.append(f"        /*{address + base:04x}*/ {pred:>20} {text} ;    /* 0x000fe200 */")
    end = max(bases) + 0x150
    lines += [f"        /*{end:04x}*/                   EXIT ;", f"        /*{end + 0x10:04x}*/ BRA {hex(end + 0x10)};"]
    return "\n".join(lines) + "\n"


LOOP = sass("toy", 0)


def _toy():
    return parse_sass(LOOP)["toy"], cuda_report._guarded(LOOP)


def test_guards_are_read_per_instruction():
    assert cuda_report._guarded(LOOP) == {0xb0, 0x140}  # BRA P0, ... carries its predicate as an operand


def test_hot_path_skips_cold_branches_but_keeps_the_vector_accesses():
    ins, guarded = _toy()
    path = cuda_report.hot_path(ins, 0x10, 0x140, guarded)
    assert [i.address for i in path] == HOT  # vector loads, no rescale, no masked loads


def test_an_unconditional_branch_has_one_successor():
    ins, _ = _toy()
    # without its predicate, `@!P1 BRA 0xf0` always jumps: the rescale block is never on a path
    path = cuda_report.hot_path(ins, 0x10, 0x140, guarded=set())
    assert 0xc0 not in [i.address for i in path]
    with pytest.raises(ValueError):  # and a required access that no path reaches is an error
        cuda_report.hot_path([i._replace(operands="0x60") if i.address == 0x20 else i for i in ins], 0x10, 0x140,
                             set())  # `BRA 0x60`: always the masked path


def test_vocab_model_per_element_figures():
    ins, guarded = _toy()
    m = cuda_report.vocab_model(ins, guarded, "forward_stream_kernel", 1, "__nv_bfloat16", "__nv_bfloat16", 90)
    assert m["passes"] == 1 and m["loops"] == 1
    assert m["instructions_per_element"] == round(len(HOT) / 8, 2)
    assert m["mufu_per_element"] == round(1 / 8, 2)  # the rescale's MUFU is off the path
    assert m["global_accesses"] == "2xLDG.128" and m["bytes_per_element"] == 4
    assert m["bound"] == "memory" and m["shuffles_per_iteration"] == 0
    # fp32 needs two 16-byte loads per operand and group: the two loads here are not a group of div 1 ...
    assert cuda_report.vocab_model(ins, guarded, "forward_stream_kernel", 1, "float", "float", 90) is None
    # ... but of the CE-only kernel, unrolled by one
    m = cuda_report.vocab_model(ins, guarded, "forward_stream_kernel", 0, "float", "float", 80)
    assert m["instructions_per_element"] == round(len(HOT) / 8, 2) and m["gpu"] == "A100 SXM"


def test_two_passes_add_and_unrolled_loops_divide():
    text = sass("two", 0, 0x200)
    ins, guarded = parse_sass(text)["two"], cuda_report._guarded(text)
    m = cuda_report.vocab_model(ins, guarded, "forward_stream_kernel", 3, "__nv_bfloat16", "__nv_bfloat16", 90)
    assert m["passes"] == 2 and m["loops"] == 2
    assert m["instructions_per_element"] == round(2 * len(HOT) / 8, 2)
    assert m["bytes_per_element"] == 8  # the streaming two-pass forward reads both rows twice
    m = cuda_report.vocab_model(ins, guarded, "forward_smem_kernel", 3, "__nv_bfloat16", "__nv_bfloat16", 90)
    assert m["passes"] == 2 and m["bytes_per_element"] == 4  # the row read once, kept in shared memory
    # the backward takes the costliest loop alone; id 0 loads the student only: 2 loads a loop = unroll 2
    m = cuda_report.vocab_model(ins, guarded, "backward_kernel", 0, "__nv_bfloat16", "__nv_bfloat16", 90)
    assert m["passes"] == 1 and m["instructions_per_element"] == round(len(HOT) / 16, 2)
    assert m["bytes_per_element"] == 4  # student + grad


needs_toolchain = pytest.mark.skipif(
    cuda_report.find_nvcc() is None or cuda_report.find_cuobjdump() is None,
    reason="needs nvcc and cuobjdump")

TOY_CU = r"""
#include <cuda_bf16.h>
namespace distillkit::cuda {
template <int DIV, typename TS, typename TT>
__global__ void forward_stream_kernel(const TS* __restrict__ s, const TT* __restrict__ t, float* out, long n) {
  float z = 0.0f;
  for (long g = threadIdx.x; g < n; g += blockDim.x) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(s) + g), b = __ldg(reinterpret_cast<const uint4*>(t) + g);
    const unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) z += __expf(__uint_as_float(w[i] << 16));
  }
  out[threadIdx.x] = z;
}
template __global__ void forward_stream_kernel<1, __nv_bfloat16, __nv_bfloat16>(
    const __nv_bfloat16*, const __nv_bfloat16*, float*, long);
}
"""


@needs_toolchain
def test_a_compiled_kernel_gets_a_model(tmp_path):
    pytest.importorskip("torch")  # nvcc_flags names torch's include directories
    source = tmp_path / "toy.cu"
    source.write_text(TOY_CU)
    (row,) = cuda_report.compile_one(source, 90, str(tmp_path))
    m = row["model"]
    assert row["kernel"] == "forward_stream_kernel" and m is not None, row
    assert m["global_accesses"].startswith("2xLDG.128") and m["loops"] >= 1
    assert m["mufu_per_element"] == 1.0 and m["shuffles_per_iteration"] == 0


@needs_toolchain
def test_shipped_kernels_meet_the_issue_goal():
    """Every shipped specialization gets a model on both archs; the bf16 KL loops (forward at T = 1 with CE
    sharing the student's sums, backward) issue <= 32 instructions per element on sm_90, no reduction in the
    loop, and at most 0.8 of the memory time."""
    rows = cuda_report.report()
    assert all(r.get("model") for r in rows), [r["variant"] for r in rows if not r.get("model")]
    print("\n" + cuda_report.format_model_table(rows))
    for r in rows:
        m = r["model"]
        if r["kernel"] != "backward_kernel":
            assert m["shuffles_per_iteration"] == 0 and m["barriers_per_iteration"] == 0, r["variant"]
        if r["arch"] == "sm_90" and r["variant"] in ("div=1 student=__nv_bfloat16 teacher=__nv_bfloat16",
                                                     "div=2 student=__nv_bfloat16 teacher=__nv_bfloat16"):
            assert m["instructions_per_element"] <= 32, (r["kernel"], r["variant"], m)
            assert m["issue_ms"] <= 0.8 * m["memory_ms"], (r["kernel"], r["variant"], m)


def test_distillkit_kernels_prints_the_cuda_model_after_its_tables(monkeypatch, capsys):
    from distillkit import cli

    ins, guarded = _toy()
    model = cuda_report.vocab_model(ins, guarded, "backward_kernel", 1, "__nv_bfloat16", "__nv_bfloat16", 90)
    rows = [{"kernel": "backward_kernel", "variant": "div=1 student=__nv_bfloat16 teacher=__nv_bfloat16",
             "arch": "sm_90", "model": model}]
    monkeypatch.setattr(cuda_report, "report", lambda **kw: rows)
    cli._cuda_model_table(["--check"])
    out = capsys.readouterr().out
    assert "div=forward_kl student=bf16 teacher=bf16" in out and "instr/elem" in out and "Modeled" in out
    for flag in ("--no-cuda", "--no-model", "--help"):
        cli._cuda_model_table([flag])
        assert capsys.readouterr().out == ""
