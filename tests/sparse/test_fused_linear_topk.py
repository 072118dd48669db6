"""fused_linear_distill_loss_topk: distill_loss_topk from hidden states and an LM head without the [N, V]
student logits. Checked against distill_loss_topk on the materialized logits (loss and every gradient, per-token
weight gradients included), on every tail, reduction and backend; and through opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import available_backends, compiled

from distillkit.sparse.fused_linear_topk import fused_linear_distill_loss_topk, fused_linear_topk
from distillkit.sparse.tails import TAILS
from distillkit.sparse.topk import distill_loss_topk

N, H, V, K = 13, 8, 37, 5


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 2).to(dtype).requires_grad_()
    bias = (torch.randn(V, generator=g) / 4).to(dtype).requires_grad_()
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    ids[2, 3:] = -1  # absent entries
    ids[5] = -1  # a token without teacher
    logprobs = torch.log_softmax(torch.randn(N, K, generator=g) * 2, -1) - 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 7]] = -100
    kl_weight = torch.rand(N, generator=g).requires_grad_()
    return hidden, weight, bias, ids, logprobs, labels, kl_weight


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("backend", available_backends("cpu", op="topk"))
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_the_logits_op(backend, tail, reduction):
    hidden, weight, bias, ids, logprobs, labels, kl_weight = _inputs()
    options = dict(tail=tail, teacher_temperature=1.5, temperature=2.0, kl_weight=kl_weight, ce_weight=0.3,
                   reduction=reduction, backend=backend)
    fused = fused_linear_distill_loss_topk(hidden, weight, ids, logprobs, labels, student_bias=bias, chunk_size=4,
                                           **options)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    want = distill_loss_topk(logits, ids, logprobs, labels, **options)
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-6)
    grad_out = torch.rand_like(want) + 0.5  # grad_output != 1
    got = _grads((fused * grad_out).sum(), (hidden, weight, bias, kl_weight))
    expected = _grads((want * grad_out).sum(), (hidden, weight, bias, kl_weight))
    for name, a, b in zip(("hidden", "weight", "bias", "kl_weight"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_within_the_logits_ops_error():
    hidden, weight, bias, ids, logprobs, labels, _ = _inputs(torch.bfloat16)
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    reference = distill_loss_topk(torch.nn.functional.linear(*exact), ids, logprobs, labels, ce_weight=0.5,
                                  backend="torch")
    fused = fused_linear_distill_loss_topk(hidden, weight, ids, logprobs, labels, student_bias=bias, ce_weight=0.5,
                                           chunk_size=5)
    eager = distill_loss_topk(torch.nn.functional.linear(hidden, weight, bias), ids, logprobs, labels,
                              ce_weight=0.5)
    fused, eager, reference = float(fused.detach()), float(eager.detach()), float(reference.detach())
    assert abs(fused - reference) <= 2 * abs(eager - reference) + 1e-5


def test_nan_in_is_nan_out():
    hidden, weight, bias, ids, logprobs, labels, _ = _inputs()
    hidden = hidden.detach().clone()
    hidden[3, 0] = float("nan")
    assert torch.isnan(fused_linear_distill_loss_topk(hidden, weight, ids, logprobs, labels))


def test_errors_name_the_argument():
    hidden, weight, bias, ids, logprobs, labels, _ = _inputs()
    with pytest.raises(ValueError, match="tail must be one of"):
        fused_linear_distill_loss_topk(hidden, weight, ids, logprobs, labels, tail="spread")
    with pytest.raises(ValueError, match="student_full.*forward_kl"):
        fused_linear_distill_loss_topk(hidden, weight, ids, logprobs, labels, tail="student_full",
                                       divergence="reverse_kl")
    with pytest.raises(ValueError, match="student_weight has shape"):
        fused_linear_distill_loss_topk(hidden, weight[:, :4], ids, logprobs, labels)
    with pytest.raises(ValueError, match=r"teacher_topk_ids .* must both be \(13,\) \+ \(K,\)"):
        fused_linear_distill_loss_topk(hidden, weight, ids[:4], logprobs[:4], labels)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_linear_distill_loss_topk(hidden, weight, ids, logprobs, labels, chunk_size=0)


def test_opcheck_and_compile():
    hidden, weight, bias, ids, logprobs, labels, _ = _inputs()
    coef = torch.full((N,), 0.1)
    args = (hidden, weight, bias, ids, logprobs.float(), torch.zeros(N), labels, coef, coef.clone(), 1, 1, 1.0,
            -100, True, "torch", 4, True, True, True, True, True)
    torch.library.opcheck(fused_linear_topk, args)

    def loss_fn(h, w, b):
        return fused_linear_distill_loss_topk(h, w, ids, logprobs, labels, student_bias=b, ce_weight=0.5,
                                              check_labels=False, chunk_size=4)
    eager = loss_fn(hidden, weight, bias)
    compiled_loss = compiled(loss_fn, "cpu")(hidden, weight, bias)
    torch.testing.assert_close(compiled_loss, eager)
    torch.testing.assert_close(_grads(compiled_loss, (hidden, weight)), _grads(eager, (hidden, weight)))
