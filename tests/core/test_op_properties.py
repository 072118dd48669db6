"""Registration, compilation and numerical properties of the fused op."""

from __future__ import annotations

import pytest
import torch
from helpers import available_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distillkit
from distillkit.core import reference
from distillkit.core.divergences import IDS as DIVERGENCE_IDS
from distillkit.core.divergences import NAMES as DIVERGENCES
from distillkit.core.tolerances import EAGER_ERROR_FACTOR, compare

BACKENDS = available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "alpha_beta", None])
def test_opcheck(backend, divergence):
    student = torch.randn(3, 5, 1271, requires_grad=True)
    teacher = torch.randn(3, 5, 1271)
    labels = torch.randint(0, 1271, (3, 5))
    labels[0] = -100
    div_id = 0 if divergence is None else DIVERGENCE_IDS[divergence]
    torch.library.opcheck(torch.ops.distillkit.distill_rows.default,
                          (student, teacher if div_id else None, labels, div_id, 0.5, 0.3, 2.0, -100, True, 1271,
                           backend))
    stats = torch.ops.distillkit.distill_rows(student, teacher, labels, div_id, 0.5, 0.3, 2.0, -100, True, 1271,
                                             backend)[2]
    torch.library.opcheck(torch.ops.distillkit.distill_rows_backward.default,
                          (torch.rand(3, 5), torch.rand(3, 5), student.detach(), teacher, labels, stats, div_id,
                           0.5, 0.3, 2.0, -100, True, 1271, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    student = torch.randn(2, 6, 1271, requires_grad=True)
    teacher = torch.randn(2, 6, 1271)
    labels = torch.randint(0, 1271, (2, 6))
    labels[:, :2] = -100
    kl_weight = torch.rand(2, 6, requires_grad=True)

    def loss_fn(s, t, y, w):
        return distillkit.distill_loss(s, t, y, divergence="skew_reverse_kl", temperature=2.0, kl_weight=w,
                                       ce_weight=0.5, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, labels, kl_weight)
    grads = torch.autograd.grad(loss, (student, kl_weight))
    eager = loss_fn(student, teacher, labels, kl_weight)
    eager_grads = torch.autograd.grad(eager, (student, kl_weight))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_reference_gradcheck(divergence):
    student = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 11, dtype=torch.float64)
    labels = torch.tensor([1, -100, 10])
    kl_weight = torch.rand(3, dtype=torch.float64, requires_grad=True)

    def fn(s, w):
        return reference.distill_loss(s, teacher, labels, divergence=divergence, temperature=1.7, kl_weight=w,
                                      ce_weight=0.3, beta=0.4, skew=0.2)

    assert torch.autograd.gradcheck(fn, (student, kl_weight))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"] or ["torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_low_precision_error_within_factor_of_eager(backend, dtype, divergence):
    """In bf16/fp16 the fused op (fp32 math inside) must be no worse than EAGER_ERROR_FACTOR times what eager
    PyTorch gets computing the same loss in that dtype, measured against float64."""
    student = (torch.randn(16, 4096) * 4).to(dtype)
    teacher = (torch.randn(16, 4096) * 4).to(dtype)
    options = dict(divergence=divergence, temperature=2.0, reduction="none")
    exact = reference.distill_loss(student.double(), teacher.double(), **options)
    fused = distillkit.distill_loss(student, teacher, backend=backend, **options)
    eager = reference.distill_loss(student, teacher, **options)
    fused_err = (fused.double() - exact).abs().max()
    eager_err = (eager.double() - exact).abs().max()
    assert fused_err <= EAGER_ERROR_FACTOR * eager_err + 1e-6, (
        f"fused error {fused_err:.3e} vs eager {dtype} error {eager_err:.3e}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    vocab=st.integers(1, 700),
    divergence=st.sampled_from(DIVERGENCES),
    temperature=st.floats(0.25, 4.0),
    temperature_scaling=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ce_weight=st.sampled_from([0.0, 0.5]),
    scale=st.floats(0.1, 20.0),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_and_options(lead, vocab, divergence, temperature, temperature_scaling, reduction,
                                   ce_weight, scale, backend, seed):
    torch.manual_seed(seed)  # the tensors are a function of the drawn example: failures replay exactly
    lead = tuple(lead)
    student = torch.randn(*lead, vocab) * scale
    teacher = torch.randn(*lead, vocab) * scale
    labels = torch.randint(-1, vocab, lead).masked_fill_(torch.rand(lead) < 0.3, -100).clamp_min(-100)
    labels[labels == -1] = 0
    options = dict(divergence=divergence, temperature=temperature, temperature_scaling=temperature_scaling,
                   reduction=reduction, ce_weight=ce_weight, beta=0.7, skew=0.3)
    s = student.clone().requires_grad_()
    loss = distillkit.distill_loss(s, teacher, labels, backend=backend, **options)
    s64 = student.double().requires_grad_()
    ref = reference.distill_loss(s64, teacher.double(), labels, **options)
    s32 = student.clone().requires_grad_()
    eager = reference.distill_loss(s32, teacher, labels, **options)  # eager PyTorch in fp32
    for out in (loss, ref, eager):
        out.sum().backward()
    # fp32 resolves a logit / T only to eps * |logit / T|; with large logits at low temperature the row
    # statistics (lse, D ~ |logit / T|) carry that absolute error into every element of the gradient.
    # Bound: a few ops' worth of it, times the gradient's scale (1/T, T**2, and 1/tokens under "mean").
    max_logit = max(float(student.detach().abs().max()), float(teacher.abs().max())) if student.numel() else 0.0
    loss_scale = temperature**2 if temperature_scaling else 1.0
    grad_scale = loss_scale / temperature / (max(student[..., 0].numel(), 1) if reduction == "mean" else 1)
    resolution = 16 * torch.finfo(torch.float32).eps * max_logit / temperature
    fp32_floor = {"loss": resolution * loss_scale, "grad": resolution * grad_scale}
    for kind, got, want, eager_got in (("loss", loss, ref, eager), ("grad", s.grad, s64.grad, s32.grad)):
        result = compare(got, want, torch.float32, kind)
        eager_err = float((eager_got.detach().double() - want.detach()).abs().nan_to_num(0.0).max()) if want.numel() else 0.0
        assert result.ok or result.max_abs <= max(EAGER_ERROR_FACTOR * eager_err, fp32_floor[kind]), (
            f"{kind}: {result.describe()}; eager fp32 error {eager_err:.3e}; fp32 floor {fp32_floor[kind]:.3e}")


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_torch_compile_inductor(backend):
    """The default compiler (inductor) too: the op stays opaque, the O(tokens) code around it is fused."""
    student = torch.randn(4, 1271, requires_grad=True)
    teacher = torch.randn(4, 1271)
    compiled = torch.compile(
        lambda s, t: distillkit.distill_loss(s, t, divergence="tvd", temperature=0.5, backend=backend),
        fullgraph=True)
    loss = compiled(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    expected = distillkit.distill_loss(student, teacher, divergence="tvd", temperature=0.5, backend=backend)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, student)[0])
