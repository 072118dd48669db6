"""fused_linear_distill_loss with logit transforms (Gemma's soft cap, Cohere/Granite's scale): the loss and
gradients of the float64 reference on the transformed logits, softcap * tanh(scale * (h W^T + b) / softcap)."""

from __future__ import annotations

import pytest
import torch
from helpers import available_backends, compiled

from distillkit import fused_linear_distill_loss, reference
from distillkit.core.fused_linear import fused_linear_distill

N, H, V = 11, 8, 37


def _transform(z, scale, softcap):
    z = z * scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 3).requires_grad_()
    weight = (torch.randn(V, H, generator=g)).requires_grad_()  # logits of std ~8: the cap bites
    bias = torch.randn(V, generator=g).requires_grad_()
    t_hidden, t_weight = torch.randn(N, H, generator=g) * 3, torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[4] = -100
    return hidden, weight, bias, t_hidden, t_weight, labels


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("student, teacher", [((1.0, 5.0), (1.0, None)), ((1.0, None), (1.0, 4.0)),
                                              ((0.0625, None), (2.0, None)), ((0.5, 6.0), (1.5, 3.0))])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_the_reference_on_transformed_logits(backend, student, teacher, reduction):
    hidden, weight, bias, t_hidden, t_weight, labels = _inputs()
    options = dict(divergence="jsd", temperature=2.0, kl_weight=0.7, ce_weight=0.4, reduction=reduction)
    fused = fused_linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, student_bias=bias, chunk_size=4,
                                      backend=backend, student_logit_scale=student[0], student_softcap=student[1],
                                      teacher_logit_scale=teacher[0], teacher_softcap=teacher[1], **options)
    exact = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    s = _transform(torch.nn.functional.linear(*exact), *student)
    t = _transform(torch.nn.functional.linear(t_hidden.double(), t_weight.double()), *teacher)
    want = reference.distill_loss(s, t, labels, **options)
    torch.testing.assert_close(fused.double(), want, rtol=2e-5, atol=2e-6)
    grad_out = torch.rand(want.shape, dtype=torch.float64) + 0.5
    got = torch.autograd.grad((fused * grad_out.float()).sum(), (hidden, weight, bias))
    expected = torch.autograd.grad((want * grad_out).sum(), exact)
    for name, a, b in zip(("hidden", "weight", "bias"), got, expected):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5, msg=name)


def test_identity_transform_is_the_plain_op():
    hidden, weight, bias, t_hidden, t_weight, labels = _inputs(1)
    plain = fused_linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, ce_weight=0.5)
    same = fused_linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, ce_weight=0.5,
                                     student_logit_scale=1.0, teacher_softcap=None)
    assert torch.equal(plain, same)


@pytest.mark.parametrize("keyword, value, message", [
    ("student_softcap", 0.0, "student_softcap must be None or a finite number > 0"),
    ("teacher_softcap", float("inf"), "teacher_softcap must be None or a finite number > 0"),
    ("student_logit_scale", -1.0, "student_logit_scale must be a finite number > 0"),
    ("teacher_logit_scale", "2", "teacher_logit_scale must be a Python float"),
])
def test_bad_transforms_name_the_argument(keyword, value, message):
    hidden, weight, _, t_hidden, t_weight, labels = _inputs()
    with pytest.raises((ValueError, TypeError), match=message):
        fused_linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, **{keyword: value})


def test_opcheck_and_compile_with_transforms():
    hidden, weight, bias, t_hidden, t_weight, labels = _inputs()
    coef = torch.full((N,), 0.1)
    args = (hidden, weight, bias, t_hidden, t_weight, None, labels, coef, coef.clone(), 3, 0.5, 0.0, 2.0, -100,
            True, "torch", 4, True, True, True, True, True, 0.5, 6.0, 1.5, 3.0)
    torch.library.opcheck(fused_linear_distill, args)
    args_none = args[:17] + (False,) + args[18:]
    torch.library.opcheck(fused_linear_distill, args_none)

    def loss_fn(h, w):
        return fused_linear_distill_loss(h, w, t_hidden, t_weight, labels, ce_weight=0.5, check_labels=False,
                                         student_softcap=5.0, teacher_logit_scale=0.5, chunk_size=4)
    eager = loss_fn(hidden, weight)
    result = compiled(loss_fn, "cpu")(hidden, weight)
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(torch.autograd.grad(result, (hidden, weight)),
                               torch.autograd.grad(eager, (hidden, weight)))
