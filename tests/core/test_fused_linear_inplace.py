"""The C++ CPU kernel's fused row op of the logits-free chunk loop (distillkit/core/backends/cpu_fused.py):
`rows_forward_backward_` gives the values of `rows_forward` + `rows_backward` bit for bit and writes the gradient
over the student rows; the loop's buffers, its chunk sizing and the grad_output == 1 shortcut of the backward
change no result."""

from __future__ import annotations

import pytest
import torch
from native_cpu_oracle import IGNORE, backward, forward, needs_ext, ops, params

from distillkit.core import fused_linear
from distillkit.core.backends import cpu_fused
from distillkit.core.fused_linear import default_chunk_size, fused_linear_distill_loss

pytestmark = needs_ext


def _rows(n, v, dtype, scale=3.0):
    gen = torch.Generator().manual_seed(n * 131 + v)
    s = (torch.randn(n, v, generator=gen) * scale).to(dtype)
    t = (torch.randn(n, v, generator=gen) * scale).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    y[1] = IGNORE
    gd, gc = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    gd[2] = gc[2] = 0.0  # a masked row: zeros
    gd[3] = 0.0  # CE only
    s[4, 5] = float("nan")  # NaN in, NaN out
    s[5, :7] = float("-inf")
    t[5, 3] = 80.0  # a confident teacher row
    return s, t, y, gd, gc


@pytest.mark.parametrize("div", range(8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,div_vocab", [(1.0, None), (2.0, None), (1.0, 700)])
def test_fused_op_equals_the_two_ops(div, dtype, temperature, div_vocab):
    n, v = 9, 1031
    s, t, y, gd, gc = _rows(n, v, dtype)
    vd = v if div_vocab is None else div_vocab
    d, e, stats = forward(s, t, y, div, temperature, div_vocab=vd)
    grad = backward(gd, gc, s, t, y, stats, div, temperature, div_vocab=vd)
    inout = s.clone()
    d2, e2 = ops().rows_forward_backward_(gd, gc, inout, t if div else None, y, div, *params(div), temperature,
                                         IGNORE, True, vd)
    for got, want in ((d2, d), (e2, e), (inout, grad)):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


@pytest.mark.parametrize("div", [0, 1, 3])
def test_fused_op_passes_opcheck(div):
    """Schema (the student is mutated: Tensor(a!)), fake implementation and dispatch agree (torch.library.opcheck)."""
    s, t, y, gd, gc = _rows(6, 257, torch.float32)
    s = torch.nan_to_num(s, nan=0.0)
    torch.library.opcheck(getattr(torch.ops.distillkit_ext, cpu_fused.OP).default,
                          (gd, gc, s, t if div else None, y, div, *params(div), 1.0, IGNORE, True, 257),
                          test_utils=("test_schema", "test_faketensor"))


def test_fused_op_checks_its_student():
    s, t, y, gd, gc = _rows(6, 64, torch.float32)
    with pytest.raises(RuntimeError, match="student must be contiguous"):
        ops().rows_forward_backward_(gd, gc, torch.randn(6, 128)[:, :64], t, y, 1, 0.3, 0.0, 1.0, IGNORE, True, 64)
    with pytest.raises(RuntimeError, match="grad_div must have shape"):
        ops().rows_forward_backward_(gd[:5], gc, s, t, y, 1, 0.3, 0.0, 1.0, IGNORE, True, 64)


def _problem(n=37, h=24, v=517, std=1.0, bias=False):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen) * std
    weight = torch.randn(v, h, generator=gen) * h**-0.5
    th, tw = torch.randn(n, 16, generator=gen) * std, torch.randn(v, 16, generator=gen) * 16**-0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::5] = IGNORE
    b = torch.randn(v, generator=gen) if bias else None
    return hidden, weight, th, tw, labels, b


def _loss_and_grads(monkeypatch, fused: bool, grad_output=None, **options):
    if not fused:
        monkeypatch.setattr(cpu_fused, "usable", lambda backend, student: False)
    hidden, weight, th, tw, labels, b = _problem(bias="student_bias" in options)
    options.pop("student_bias", None)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()] + ([b.requires_grad_()] if b is not None else [])
    loss = fused_linear_distill_loss(hidden, weight, th, tw, labels, student_bias=b, backend="cpu", **options)
    grads = torch.autograd.grad(loss, leaves, grad_output)
    monkeypatch.undo()
    return loss, grads


@pytest.mark.parametrize("options", [
    dict(divergence="forward_kl", ce_weight=0.5, chunk_size=8),
    dict(divergence="jsd", temperature=2.0, ce_weight=0.3, chunk_size=5, student_bias=True),
    dict(divergence="reverse_kl", reduction="sum", student_logit_scale=0.5, chunk_size=11),
    dict(divergence="tvd", reduction="none", chunk_size=7),
])
def test_the_chunk_loop_gives_the_same_results_with_the_fused_op(monkeypatch, options):
    grad_output = torch.rand(37) + 0.5 if options.get("reduction") == "none" else None
    loss, grads = _loss_and_grads(monkeypatch, True, grad_output, **options)
    loss_ref, grads_ref = _loss_and_grads(monkeypatch, False, grad_output, **options)
    assert torch.equal(loss, loss_ref)
    for g, r in zip(grads, grads_ref):
        assert torch.equal(g, r)


def test_a_unit_grad_output_returns_the_forward_gradients_as_they_are():
    hidden, weight, th, tw, labels, _ = _problem()
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    loss = fused_linear_distill_loss(hidden, weight, th, tw, labels, ce_weight=0.5, backend="cpu")
    ones = torch.autograd.grad(loss, leaves, torch.tensor(1.0), retain_graph=True)
    twice = torch.autograd.grad(loss, leaves, torch.tensor(2.0), retain_graph=True)
    again = torch.autograd.grad(loss, leaves, torch.tensor(1.0))
    for a, b, c in zip(ones, twice, again):
        assert torch.equal(2 * a, b) and torch.equal(a, c)
    assert cpu_fused.is_one(torch.tensor(1.0)) and not cpu_fused.is_one(torch.tensor(1.0, requires_grad=True))
    assert not cpu_fused.is_one(torch.tensor(0.5)) and not cpu_fused.is_one(torch.ones(2))


def test_in_place_chunks_count_only_the_chunk_logits():
    v = 32000
    assert default_chunk_size(v, v, 4, 4, 256 * 2**20, in_place=True) == 256 * 2**20 // (8 * v)
    assert default_chunk_size(v, v, 2, 2, 256 * 2**20, in_place=True) == 256 * 2**20 // (8 * v)  # + an fp32 copy
    assert default_chunk_size(v, v, 4, 4, 256 * 2**20) == 256 * 2**20 // (28 * v)
    assert cpu_fused.available("cpu", torch.device("cpu")) and not cpu_fused.available("torch", torch.device("cpu"))
    assert fused_linear.cpu_fused is cpu_fused
