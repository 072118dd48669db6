"""The SASS parser and GPU time model of `distillkit kernels` (distillkit.tools.gpu_model), on hand-written
cuobjdump text (tests/tools/test_triton_sass.py reads the compiled kernels)."""

from __future__ import annotations


import pytest

from distillkit.tools import gpu_model, kernel_report
from distillkit.tools.gpu_model import A100, H100, LoopCounts, find_loops, loop_counts, model_time, parse_sass

# cuobjdump -sass layout: address comment, optional predicate, opcode with modifiers, operands, encoding comments.
# Labels (.L_x_N:) as older cuobjdump prints them; the loop is 0x0060 .. 0x0150 (a backward @P0 BRA).
SNIPPET = """
\tcode for sm_90a
\t\tFunction : toy_kernel
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
                                                                             /* 0x000fe20000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                        /* 0x0000000000007919 */
        /*0020*/                   IMAD.MOV.U32 R4, RZ, RZ, RZ ;             /* 0x000000ffff047224 */
        /*0030*/                   MOV R5, 0xff800000 ;                      /* 0x00000000ff057802 */
        /*0040*/                   ULDC.64 UR4, c[0x0][0x210] ;              /* 0x0000840000047ab9 */
        /*0050*/                   NOP ;                                     /* 0x0000000000007918 */
.L_x_1:
        /*0060*/                   LDG.E.128 R8, desc[UR4][R2.64] ;          /* 0x0000000402087981 */
        /*0070*/                   LDG.E.U16 R12, desc[UR4][R6.64] ;         /* 0x00000004060c7981 */
        /*0080*/                   FMNMX R13, R8, R9, !PT ;                  /* 0x00000009080d7209 */
        /*0090*/                   SHFL.BFLY PT, R14, R13, 0x10, 0x1f ;      /* 0x0e001f000d0e7f89 */
        /*00a0*/                   FFMA R15, R14, 1.4426950216293334961, -R5 ;
        /*00b0*/                   MUFU.EX2 R16, R15 ;                       /* 0x0000000f00107308 */
        /*00c0*/               @P1 STS [R0], R16 ;                           /* 0x0000001000001388 */
        /*00d0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;             /* 0x0000000000007b1d */
        /*00e0*/                   LDS R17, [R0] ;                           /* 0x0000000000117984 */
        /*00f0*/                   FADD R4, R4, R17 ;                        /* 0x0000001104047221 */
        /*0100*/                   IADD3 R2, P2, R2, 0x2000, RZ ;            /* 0x0000200002027810 */
        /*0110*/                   LOP3.LUT R3, R3, 0xff, RZ, 0xc0, !PT ;    /* 0x000000ff03037812 */
        /*0120*/                   ISETP.GE.AND P0, PT, R2, R18, PT ;        /* 0x000000120200720c */
        /*0130*/                   MUFU.LG2 R19, R4 ;                        /* 0x0000000400137308 */
        /*0140*/                   PRMT R20, R12, 0x5410, RZ ;               /* 0x0000541014007816 */
        /*0150*/              @!P0 BRA `(.L_x_1) ;                           /* 0xfffffffc00fc8947 */
        /*0160*/                   STG.E desc[UR4][R2.64], R4 ;              /* 0x0000000402007986 */
        /*0170*/                   EXIT ;                                    /* 0x000000000000794d */
.L_x_2:
        /*0180*/                   BRA `(.L_x_2);                            /* 0xfffffffc00fc7947 */
"""


def test_parse_sass_reads_opcodes_predicates_and_label_targets():
    functions = parse_sass(SNIPPET)
    assert list(functions) == ["toy_kernel"]
    ins = functions["toy_kernel"]
    assert len(ins) == 25  # encoding-only lines are not instructions
    by_address = {i.address: i for i in ins}
    assert by_address[0x60].opcode == "LDG.E.128"
    assert by_address[0xc0].opcode == "STS"  # the @P1 predicate is not the opcode
    assert by_address[0x150].target == 0x60 and by_address[0x180].target == 0x180
    assert find_loops(ins) == [(0x60, 0x150)]  # the trap (a branch to itself) is no loop


def test_loop_counts_classify_the_loop_body():
    c = loop_counts(parse_sass(SNIPPET)["toy_kernel"])
    assert c.loops == 1 and c.instructions == 16
    assert c.classes == {"mufu": 2, "fp32": 3, "integer": 4, "memory": 4, "shuffle": 1, "barrier": 1, "other": 1}
    assert c.memory == {"LDG.128": 1, "LDG.16": 1, "LDS.32": 1, "STS.32": 1}  # the STG after the loop is not in it
    assert c.mufu == {"MUFU.EX2": 1, "MUFU.LG2": 1} and c.fmnmx == 1


