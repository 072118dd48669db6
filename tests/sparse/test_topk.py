"""distill_loss_topk (sparse teacher) against the float64 reference in distillkit.sparse.reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import available_backends

import distillkit
from distillkit.core import divergences, reference
from distillkit.sparse import reference as reference_topk
from distillkit.sparse import tails
from distillkit.core.tolerances import compare
from distillkit.sparse.topk import distill_loss_topk
from distillkit.sparse.topk_ops import topk_rows, topk_rows_backward

BACKENDS = [b for b in available_backends() if b in ("torch", "triton")]
V, K = 1271, 7


def make_teacher(lead, vocab, k, *, temperature=1.0, absent=True, scale=3.0):
    """Top-k (ids, logprobs) of a random teacher, recorded at `temperature`; some entries and one whole
    token absent (id -1) when `absent`."""
    teacher = torch.randn(*lead, vocab) * scale
    logprobs, ids = torch.log_softmax(teacher / temperature, dim=-1).topk(k, dim=-1)
    if absent:
        ids.view(-1, k)[0, k // 2:] = -1
        ids.view(-1, k)[-1] = -1
    return teacher, ids, logprobs


def run_both(backend, student, ids, logprobs, labels, grad_output, weights=None, **options):
    results = []
    for impl, cast in ((lambda *a, **kw: distill_loss_topk(*a, backend=backend, **kw), lambda x: x),
                       (reference_topk.distill_loss_topk, lambda x: x.double())):
        s = cast(student.detach()).requires_grad_()
        leaves = [s]
        extra = {}
        if weights is not None:
            kl, ce = (cast(w.detach()).requires_grad_() for w in weights)
            leaves += [kl, ce]
            extra = dict(kl_weight=kl, ce_weight=ce)
        loss = impl(s, ids, cast(logprobs), labels, **extra, **options)
        grads = torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype))
        results.append((loss, grads))
    return results


def _cases():
    reductions, temps = ["mean", "sum", "none"], [0.7, 1.0, 2.3]
    for i, (tail, divergence, dtype) in enumerate(itertools.product(
            ["renormalize", "bucket"], ["forward_kl", "reverse_kl"], [torch.float32, torch.bfloat16])):
        yield pytest.param(tail, divergence, dtype, reductions[i % 3], temps[(i + 1) % 3],
                           [None, 1.0, 2.0][i % 3], i % 2 == 0, id=f"{tail}-{divergence}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail,divergence,dtype,reduction,temperature,teacher_temperature,per_token",
                         list(_cases()))
def test_matches_reference(backend, tail, divergence, dtype, reduction, temperature, teacher_temperature,
                           per_token):
    lead = (3, 2)
    student = (torch.randn(*lead, V) * 3).to(dtype)
    _, ids, logprobs = make_teacher(lead, V, K, temperature=teacher_temperature or 1.0)
    logprobs = logprobs.to(torch.float16)  # as stored in a teacher cache
    labels = torch.randint(0, V, lead)
    labels[0, 1] = -100
    weights = (torch.rand(lead), torch.rand(lead)) if per_token else None
    options = dict(tail=tail, divergence=divergence, temperature=temperature, reduction=reduction,
                   teacher_temperature=teacher_temperature)
    if not per_token:
        options.update(kl_weight=0.7, ce_weight=0.3)
    grad_output = torch.rand(lead) + 0.5 if reduction == "none" else torch.tensor(1.7)
    (loss, grads), (ref, ref_grads) = run_both(backend, student, ids, logprobs, labels, grad_output, weights,
                                               **options)
    context = f"{backend} {tail} {divergence} {dtype} {reduction}"
    assert grads[0].dtype == dtype and grads[0].shape == student.shape
    result = compare(loss, ref, dtype, "loss")
    assert result.ok, f"loss ({context}): {result.describe()}"
    for name, got, want in zip(["student", "kl_weight", "ce_weight"], grads, ref_grads):
        result = compare(got, want, dtype if name == "student" else torch.float32, "grad")
        assert result.ok, f"{name} grad ({context}): {result.describe()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_full_k_equals_dense_loss(backend, divergence, tail):
    """With K = V the top-k loss is the dense distill_loss (teacher log-probabilities recorded at T0 = 2 and
    rescaled to the loss temperature T = 1.3)."""
    vocab, lead = 97, (5,)
    student = torch.randn(*lead, vocab) * 2
    teacher, ids, logprobs = make_teacher(lead, vocab, vocab, temperature=2.0, absent=False)
    dense = reference.distill_loss(student.double(), teacher.double(), divergence=divergence, temperature=1.3)
    sparse = distill_loss_topk(student, ids, logprobs, tail=tail, divergence=divergence, temperature=1.3,
                               teacher_temperature=2.0, backend=backend)
    assert abs(float(sparse) - float(dense)) < 2e-5


def test_large_vocab_small_batch():
    lead = (2,)
    student = torch.randn(*lead, 50257) * 3
    _, ids, logprobs = make_teacher(lead, 50257, 32, absent=False)
    labels = torch.randint(0, 50257, lead)
    (loss, grads), (ref, ref_grads) = run_both("torch", student, ids, logprobs, labels, torch.tensor(1.0),
                                               tail="bucket", ce_weight=0.5, temperature=2.0)
    assert compare(loss, ref, torch.float32, "loss").ok
    assert compare(grads[0], ref_grads[0], torch.float32, "grad").ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_tokens_have_no_teacher_signal(backend):
    """Tokens whose ids are all -1 (cache padding) count for neither the divergence nor the mean."""
    student = torch.randn(4, 300) * 2
    _, ids, logprobs = make_teacher((4,), 300, 5, absent=False)
    padded_ids = torch.cat([ids, torch.full((2, 5), -1)])
    padded_lp = torch.cat([logprobs, torch.full((2, 5), -math.inf)])
    padded_student = torch.cat([student, torch.randn(2, 300)]).requires_grad_()
    for tail in ("renormalize", "bucket"):
        loss = distill_loss_topk(padded_student, padded_ids, padded_lp, tail=tail, backend=backend)
        expected = distill_loss_topk(student, ids, logprobs, tail=tail, backend=backend)
        torch.testing.assert_close(loss, expected)
        (grad,) = torch.autograd.grad(loss, padded_student)
        assert torch.equal(grad[4:], torch.zeros_like(grad[4:]))


def test_out_of_range_ids():
    student = torch.randn(3, 100)
    ids = torch.tensor([[1, 2], [3, 100], [5, 6]])
    logprobs = torch.full((3, 2), -1.0)
    with pytest.raises(ValueError, match="ids >= V"):
        distill_loss_topk(student, ids, logprobs)
    as_absent = distill_loss_topk(student, ids, logprobs, check_labels=False)
    expected = distill_loss_topk(student, torch.where(ids >= 100, -1, ids), logprobs)
    torch.testing.assert_close(as_absent, expected)


def test_argument_errors():
    student = torch.randn(3, 100)
    _, ids, logprobs = make_teacher((3,), 100, 4)
    with pytest.raises(ValueError, match="divergence"):
        distill_loss_topk(student, ids, logprobs, divergence="jsd")
    with pytest.raises(ValueError, match="tail"):
        distill_loss_topk(student, ids, logprobs, tail="zero")
    with pytest.raises(ValueError, match="K"):
        distill_loss_topk(student, ids[:, :2], logprobs)
    with pytest.raises(ValueError, match="teacher_temperature"):
        distill_loss_topk(student, ids, logprobs, teacher_temperature=0.0)
    # CE only: no teacher needed.
    labels = torch.randint(0, 100, (3,))
    ce = distill_loss_topk(student, None, None, labels, kl_weight=0.0, ce_weight=1.0)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(student, labels))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_reference_gradcheck(tail):
    student = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    _, ids, logprobs = make_teacher((3,), 11, 4)
    for divergence in ("forward_kl", "reverse_kl"):
        def fn(s):
            return reference_topk.distill_loss_topk(s, ids, logprobs.double(), tail=tail, divergence=divergence,
                                                    temperature=1.7, teacher_temperature=1.2)
        assert torch.autograd.gradcheck(fn, (student,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail,divergence", [("renormalize", "forward_kl"), ("bucket", "reverse_kl")])
def test_opcheck(backend, tail, divergence):
    student = torch.randn(2, 3, 301, requires_grad=True)
    _, ids, logprobs = make_teacher((2, 3), 301, 5)
    tlp, trest = distillkit.sparse.topk.teacher_log_probs(ids, logprobs, 301, tail=tail, ratio=0.8)
    labels = torch.randint(0, 301, (2, 3))
    args = (student, ids, tlp, trest, labels, divergences.IDS[divergence], tails.tail_named(tail).id,
            1.5, -100, True, backend)
    torch.library.opcheck(topk_rows, args)
    stats = topk_rows(*args)[2]
    torch.library.opcheck(topk_rows_backward, (torch.rand(2, 3), torch.rand(2, 3), student.detach(), ids, tlp,
                                               trest, labels, stats, *args[5:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    student = torch.randn(2, 6, 301, requires_grad=True)
    _, ids, logprobs = make_teacher((2, 6), 301, 5)
    labels = torch.randint(0, 301, (2, 6))
    kl = torch.rand(2, 6, requires_grad=True)

    def loss_fn(s, w):
        return distill_loss_topk(s, ids, logprobs, labels, tail="bucket", divergence="reverse_kl", temperature=2.0,
                                 kl_weight=w, ce_weight=0.5, backend=backend)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student, kl)
    grads = torch.autograd.grad(loss, (student, kl))
    eager = loss_fn(student, kl)
    eager_grads = torch.autograd.grad(eager, (student, kl))
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
