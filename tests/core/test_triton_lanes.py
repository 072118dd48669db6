"""The Triton kernels' per-lane running state and the student stream shared at T == 1.

The vocabulary loop keeps (max, sum, KL sum, ref) per lane and merges the lanes once per row: a row
whose maximum moves between lanes and blocks, at extreme logits, must give what float64 gives, and
the SHARED_STUDENT specialization (T == 1 over the whole vocabulary: one exponential for the student
at T and for CE) must give what the general kernels give.
"""

from __future__ import annotations

import pytest
import torch
from helpers import available_backends

import distillkit
from distillkit.core import divergences, reference
from distillkit.core.backends import triton_rows
from distillkit.core.tolerances import compare

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="needs the Triton backend")

BLOCK_V = triton_rows.FORWARD_CONFIG["BLOCK_V"]
VOCAB = BLOCK_V + 40  # two blocks, the second one partial


def loss_and_grad(backend, student, teacher, labels, **options):
    s = student.detach().clone().requires_grad_()
    if backend == "reference":
        s = student.detach().double().requires_grad_()
        loss = reference.distill_loss(s, teacher.double(), labels, **options)
    else:
        loss = distillkit.distill_loss(s, teacher, labels, backend=backend, **options)
    loss.sum().backward()
    return loss.detach(), s.grad


def moving_max_rows(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose maxima sit in different lanes of different blocks: the max moves up lane by lane, then
    to the partial block; teacher and student peak at different ids."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, VOCAB, generator=g) - scale
    teacher = torch.randn(3, VOCAB, generator=g) - scale
    for k, idx in enumerate((3, 9, 700, 2049, BLOCK_V - 1, BLOCK_V + 17)):
        teacher[0, idx] = scale + k
        student[0, VOCAB - 1 - idx] = scale + 2 * k
    teacher[1], student[1] = teacher[0].flip(0), student[0].flip(0)
    teacher[2, ::2] = float("-inf")  # a masked half of the vocabulary, and a student peak where it is masked
    student[2, 10] = scale + 50.0
    teacher[2, 11] = scale
    return student, teacher


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("scale", [1.0, 1e4, 1e8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_max_moving_between_lanes_matches_float64(divergence, scale, temperature):
    student, teacher = moving_max_rows(scale)
    labels = torch.tensor([5, BLOCK_V + 3, 7])
    options = dict(divergence=divergence, temperature=temperature, kl_weight=0.5, ce_weight=0.5, reduction="none")
    loss, grad = loss_and_grad("triton", student, teacher, labels, **options)
    expected, expected_grad = loss_and_grad("reference", student, teacher, labels, **options)
    loss_ok = compare(loss, expected, torch.float32, "loss")
    finite = expected.isfinite()  # reverse KL is +inf on row 2; autograd's gradient there is no contract
    grad_ok = compare(grad[finite], expected_grad[finite], torch.float32, "grad")
    assert loss_ok.ok, loss_ok.describe()
    assert grad_ok.ok, grad_ok.describe()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("scale", [1e4, 1e8])
def test_identical_rows_across_lanes_give_exactly_zero(divergence, scale):
    student, _ = moving_max_rows(scale)
    loss, grad = loss_and_grad("triton", student, student.clone(), None, divergence=divergence, reduction="none")
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


def run_kernels(student, teacher, labels, divergence, shared: bool):
    """(div, ce, stats, grad) of the row kernels with SHARED_STUDENT forced on or off, at T == 1."""
    original = triton_rows.shares_student
    triton_rows.shares_student = lambda *args: shared
    try:
        div, ce, stats = triton_rows.forward(student, teacher, labels, divergence, 0.3, 0.0, 1.0, -100, True, VOCAB)
        grad = triton_rows.backward(torch.full_like(div, 0.7), torch.full_like(ce, 0.4), student, teacher, labels,
                                    stats, divergence, 0.3, 0.0, 1.0, -100, True, VOCAB)
    finally:
        triton_rows.shares_student = original
    return div, ce, stats, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_shared_student_equals_the_general_kernels(divergence, dtype):
    student, teacher = moving_max_rows(1e4)
    student, teacher = student.to(dtype), teacher.to(dtype)
    labels = torch.tensor([5, BLOCK_V + 3, 7])
    div_id = divergences.IDS[divergence]
    shared = run_kernels(student, teacher, labels, div_id, True)
    general = run_kernels(student, teacher, labels, div_id, False)
    for name, a, b in zip(("div", "ce", "stats", "grad"), shared, general):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)


def test_launcher_shares_only_at_temperature_one_over_the_whole_vocabulary():
    assert triton_rows.shares_student(1, True, True, 1.0, 10, 10)
    assert not triton_rows.shares_student(1, True, True, 2.0, 10, 10)
    assert not triton_rows.shares_student(1, True, True, 1.0, 8, 10)
    assert not triton_rows.shares_student(1, False, True, 1.0, 10, 10)
    assert not triton_rows.shares_student(0, True, True, 1.0, 10, 10)
    assert not triton_rows.shares_student(1, True, False, 1.0, 10, 10)
