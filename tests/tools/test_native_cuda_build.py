"""The CUDA kernels of csrc/: compiled for sm_80 and sm_90 without spills, registered
when built, and (on a GPU) equal to the CPU kernels."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from distillkit.core.backends import _ext
from distillkit.tools import cuda_report

# Template instances the launchers can pick: ids 1-7 with 3x3 dtype pairs, CE-only (id 0) with 3; the
# shared-memory forward for the five two-pass ids 3-7.
EXPECTED = {"forward_stream_kernel": 7 * 9 + 3, "forward_smem_kernel": 5 * 9, "backward_kernel": 7 * 9 + 3}

needs_toolchain = pytest.mark.skipif(
    cuda_report.find_nvcc() is None or cuda_report.find_cuobjdump() is None,
    reason=f"needs nvcc and cuobjdump (nvcc={cuda_report.find_nvcc()}, cuobjdump={cuda_report.find_cuobjdump()})")


@pytest.fixture(scope="module")
def rows():
    return cuda_report.report()


@needs_toolchain
def test_every_kernel_compiles_for_both_archs(rows):
    for arch in cuda_report.ARCHS:
        counts = Counter(r["kernel"] for r in rows if r["arch"] == f"sm_{arch}")
        assert dict(counts) == EXPECTED, f"sm_{arch}: {dict(counts)}"


@needs_toolchain
def test_no_register_spills(rows):
    print("\n" + cuda_report.format_table(rows))
    spilled = [r for r in rows if r["spill_bytes"] or r["local_bytes"] or r["stack_bytes"]]
    assert not spilled, "spilling kernels:\n" + cuda_report.format_table(spilled)
    by_arch = {a: max(r["registers"] for r in rows if r["arch"] == f"sm_{a}") for a in cuda_report.ARCHS}
    print(f"max registers per arch: {by_arch}")


@needs_toolchain
def test_alpha_beta_kernels_for_every_dtype_pair(rows):
    """id 7 (its three forms inside each kernel) in every kernel and dtype pair, on both archs."""
    for arch in cuda_report.ARCHS:
        ab = [r for r in rows if r["arch"] == f"sm_{arch}" and r["variant"].startswith("div=7 ")]
        assert Counter(r["kernel"] for r in ab) == {k: 9 for k in EXPECTED}, f"sm_{arch}"
        print(f"sm_{arch} alpha_beta registers:",
              {k: sorted({r["registers"] for r in ab if r["kernel"] == k}) for k in EXPECTED})


def test_parse_reads_cuobjdump_and_ptxas_output():
    dump = ("Resource usage:\n Function _ZN10distillkit4cuda15backward_kernelILi1EffEEvNS0_9BwdParamsE:\n"
            "  REG:40 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    ptxas = ("ptxas info    : Function properties for _ZN10distillkit4cuda15backward_kernelILi1EffEEvNS0_9BwdParamsE\n"
             "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n")
    (row,) = cuda_report.parse(dump, ptxas, 90, "x.cu")
    assert (row["registers"], row["shared_bytes"], row["local_bytes"]) == (40, 1024, 8)
    assert (row["spill_stores"], row["spill_loads"], row["spill_bytes"]) == (12, 16, 16)
    if row["kernel"] == "backward_kernel":  # demangled (c++filt present)
        assert row["variant"] == "div=1 student=float teacher=float"


def test_report_flags_match_the_extension_build():
    from torch.utils import cpp_extension

    assert tuple(cpp_extension.COMMON_NVCC_FLAGS) == cuda_report.TORCH_NVCC_FLAGS


def _built_with_cuda() -> bool:
    with open(_ext._C.__file__, "rb") as f:
        return b"backward_kernel" in f.read()


@pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")
def test_cuda_kernels_registered_when_built():
    ops = ("rows_forward", "rows_backward")
    assert not hasattr(torch.ops.distillkit_ext, "rows_backward_into")  # no out variant
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"distillkit_ext::{op}", "CPU"), op
    if not _built_with_cuda():
        pytest.skip("the extension was built without its CUDA part")
    for op in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"distillkit_ext::{op}", "CUDA"), op
    assert _ext.cuda_built()
    cuobjdump = cuda_report.find_cuobjdump()
    if cuobjdump:
        import subprocess

        elves = subprocess.run([cuobjdump, "--list-elf", _ext._C.__file__], capture_output=True, text=True).stdout
        assert "sm_80" in elves and "sm_90" in elves, elves


# -- on a GPU: the CUDA kernels against the CPU kernels ------------------------------------------------

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.available() and _ext.cuda_built()),
                               reason="needs a GPU and the CUDA part of the extension")


def _params(div):
    return (0.7, 0.4) if div == 7 else (0.3, 0.0)


@needs_gpu
@pytest.mark.parametrize("path", ["auto", "stream"])
@pytest.mark.parametrize("vocab,div_vocab", [(1271, 1271), (32000, 32000), (262144, 262144), (32064, 32000),
                                             (1271, 999)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("div", range(8))
def test_cuda_matches_cpu(div, dtype, vocab, div_vocab, path, monkeypatch):
    """Row-strided, unaligned rows; the teacher wider than div_vocab (its own row stride) where div_vocab < V."""
    if path == "stream":
        monkeypatch.setenv("DISTILLKIT_CUDA_PATH", "stream")
    g = torch.Generator().manual_seed(vocab + div)
    rows = 5
    s = (torch.randn(rows, vocab + 7, generator=g) * 2).to(dtype)[:, 3:3 + vocab]  # row-strided, unaligned
    t = (torch.randn(rows, div_vocab + 40, generator=g) * 2).to(dtype)[:, 3:3 + div_vocab + 30]
    t[1, ::5] = float("-inf")
    if div == 2:
        s[1, :div_vocab:5] = float("-inf")
    y = torch.tensor([0, 1, -100, vocab, vocab - 1])
    gd, gc = torch.rand(rows, generator=g), torch.rand(rows, generator=g)
    gd[0] = gc[0] = 0.0
    args = (div, *_params(div), 1.7, -100, True, div_vocab)
    teacher = t if div else None
    cpu = torch.ops.distillkit_ext.rows_forward(s, teacher, y, *args)
    gpu = torch.ops.distillkit_ext.rows_forward(s.cuda(), teacher.cuda() if div else None, y.cuda(), *args)
    for name, a, b in zip(("div", "ce", "stats"), cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=2e-4, atol=2e-4, msg=name)
    g_cpu = torch.ops.distillkit_ext.rows_backward(gd, gc, s, teacher, y, cpu[2], *args)
    g_gpu = torch.ops.distillkit_ext.rows_backward(gd.cuda(), gc.cuda(), s.cuda(), teacher.cuda() if div else None,
                                                   y.cuda(), gpu[2], *args)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(g_gpu.cpu().float(), g_cpu.float(), rtol=tol,
                               atol=tol * g_cpu.float().abs().max().item())
    assert torch.equal(g_gpu[0].cpu(), torch.zeros_like(g_cpu[0]))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("div", range(1, 8))
def test_cuda_row_contract_edge_cases(div, dtype):
    """The 0.2.0 row contract on the GPU: huge logits, NaN / +inf / all -inf teacher rows, no subnormal gradient
    entries, and reverse KL of identical rows exactly 0 (tests/core/test_native_cpu_edges.py checks the same on
    the CPU)."""
    ops, v = torch.ops.distillkit_ext, 512
    g = torch.Generator().manual_seed(div)
    s = torch.randn(7, v, generator=g) * 30
    t = torch.randn(7, v, generator=g) * 60  # sharp: subnormal gradient entries unless flushed
    t[0, 17] = float("nan")
    t[1, 250] = float("inf")
    t[2] = float("-inf")
    t[3, ::3] = s[3, ::3] = float("-inf")
    s[4] = t[4]  # identical rows
    if dtype != torch.float16:
        s[5, :2], s[5, 2:] = 1e8, 0.0  # q = [0.5, 0.5, 0, ...] only with the raw max apart from the log-sum
    s, t = s.to(dtype), t.to(dtype)
    y = torch.tensor([5, 0, v - 1, 1, 7, -100, 3])
    args = (div, *_params(div), 1.0, -100, True, v)
    d, ce, st = (x.cpu() for x in ops.rows_forward(s.cuda(), t.cuda(), y.cuda(), *args))
    d_cpu, ce_cpu, st_cpu = ops.rows_forward(s, t, y, *args)
    assert d[:3].isnan().all() and d[3:].isfinite().all() and ce.isfinite().all()
    assert torch.equal(d.isnan(), d_cpu.isnan()) and torch.equal(st.isnan(), st_cpu.isnan())
    torch.testing.assert_close(d[3:], d_cpu[3:], rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(ce, ce_cpu, rtol=2e-4, atol=2e-4)
    if div == 2:
        assert d[4] == 0
    gd, gc = torch.full((7,), 1e-3), torch.full((7,), 1e-3)
    gd[:3] = 0.0  # the broken rows: CE only, no NaN
    grad = ops.rows_backward(gd.cuda(), gc.cuda(), s.cuda(), t.cuda(), y.cuda(), st.cuda(), *args).cpu()
    grad_cpu = ops.rows_backward(gd, gc, s, t, y, st_cpu, *args)
    tiny = torch.finfo(torch.float32).tiny  # float16 keeps its own subnormals
    assert not grad.isnan().any() and not ((grad != 0) & (grad.float().abs() < tiny)).any()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(grad.float(), grad_cpu.float(), rtol=tol,
                               atol=tol * grad_cpu.float().abs().max().item() + tiny)