def test_addresses_as_targets_nested_loops_and_loop_free_kernels():
    text = """
        Function : nested
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   FADD R1, R1, R0 ;
        /*0020*/                   FMUL R2, R1, R1 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0050*/               @P1 BRA 0x0 ;
        /*0060*/                   EXIT ;
        Function : straight
        /*0000*/                   LDG.E.64 R2, desc[UR4][R4.64] ;
        /*0010*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*0020*/                   EXIT ;
        /*0030*/                   NOP ;
"""
    functions = parse_sass(text)
    nested = functions["nested"]
    assert find_loops(nested) == [(0x10, 0x30)]  # the inner loop only
    assert loop_counts(nested).instructions == 3
    c = loop_counts(functions["straight"])  # no loop: the whole kernel, NOPs left out
    assert c.loops == 0 and c.instructions == 3 and c.memory == {"LDG.64": 1, "STG.128": 1}


def _counts(instructions, mufu):
    return LoopCounts(1, instructions, {"mufu": mufu, "fp32": instructions - mufu})


def test_model_binds_on_the_largest_resource():
    # Issue 18's reading of the bf16 forward-KL + CE forward: 759 instructions and 51 MUFU per 16 elements per
    # thread, student + teacher bf16 read once (4 bytes per element) at N = 16384, V = 131072.
    c = _counts(759, 51)
    assert gpu_model.per_element(4096, 8) == 16
    m = model_time(H100, c, 4096, 8, 4)
    assert m.memory_ms == pytest.approx(16384 * 131072 * 4 / 3.35e12 * 1e3, rel=1e-3)  # 2.56 ms
    assert m.issue_ms == pytest.approx(16384 * 131072 / 32 * 759 / 16 / (4 * 132 * 1.98e9) * 1e3, rel=1e-3)
    assert m.bound == "issue" and m.time_ms == m.issue_ms and 2.9 < m.time_ms < 3.1
    # fp32 doubles the bytes: memory-bound; A100 is slower on every resource
    m32 = model_time(H100, c, 4096, 8, 8)
    assert m32.bound == "memory" and m32.time_ms == m32.memory_ms
    a = model_time(A100, c, 4096, 8, 4)
    assert a.memory_ms > m.memory_ms and a.issue_ms > m.issue_ms and a.mufu_ms > m.mufu_ms
    # MUFU-bound when nearly every instruction is a transcendental
    assert model_time(H100, _counts(64, 60), 4096, 8, 0.5).bound == "mufu"
    assert gpu_model.streamed_bytes({"student_ptr": "bf16", "teacher_ptr": "fp32"}, passes=2) == 12


def test_jit_specialization_matches_the_jit_divisibility_rule():
    from distillkit.core.backends.triton_rows import FORWARD_CONFIG
    from distillkit.kernels.distill import distill_forward_kernel as fn

    spec = kernel_report.Specialization("distill", "distill_forward_kernel",
                                        dict(DIVERGENCE=1, WITH_CE=True, BLOCK_V=FORWARD_CONFIG["BLOCK_V"]),
                                        {"student_ptr": "bf16", "teacher_ptr": "bf16"}, FORWARD_CONFIG["num_warps"])
    constexprs, attrs = kernel_report.jit_specialization(fn, spec)
    names = {fn.arg_names[i]: v for (i,), v in attrs.items()}
    assert constexprs["s_n_inner"] == 1 and constexprs["t_n_inner"] == 1 and constexprs["BLOCK_V"] == 4096
    for name in ("student_ptr", "teacher_ptr", "labels_ptr", "s_stride_outer", "vocab_size", "div_vocab_size"):
        assert names[name] == [["tt.divisibility", 16]], name
    for name in ("ignore_index", "param_a", "inv_temperature", "s_n_inner", "DIVERGENCE"):
        assert name not in names, name
    # the JIT's own rule: 16-divisible integers get "D" (-> tt.divisibility 16), 1 becomes a constant
    from triton.backends.compiler import BaseBackend
    assert BaseBackend.parse_attr("D") == [["tt.divisibility", 16]]


def test_model_table_lists_each_variant_once_with_both_gpus():
    spec = kernel_report.shipped_specializations()[0]
    model = {"instructions_per_element": 53.75, "mufu_per_element": 3.19, "shuffles_per_iteration": 64,
             "barriers_per_iteration": 16, "global_accesses": "4xLDG.128", "memory_ms": 2.56, "time_ms": 3.45,
             "bound": "issue"}
    rows = [kernel_report.KernelResources(spec.kernel, spec.variant, f"sm_{a}", 64, 0, 0, 0, 8, 0.25, model)
            for a in kernel_report.ARCHS]
    lines = kernel_report.format_model_table(rows).splitlines()
    assert len(lines) == 3 and "53.8" in lines[2] and "4xLDG.128" in lines[2] and lines[2].count("3.45 issue") == 2


def test_the_topk_forward_that_reads_only_k_ids_is_not_modeled_as_a_vocabulary_stream():
    topk = [s for s in kernel_report.shipped_specializations() if s.kernel == "topk_forward_kernel"]
    ids_only = next(s for s in topk if not s.constexprs["FULL_PASS"])
    streaming = next(s for s in topk if s.constexprs["FULL_PASS"])
    assert kernel_report._model(ids_only, 90, SNIPPET, "toy_kernel") is None
    model = kernel_report._model(streaming, 90, SNIPPET, "toy_kernel")
    assert model is not None and model["memory_ms"] > 0 and model["loops"] == 1
