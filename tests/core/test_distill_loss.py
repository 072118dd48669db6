"""The fused op against the float64 reference, over the option matrix.

Every case runs the backend on the given dtype and the reference on float64 CPU copies of
the same (already rounded) inputs, then compares loss and gradient under the one
tolerance table (distillkit.core.tolerances); a failure prints the worst mismatch.
The device (CPU, and CUDA where there is a GPU) and torch.compile are axes of the matrix.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import DEVICES, DTYPES, available_backends, compiled

import distillkit
from distillkit.core import reference
from distillkit.core.divergences import NAMES as DIVERGENCES
from distillkit.core.tolerances import compare

BACKENDS = available_backends()
VOCABS = [1271, 4096, 50257]
TEMPERATURES = [0.5, 1.0, 2.3]
WEIGHT_MODES = ["scalar", "per_token", "zeros"]
LABEL_MODES = ["none_ignored", "some_ignored", "all_ignored"]
REDUCTIONS = ["mean", "sum", "none"]


def make_logits(lead, vocab, dtype, *, noncontiguous=False, scale=3.0):
    """Logits of shape lead + (vocab,); non-contiguous means strided leading dims and a sliced vocab."""
    if not noncontiguous:
        return (torch.randn(*lead, vocab) * scale).to(dtype)
    # [S, B, V+7] -> slice the vocabulary (last dim stays contiguous inside a wider row) and
    # transpose the batch dims, so the kernel sees two independent leading strides.
    wide = (torch.randn(lead[1], lead[0], vocab + 7) * scale).to(dtype)
    return wide[..., :vocab].transpose(0, 1)


def make_labels(lead, vocab, mode):
    labels = torch.randint(0, vocab, lead)
    if mode == "some_ignored":
        labels[..., ::3] = -100
    elif mode == "all_ignored":
        labels.fill_(-100)
    return labels


def make_weights(lead, mode, *, requires_grad=False):
    if mode == "scalar":
        return 0.6, 0.4
    if mode == "zeros":
        return 0.0, 0.0
    kl = torch.rand(lead)
    kl[..., 0] = 0.0  # a token left out of the divergence
    ce = torch.rand(lead)
    return kl.requires_grad_(requires_grad), ce.requires_grad_(requires_grad)


def run_both(backend, student, teacher, labels, *, grad_output=None, device="cpu", compile=False, **options):
    """(loss, student grad) from the backend on `device` (compiled or eager) and from the float64 reference
    on CPU, both on CPU for the comparison."""

    def fused(*args, **kwargs):
        return distillkit.distill_loss(*args, backend=backend, **kwargs)

    results = []
    for impl, cast in (((compiled(fused, device) if compile else fused), lambda x: x.to(device)),
                       (reference.distill_loss, lambda x: x.double())):
        s = cast(student.detach()).requires_grad_()
        t = None if teacher is None else cast(teacher)
        weights = {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        loss = impl(s, t, None if labels is None else labels.to(s.device), **weights)
        go = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype).to(loss.device)
        loss.backward(go)
        results.append((loss.cpu(), s.grad.cpu()))
    return results


def assert_close(actual, expected, dtype, kind, context):
    result = compare(actual, expected, dtype, kind)
    assert result.ok, f"{kind} mismatch ({context}): {result.describe()}"


def _cases():
    """Every divergence x dtype x vocabulary size; the other options rotate so that each value of each
    option meets every divergence (a full product would be 6 x 3 x 3 x 3^4 x 2 cases)."""
    for div_index, divergence in enumerate(DIVERGENCES):
        for i, (dtype, vocab) in enumerate(itertools.product(DTYPES, VOCABS)):
            j = i + div_index
            yield pytest.param(divergence, dtype, vocab, TEMPERATURES[j % 3], WEIGHT_MODES[(j // 3) % 3],
                               LABEL_MODES[(j + 1) % 3], REDUCTIONS[(i + 2 * div_index) % 3], bool(j % 2),
                               id=f"{divergence}-{str(dtype)[6:]}-V{vocab}")


def _matrix():
    """_cases() on every device and backend, eager and (for the smallest vocabulary) compiled."""
    for device in DEVICES:
        for backend in available_backends(device):
            for case in _cases():
                for compile in (False, True):
                    if compile and case.values[2] != VOCABS[0]:
                        continue
                    yield pytest.param(device, backend, compile, *case.values,
                                       id=f"{device}-{backend}-{'compiled' if compile else 'eager'}-{case.id}")


@pytest.mark.parametrize("device,backend,compile,divergence,dtype,vocab,temperature,weights,label_mode,reduction,"
                         "noncontiguous", list(_matrix()))
def test_matches_reference(device, backend, compile, divergence, dtype, vocab, temperature, weights, label_mode,
                           reduction, noncontiguous):
    lead = (3, 2)
    student = make_logits(lead, vocab, dtype, noncontiguous=noncontiguous)
    teacher = make_logits(lead, vocab, dtype, noncontiguous=not noncontiguous)
    labels = make_labels(lead, vocab, label_mode)
    kl_weight, ce_weight = make_weights(lead, weights)
    grad_output = torch.rand(lead) + 0.5 if reduction == "none" else torch.tensor(1.7)
    options = dict(divergence=divergence, temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
                   reduction=reduction, beta=0.3, skew=0.2, alpha_beta=(0.4, 0.8))
    (loss, grad), (ref_loss, ref_grad) = run_both(backend, student, teacher, labels, grad_output=grad_output,
                                                  device=device, compile=compile, **options)
    context = (f"{device} {backend} {'compiled' if compile else 'eager'} {divergence} {dtype} V={vocab} "
               f"T={temperature} {weights} {label_mode} {reduction}")
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_close(loss, ref_loss, dtype, "loss", context)
    assert_close(grad, ref_grad, dtype, "grad", context)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_per_token_weights_get_gradients(backend, divergence):
    lead, vocab = (4, 3), 1271
    student = make_logits(lead, vocab, torch.float32)
    teacher = make_logits(lead, vocab, torch.float32)
    labels = make_labels(lead, vocab, "some_ignored")
    grads = []
    for impl, cast in ((lambda *a, **k: distillkit.distill_loss(*a, backend=backend, **k), lambda x: x),
                       (reference.distill_loss, lambda x: x.double())):
        kl, ce = (w.detach().requires_grad_() for w in make_weights(lead, "per_token"))
        torch.manual_seed(1)
        loss = impl(cast(student).requires_grad_(), cast(teacher), labels, divergence=divergence,
                    temperature=2.0, kl_weight=kl if cast(kl) is kl else kl, ce_weight=ce)
        loss.backward()
        grads.append((kl.grad, ce.grad))
    (kl_g, ce_g), (ref_kl_g, ref_ce_g) = grads
    assert_close(kl_g, ref_kl_g, torch.float32, "grad", f"{backend} {divergence} kl_weight")
    assert_close(ce_g, ref_ce_g, torch.float32, "grad", f"{backend} {divergence} ce_weight")
    assert kl_g.abs().sum() > 0 and ce_g.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_teacher_entries_give_no_nan(backend, divergence):
    """-inf teacher logits are legal. Reverse-type KL is +inf where only the teacher is masked, so for it
    the student is masked at the same entries (the documented way to mask a vocabulary)."""
    lead, vocab = (5,), 1271
    student = make_logits(lead, vocab, torch.float32)
    teacher = make_logits(lead, vocab, torch.float32)
    teacher[:, 1000:] = float("-inf")
    teacher[2, :500] = float("-inf")
    if divergence == "reverse_kl":
        student[teacher == float("-inf")] = float("-inf")
    labels = make_labels(lead, 500, "some_ignored") + 500  # where the student is never masked
    labels[labels == 400] = -100
    (loss, grad), (ref_loss, ref_grad) = run_both(backend, student, teacher, labels, divergence=divergence,
                                                  temperature=1.5, ce_weight=0.5)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, torch.float32, "loss", divergence)
    assert_close(grad, ref_grad, torch.float32, "grad", divergence)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_active_token_gives_zero_not_nan(backend, reduction):
    lead, vocab = (2, 3), 1271
    student = make_logits(lead, vocab, torch.bfloat16).requires_grad_()
    teacher = make_logits(lead, vocab, torch.bfloat16)
    labels = make_labels(lead, vocab, "all_ignored")
    loss = distillkit.distill_loss(student, teacher, labels, kl_weight=torch.zeros(lead), ce_weight=1.0,
                                   reduction=reduction, backend=backend)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    student = torch.randn(0, 7, 1271, requires_grad=True)
    loss = distillkit.distill_loss(student, torch.randn(0, 7, 1271), torch.zeros(0, 7, dtype=torch.long),
                                   ce_weight=1.0, reduction=reduction, backend=backend)
    assert loss.shape == ((0, 7) if reduction == "none" else ())
    loss.sum().backward()
    assert student.grad.shape == student.shape
    if reduction != "none":
        assert loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_only_never_reads_teacher(backend):
    student = make_logits((6,), 1271, torch.float32)
    labels = make_labels((6,), 1271, "some_ignored")
    (loss, grad), (ref_loss, ref_grad) = run_both(backend, student, None, labels, kl_weight=0.0, ce_weight=1.0)
    assert_close(loss, ref_loss, torch.float32, "loss", "ce only")
    assert_close(grad, ref_grad, torch.float32, "grad", "ce only")
    expected = torch.nn.functional.cross_entropy(student.double(), labels, ignore_index=-100)
    assert_close(loss, expected, torch.float32, "loss", "ce only vs torch.nn.functional.cross_entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_labels(backend):
    student, teacher = make_logits((4,), 1271, torch.float32), make_logits((4,), 1271, torch.float32)
    labels = torch.tensor([5, 1271, -7, 1270])
    with pytest.raises(ValueError, match="labels"):
        distillkit.distill_loss(student, teacher, labels, ce_weight=1.0, backend=backend)
    # With the check off, out-of-range labels count as ignored and are never read out of bounds.
    (loss, grad), (ref_loss, ref_grad) = run_both(backend, student, teacher, labels, ce_weight=1.0,
                                                  check_labels=False)
    as_ignored = torch.tensor([5, -100, -100, 1270])
    (loss2, _), _ = run_both(backend, student, teacher, as_ignored, ce_weight=1.0)
    assert_close(loss, ref_loss, torch.float32, "loss", "out of range")
    assert_close(grad, ref_grad, torch.float32, "grad", "out of range")
    assert torch.allclose(loss, loss2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_formula_and_normalizer(backend):
    """L = alpha CE + (1 - alpha) KL is ce_weight=alpha, kl_weight=1-alpha; a normalizer replaces the count."""
    lead, vocab, alpha = (8,), 1271, 0.3
    student, teacher = make_logits(lead, vocab, torch.float32), make_logits(lead, vocab, torch.float32)
    labels = make_labels(lead, vocab, "none_ignored")
    mixed = distillkit.distill_loss(student, teacher, labels, kl_weight=1 - alpha, ce_weight=alpha,
                                    temperature=2.0, backend=backend)
    kl = distillkit.distill_loss(student, teacher, temperature=2.0, backend=backend)
    ce = torch.nn.functional.cross_entropy(student, labels)
    torch.testing.assert_close(mixed, alpha * ce + (1 - alpha) * kl)
    summed = distillkit.distill_loss(student, teacher, reduction="sum", backend=backend)
    normalized = distillkit.distill_loss(student, teacher, normalizer=torch.tensor(20.0), backend=backend)
    torch.testing.assert_close(normalized, summed / 20.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_with_normalizer(backend):
    """4 micro-batches of 2 sequences, each normalized by the whole batch's token count, give the
    same loss and gradient as one batch of 8."""
    vocab = 1271
    student = make_logits((8, 5), vocab, torch.float32).requires_grad_()
    teacher = make_logits((8, 5), vocab, torch.float32)
    labels = make_labels((8, 5), vocab, "some_ignored")
    full = distillkit.distill_loss(student, teacher, labels, kl_weight=0.0, ce_weight=1.0, backend=backend)
    (full_grad,) = torch.autograd.grad(full, student)
    n_items = (labels != -100).sum()
    total = 0.0
    for micro in range(4):
        rows = slice(2 * micro, 2 * micro + 2)
        total = total + distillkit.distill_loss(student[rows], teacher[rows], labels[rows], kl_weight=0.0,
                                                ce_weight=1.0, normalizer=n_items, backend=backend)
    (acc_grad,) = torch.autograd.grad(total, student)
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(acc_grad, full_grad)
