"""The native ops themselves: their schema and argument checks (each naming the argument), unknown divergence
ids, opcheck and torch.compile, and which CPU loops run (the whole test_native_cpu_* group is run once more
on the portable loops)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch
from native_cpu_oracle import IGNORE, MIX, forward, make_inputs, needs_ext, ops, params, row_grads

from distillkit.core.backends import _ext

pytestmark = needs_ext

FWD = ("rows_forward(Tensor student, Tensor? teacher, Tensor? labels, int divergence, float param_a, "
       "float param_b, float temperature, int ignore_index, bool with_ce, int div_vocab) -> (Tensor, Tensor, Tensor)")
BWD = ("rows_backward(Tensor grad_div, Tensor grad_ce, Tensor student, Tensor? teacher, Tensor? labels, "
       "Tensor stats, int divergence, float param_a, float param_b, float temperature, int ignore_index, "
       "bool with_ce, int div_vocab) -> Tensor")


def test_schemas_and_no_out_variant():
    assert str(ops().rows_forward.default._schema) == "distillkit_ext::" + FWD
    assert str(ops().rows_backward.default._schema) == "distillkit_ext::" + BWD
    assert not hasattr(ops(), "rows_backward_into")


def _fwd(s, t, y, div=1, a=MIX, b=0.0, temperature=1.0, with_ce=True, div_vocab=None):
    return ops().rows_forward(s, t, y, div, a, b, temperature, IGNORE, with_ce,
                              s.shape[-1] if div_vocab is None else div_vocab)


def _bwd(gd, gc, s, t, y, stats, div=1, div_vocab=64):
    return ops().rows_backward(gd, gc, s, t, y, stats, div, MIX, 0.0, 1.0, IGNORE, True, div_vocab)


@pytest.mark.parametrize("call,match", [
    (lambda s, t, y: _fwd(s[None], t, y), "student must be 2-D"),
    (lambda s, t, y: _fwd(s.t(), t.t(), y, with_ce=False), "student must have a contiguous"),
    (lambda s, t, y: _fwd(s.double(), t, y), "student must be float32"),
    (lambda s, t, y: _fwd(s, None, y), "teacher must be given"),
    (lambda s, t, y: _fwd(s, t[:, :-1], y), r"teacher must have shape \[6, >= div_vocab = 64\]"),
    (lambda s, t, y: _fwd(s, t[:-1], y), r"teacher must have shape \[6, >= div_vocab"),
    (lambda s, t, y: _fwd(s, t, None), "labels must be given"),
    (lambda s, t, y: _fwd(s, t, y.int()), "labels must be int64"),
    (lambda s, t, y: _fwd(s, t, y[:-1]), "labels must have shape"),
    (lambda s, t, y: _fwd(s, t, y, temperature=0.0), "temperature must be"),
    (lambda s, t, y: _fwd(s, t, y, div=3, a=1.5), r"param_a \(beta or skew\) must lie in \[0, 1\]"),
    (lambda s, t, y: _fwd(s, t, y, div=7, a=0.0, b=0.0), r"param_a \(alpha\) and param_b \(beta\) must be >= 0"),
    (lambda s, t, y: _fwd(s, t, y, div=7, a=-0.5, b=1.0), r"param_a \(alpha\) and param_b \(beta\)"),
    (lambda s, t, y: _fwd(s, t, y, div=1, b=float("nan")), "param_a and param_b must be finite"),
    (lambda s, t, y: _fwd(s, t, y, div_vocab=0), r"div_vocab must lie in \[1, 64\]"),
    (lambda s, t, y: _fwd(s, t, y, div_vocab=65), r"div_vocab must lie in \[1, 64\].*got 65"),
    (lambda s, t, y: _bwd(torch.ones(6), torch.ones(6), s, t, y, torch.zeros(6, 8), div_vocab=65),
     r"div_vocab must lie in \[1, 64\]"),
    (lambda s, t, y: _bwd(torch.ones(3), torch.ones(6), s, t, y, torch.zeros(6, 8)), "grad_div must have shape"),
    (lambda s, t, y: _bwd(torch.ones(6), torch.ones(6).double(), s, t, y, torch.zeros(6, 8)),
     "grad_ce must be float32"),
    (lambda s, t, y: _bwd(torch.ones(6), torch.ones(6), s, t, y, torch.zeros(6, 3)), "stats must have shape"),
])
def test_argument_checks_name_the_argument(call, match):
    s, t, y = make_inputs(torch.float32, 64, 1, strided=False)
    with pytest.raises(RuntimeError, match=match):
        call(s, t, y)


@pytest.mark.parametrize("div", [8, -1, 1000])
def test_unknown_divergence_ids_raise(div):
    """No fallback to another divergence: the ops name the valid range and where the ids come from."""
    s, t, y = make_inputs(torch.float32, 64, 1, strided=False)
    match = r"divergence must be an id in \[0, 7\] \(distillkit/core/divergences.py\); got " + str(div)
    with pytest.raises(RuntimeError, match=match):
        _fwd(s, t, y, div=div)
    with pytest.raises(RuntimeError, match=match):
        _bwd(torch.ones(6), torch.ones(6), s, t, y, torch.zeros(6, 8), div=div)


def test_ids_match_the_python_side():
    from distillkit.core import divergences

    assert divergences.MAX_ID == 7 and divergences.IDS["alpha_beta"] == 7


@pytest.mark.parametrize("div,with_ce,div_vocab", [(1, True, 300), (3, False, 300), (0, True, 300), (7, True, 300),
                                                   (2, True, 211), (7, False, 157)])
def test_opcheck(div, with_ce, div_vocab):
    s, t, y = make_inputs(torch.float32, 300, div)
    teacher, labels = (t if div else None), (y if with_ce else None)
    fwd_args = (s, teacher, labels, div, *params(div), 1.5, IGNORE, with_ce, div_vocab)
    torch.library.opcheck(ops().rows_forward.default, fwd_args)
    _, _, stats = ops().rows_forward(*fwd_args)
    gd, gc = row_grads(s.shape[0])
    torch.library.opcheck(ops().rows_backward.default,
                          (gd, gc, s, teacher, labels, stats, div, *params(div), 1.5, IGNORE, with_ce, div_vocab))


def test_compiles_without_graph_break():
    s, t, y = make_inputs(torch.float32, 500, 7, strided=False)
    t = torch.cat([t, torch.randn(t.shape[0], 30)], 1)  # a wider teacher: the divergence over the first 500 ids

    def f(s, t, y):
        dv, ce, stats = forward(s, t, y, 7, 2.0)
        return dv.sum() + ce.sum(), stats

    eager = f(s, t, y)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(s, t, y)
    assert torch.allclose(eager[0], compiled[0]) and torch.allclose(eager[1], compiled[1])


def test_cpu_loops_follow_the_cpu_and_the_switch():
    loops = _ext._C.cpu_loops()
    if os.environ.get("DISTILLKIT_CPU_CAPABILITY") == "portable":
        assert loops == "portable"
        return
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("CPU flags are read from /proc/cpuinfo")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    has_avx512 = {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= set(flags)
    assert loops == ("avx512" if has_avx512 else "portable")
    assert f"cpu loops: {loops}" in _ext.describe()


@pytest.mark.skipif(os.environ.get("DISTILLKIT_CPU_CAPABILITY") == "portable", reason="already the portable run")
def test_portable_loops_pass_the_native_cpu_tests():
    """The hand-written AVX-512 loops are what this CPU runs when it has AVX-512; the compiler-vectorized
    (portable) loops run everywhere else. Run every test_native_cpu_* file once more on the portable ones."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "test_native_cpu_*.py")))
    env = dict(os.environ, DISTILLKIT_CPU_CAPABILITY="portable")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
