"""fused_linear_distill_loss against the float64 reference on explicitly computed logits.

The reference is `distillkit.reference.distill_loss` on float64 logits h @ W.T + b (so hidden, weight and
bias gradients come from plain autograd). For bf16 the loss is compared with the reference evaluated on
the bf16 logits an unfused model would produce (the fused op computes the same chunk matmuls), and the
gradients with the float64 path under the bf16 gradient tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import available_backends

from distillkit.core import reference
from distillkit.core.divergences import NAMES as DIVERGENCES
from distillkit.core.fused_linear import default_chunk_size, fused_linear_distill, fused_linear_distill_loss
from distillkit.core.tolerances import compare

BACKENDS = available_backends()
H, HT, V = 257, 129, 1271


def make_problem(lead, dtype, *, vocab=V, teacher_vocab=None, hidden=H, bias=True, label_mode="some_ignored"):
    teacher_vocab = vocab if teacher_vocab is None else teacher_vocab
    h = torch.randn(*lead, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5 * 3).to(dtype)
    b = (torch.randn(vocab) * 0.5).to(dtype) if bias else None
    th = torch.randn(*lead, HT).to(dtype)
    tw = (torch.randn(teacher_vocab, HT) / HT**0.5 * 3).to(dtype)
    tb = (torch.randn(teacher_vocab) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead)
    if label_mode == "some_ignored":
        labels.view(-1)[::3] = -100
    return h, w, b, th, tw, tb, labels


def run_fused(h, w, b, th, tw, tb, labels, grad_output, weights=(), **options):
    leaves = [x.detach().clone().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    leaves += [x.detach().clone().requires_grad_() for x in weights]
    hh, ww = leaves[:2]
    bb = leaves[2] if b is not None else None
    extra = dict(zip(("kl_weight", "ce_weight"), leaves[2 + (b is not None):]))
    loss = fused_linear_distill_loss(hh, ww, th, tw, labels, student_bias=bb, teacher_bias=tb, **extra, **options)
    grads = torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype))
    return loss, grads


def run_reference(h, w, b, th, tw, tb, labels, grad_output, weights=(), *, low_precision_logits=False,
                  **options):
    """(loss, grads) of the float64 reference. With low_precision_logits, the logits are those an unfused model
    computes in the input dtype (h @ W.T + b rounded to it); everything after them is float64, and the
    hidden/weight/bias gradients chain the float64 logits gradient through float64 matmuls. (On CPU the fused
    op keeps the logits gradient in fp32; on CUDA it is rounded to the input dtype, like an unfused model's.)"""
    options = {k: v for k, v in options.items() if k not in ("chunk_size", "max_chunk_bytes", "backend",
                                                             "grad_weight_fp32")}
    weights = [x.detach().double().requires_grad_() for x in weights]
    extra = dict(zip(("kl_weight", "ce_weight"), weights))
    t = F.linear(th, tw, tb).double() if low_precision_logits else \
        F.linear(th.double(), tw.double(), None if tb is None else tb.double())
    if not low_precision_logits:
        leaves = [x.detach().double().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
        s = F.linear(leaves[0], leaves[1], leaves[2] if b is not None else None)
        loss = reference.distill_loss(s, t, labels, **extra, **options)
        return loss, torch.autograd.grad(loss, leaves + weights, grad_output.double())
    s = F.linear(h, w, b).double().requires_grad_()
    loss = reference.distill_loss(s, t, labels, **extra, **options)
    g_s, *g_weights = torch.autograd.grad(loss, [s] + weights, grad_output.double())
    g_s2, h2 = g_s.reshape(-1, s.shape[-1]), h.double().reshape(-1, h.shape[-1])
    grads = [(g_s2 @ w.double()).reshape(h.shape), g_s2.t() @ h2] + ([g_s2.sum(0)] if b is not None else [])
    return loss, tuple(grads + g_weights)


def check(h, w, b, th, tw, tb, labels, grad_output, dtype, context, weights=(), **options):
    loss, grads = run_fused(h, w, b, th, tw, tb, labels, grad_output, weights, **options)
    ref, ref_grads = run_reference(h, w, b, th, tw, tb, labels, grad_output, weights,
                                   low_precision_logits=dtype != torch.float32, **options)
    result = compare(loss, ref, dtype, "loss")
    assert result.ok, f"loss ({context}): {result.describe()}"
    names = ["hidden", "weight", "bias", "kl_weight", "ce_weight"] if b is not None else \
        ["hidden", "weight", "kl_weight", "ce_weight"]
    for name, got, leaf in zip(names, grads, (h, w, b) if b is not None else (h, w)):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
    for name, got, want in zip(names, grads, ref_grads):
        kind_dtype = dtype if name in ("hidden", "weight", "bias") else torch.float32
        result = compare(got, want, kind_dtype, "grad")
        assert result.ok, f"{name} grad ({context}): {result.describe()}"


def _cases():
    reductions = ["mean", "sum", "none"]
    for i, divergence in enumerate(DIVERGENCES):
        for j, dtype in enumerate([torch.float32, torch.bfloat16]):
            yield pytest.param(divergence, dtype, reductions[(i + j) % 3], [0.7, 1.0, 2.3][(i + 2 * j) % 3],
                               (i + j) % 2 == 0, id=f"{divergence}-{str(dtype)[6:]}")
    yield pytest.param("forward_kl", torch.float16, "mean", 1.3, True, id="forward_kl-float16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,dtype,reduction,temperature,per_token", list(_cases()))
def test_matches_reference(backend, divergence, dtype, reduction, temperature, per_token):
    lead = (2, 5)
    problem = make_problem(lead, dtype)
    grad_output = torch.rand(lead) + 0.5 if reduction == "none" else torch.tensor(1.7)
    weights = (torch.rand(lead), torch.rand(lead)) if per_token else ()
    options = dict(divergence=divergence, temperature=temperature, reduction=reduction, beta=0.3, skew=0.2,
                   backend=backend, chunk_size=3)
    if not per_token:
        options.update(kl_weight=0.6, ce_weight=0.4)
    if per_token:
        weights[0][0, 1] = 0.0
    check(*problem, grad_output, dtype, f"{backend} {divergence} {reduction}", weights, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_no_bias_and_default_chunking(backend):
    lead = (3, 4)
    h, w, _, th, tw, _, labels = make_problem(lead, torch.float32, bias=False)
    options = dict(divergence="jsd", temperature=2.0, kl_weight=0.5, ce_weight=0.5, normalizer=torch.tensor(7.0),
                   backend=backend, max_chunk_bytes=5 * V * 40)  # a handful of rows per chunk
    check(h, w, None, th, tw, None, labels, torch.tensor(0.3), torch.float32, "normalizer", **options)
    assert default_chunk_size(V, V, 4, 4, 5 * V * 40) < 12


@pytest.mark.parametrize("teacher_vocab", [V - 13, V + 13])
def test_vocab_mismatch(teacher_vocab):
    lead = (2, 3)
    problem = make_problem(lead, torch.float32, teacher_vocab=teacher_vocab)
    with pytest.raises(ValueError, match=rf"{V}.*{teacher_vocab}.*vocab_mismatch"):
        fused_linear_distill_loss(*problem[:2], *problem[3:5], problem[6], ce_weight=0.5)
    check(*problem, torch.tensor(1.0), torch.float32, "truncate", divergence="reverse_kl", ce_weight=0.5,
          temperature=1.5, vocab_mismatch="truncate", chunk_size=4)


def test_large_vocab_small_batch():
    problem = make_problem((3,), torch.float32, vocab=50257, hidden=64)
    check(*problem, torch.tensor(1.0), torch.float32, "V=50257", ce_weight=0.3, temperature=2.0, backend="torch")


def test_ce_only_and_weight_dtype_accumulation():
    h, w, b, th, tw, tb, labels = make_problem((2, 6), torch.bfloat16)
    loss = fused_linear_distill_loss(h, w, None, None, labels, student_bias=b, kl_weight=0.0, ce_weight=1.0)
    expected = F.cross_entropy(F.linear(h, w, b).double().reshape(-1, V), labels.reshape(-1))
    assert compare(loss, expected, torch.bfloat16, "loss").ok
    grads = []
    for fp32 in (True, False):
        ww = w.clone().requires_grad_()
        fused_linear_distill_loss(h, ww, th, tw, labels, ce_weight=0.5, grad_weight_fp32=fp32, chunk_size=2).backward()
        grads.append(ww.grad)
    assert grads[1].dtype == torch.bfloat16
    assert compare(grads[1], grads[0].double(), torch.bfloat16, "grad").ok


def test_no_grad_and_inference():
    h, w, b, th, tw, tb, labels = make_problem((2, 3), torch.float32)
    with torch.no_grad():
        a = fused_linear_distill_loss(h.requires_grad_(), w, th, tw, labels, ce_weight=0.5)
    b2 = fused_linear_distill_loss(h.detach(), w, th, tw, labels, ce_weight=0.5)
    torch.testing.assert_close(a, b2)


@pytest.mark.parametrize("reduce", [True, False])
def test_opcheck(reduce):
    n = 5
    h, w, b, th, tw, tb, labels = make_problem((n,), torch.float32, vocab=97, hidden=16)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), th, tw, tb, labels,
            torch.rand(n, requires_grad=True), torch.rand(n), 1, 0.5, 0.0, 2.0, -100, True, "torch", 2, reduce, True,
            True, True, True)
    torch.library.opcheck(fused_linear_distill, args)


def test_torch_compile_fullgraph():
    lead = (2, 6)
    h, w, b, th, tw, tb, labels = make_problem(lead, torch.float32, vocab=301, hidden=32)
    kl = torch.rand(lead, requires_grad=True)

    def loss_fn(h, w, b, kl):
        return fused_linear_distill_loss(h, w, th, tw, labels, student_bias=b, teacher_bias=tb, kl_weight=kl,
                                         ce_weight=0.5, divergence="skew_reverse_kl", temperature=2.0,
                                         chunk_size=5, backend="torch")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    leaves = [x.requires_grad_() for x in (h, w, b)] + [kl]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager = loss_fn(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_truncate_to_shared_vocab_helper():
    from distillkit.core.vocab import truncate_to_shared_vocab

    s, t = torch.randn(2, 10), torch.full((2, 7), float("-inf"))
    t[:, 0] = 0.0
    with pytest.raises(ValueError, match=r"10 .* 7 .*vocab_mismatch"):
        truncate_to_shared_vocab(s, t, "error")
    with pytest.raises(ValueError, match="vocab_mismatch must be"):
        truncate_to_shared_vocab(s, t, "pad")
    shared = truncate_to_shared_vocab(s, t, "truncate")
    assert shared.vocab_size == 7 and shared.truncated and shared.student.data_ptr() == s.data_ptr()
    assert shared.student.shape == shared.teacher.shape == (2, 7)
    d = reference.divergence_per_token(shared.student, shared.teacher, divergence="reverse_kl")
    assert torch.isfinite(reference.divergence_per_token(shared.student, shared.teacher)).all()
    assert not d.isnan().any()
    same = truncate_to_shared_vocab(s, s, "error")
    assert same.student is s and not same.truncated
