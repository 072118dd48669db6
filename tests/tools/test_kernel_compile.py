"""Every shipped Triton specialization compiles for sm_80 and sm_90 with zero register spills.

Runs `distillkit kernels --check` in a fresh process without TRITON_INTERPRET (the
interpreter replaces the compiler at import time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from distillkit.tools.kernel_report import ARCHS, occupancy, parse_resource_usage, shipped_specializations


def test_parse_resource_usage():
    text = (" Function distill_forward_kernel:\n  REG:98 STACK:0 SHARED:1024 LOCAL:16 CONSTANT[0]:632 TEXTURE:0\n"
            " Function other:\n  REG:40 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:1\n")
    assert parse_resource_usage(text) == [("distill_forward_kernel", 98, 0, 1024, 16), ("other", 40, 8, 0, 0)]
    # 128 regs x 8 warps: the register file holds 2 blocks = 16 of 64 warps.
    assert occupancy(90, 128, 8, 0) == 0.25
    # 32 regs x 4 warps: 16 blocks fill all 64 warps.
    assert occupancy(80, 32, 4, 0) == 1.0
    # shared memory bound: 100 KB per block on sm_80 (164 KB per SM) leaves one block.
    assert abs(occupancy(80, 32, 4, 100 * 1024) - 4 / 64) < 1e-3


def test_every_triton_specialization_compiles_without_spills(tmp_path):
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # --no-model: the SASS counts are tested in test_triton_sass.py; here only registers and spills matter.
    proc = subprocess.run([sys.executable, "-m", "distillkit.tools.kernel_report", "--check", "--no-cuda", "--no-model",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    expected = len(list(shipped_specializations())) * len(ARCHS)
    assert len(rows) == expected, f"compiled {len(rows)} kernels, expected {expected}"
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS}
    spilled = [r for r in rows if r["spill_bytes"] > 0]
    assert not spilled, f"kernels spill: {spilled[:5]}"
    worst = max(rows, key=lambda r: r["registers"])
    print(f"\n{len(rows)} kernels, max {worst['registers']} registers ({worst['kernel']} {worst['variant']} "
          f"{worst['arch']})")
