"""distill_loss_topk(tail="student_full"): the teacher's stored ids are its whole distribution, the student is
its full-vocabulary softmax at them. Against the float64 reference; the unbiasedness of its gradient with a
sampled teacher cache; the tail registry's checks on every entry point; torch.compile and opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SYNCING_OPS, RecordOps, available_backends

from distillkit.core import divergences, reference
from distillkit.core.tolerances import compare
from distillkit.sparse import reference as reference_topk
from distillkit.sparse import tails, topk_ops
from distillkit.sparse.topk import distill_loss_topk, teacher_log_probs
from distillkit.sparse.topk_ops import topk_rows, topk_rows_backward

BACKENDS = [b for b in available_backends() if b in ("torch", "triton")]
STUDENT_FULL = tails.tail_named("student_full").id
FORWARD_KL, REVERSE_KL = divergences.IDS["forward_kl"], divergences.IDS["reverse_kl"]


def sample_teacher(probs, draws, generator):
    """The rows of a sampled cache: `draws` draws with replacement per row of probs [M, V], stored as the
    distinct ids (padded with -1 to `draws` columns) and log(count / draws), the empirical distribution."""
    picks = torch.multinomial(probs, draws, replacement=True, generator=generator)
    counts = torch.zeros_like(probs).scatter_add_(-1, picks, torch.ones_like(probs[:, :draws]))
    order = (counts > 0).to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[:, :draws]
    seen = counts.gather(-1, order)
    return torch.where(seen > 0, order, -1), torch.log(seen / draws)  # log 0 = -inf where absent


def make_inputs(dtype, vocab, teacher, noncontiguous, k=5):
    """Student logits [3, 4, V], (ids, logprobs) [3, 4, K] with absent entries and one token without any id,
    labels with ignored tokens. Non-contiguous: every tensor is a transposed view."""
    shape = (4, 3) if noncontiguous else (3, 4)
    student = (torch.randn(*shape, vocab) * 3).to(dtype)
    teacher_logits = torch.randn(*shape, vocab) * 3
    if teacher == "sampled":
        ids, logprobs = sample_teacher(torch.softmax(teacher_logits, -1).view(-1, vocab), k,
                                       torch.Generator().manual_seed(7))
        ids, logprobs = ids.view(*shape, k), logprobs.view(*shape, k)
    else:
        logprobs, ids = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
        logprobs = logprobs.to(torch.float16)  # as stored in a top-k cache
    labels = torch.randint(0, vocab, shape)
    if noncontiguous:
        student, ids, logprobs, labels = (x.transpose(0, 1) for x in (student, ids, logprobs, labels))
    ids[0, 0, 2:] = -1
    ids[1, 2] = -1  # no teacher signal
    labels[0, 1] = labels[2, 3] = -100
    return student, ids, logprobs, labels


def run_both(backend, student, ids, logprobs, labels, grad_output, weights=None, **options):
    """(loss, grads) of distill_loss_topk on `backend` and of the float64 reference, on the same inputs."""
    results = []
    for impl, cast in ((lambda *a, **kw: distill_loss_topk(*a, backend=backend, **kw), lambda x: x),
                       (reference_topk.distill_loss_topk, lambda x: x.double())):
        leaves = [cast(student.detach()).requires_grad_()]
        extra = {}
        if weights is not None:
            leaves += [cast(w).requires_grad_() for w in weights]
            extra = dict(kl_weight=leaves[1], ce_weight=leaves[2])
        loss = impl(leaves[0], ids, cast(logprobs), labels, tail="student_full", **extra, **options)
        results.append((loss, torch.autograd.grad(loss, leaves, grad_output.to(loss.dtype))))
    return results


CASES = [  # dtype, vocab, teacher, temperature, teacher_temperature, ce, reduction, per-token weights, non-contiguous
    (torch.float32, 37, "topk", 1.0, None, False, "sum", False, False),
    (torch.float32, 131, "sampled", 2.3, 1.5, True, "mean", True, True),
    (torch.float32, 37, "sampled", 1.0, None, True, "none", False, False),
    (torch.bfloat16, 131, "topk", 0.7, None, True, "none", True, True),
    (torch.bfloat16, 37, "sampled", 1.7, 2.0, False, "mean", False, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,vocab,teacher,temperature,teacher_temperature,with_ce,reduction,per_token,noncontig",
                         CASES, ids=[f"{str(c[0])[6:]}-V{c[1]}-{c[2]}-{c[6]}" for c in CASES])
def test_matches_reference(backend, dtype, vocab, teacher, temperature, teacher_temperature, with_ce, reduction,
                           per_token, noncontig):
    student, ids, logprobs, labels = make_inputs(dtype, vocab, teacher, noncontig)
    assert student.is_contiguous() != noncontig
    lead = student.shape[:-1]
    weights = (torch.rand(lead), torch.rand(lead) * with_ce) if per_token else None
    options = dict(temperature=temperature, teacher_temperature=teacher_temperature, reduction=reduction)
    if not per_token:
        options.update(kl_weight=0.7, ce_weight=0.3 if with_ce else 0.0)
    grad_output = torch.rand(lead) + 0.5 if reduction == "none" else torch.tensor(1.7)
    (loss, grads), (ref, ref_grads) = run_both(backend, student, ids, logprobs, labels, grad_output, weights,
                                               **options)
    assert grads[0].dtype == dtype and grads[0].shape == student.shape
    assert compare(loss, ref, dtype, "loss").ok, compare(loss, ref, dtype, "loss").describe()
    for name, got, want in zip(["student", "kl_weight", "ce_weight"], grads, ref_grads):
        result = compare(got, want, dtype if name == "student" else torch.float32, "grad")
        assert result.ok, f"{name} grad ({backend}): {result.describe()}"
    # The gradient is dense: tokens outside the ids get q_j (a teacher row, its label not ignored).
    assert (grads[0][2, 0] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_rows_and_rows_without_teacher(backend):
    """A NaN student logit makes its token's loss and whole gradient row NaN (as the reference's full
    log-softmax does); a token without a present id gets no divergence gradient."""
    student, ids, logprobs, labels = make_inputs(torch.float32, 37, "topk", False)
    student[2, 1, 30] = math.nan
    (loss, grads), (ref, ref_grads) = run_both(backend, student, ids, logprobs, labels, torch.rand(3, 4) + 0.5,
                                               reduction="none", ce_weight=0.5)
    assert loss[2, 1].isnan() and grads[0][2, 1].isnan().all() and not loss[0].isnan().any()
    assert compare(loss, ref, torch.float32, "loss").ok
    assert compare(grads[0], ref_grads[0], torch.float32, "grad").ok
    kl_only = student.clone().requires_grad_()
    (grad,) = torch.autograd.grad(distill_loss_topk(kl_only, ids, logprobs, tail="student_full", backend=backend),
                                  kl_only)
    assert torch.equal(grad[1, 2], torch.zeros_like(grad[1, 2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["student_full", "renormalize"])
def test_teacher_row_without_a_finite_log_probability(backend, tail):
    """Present ids whose log-probabilities are all -inf: P = 0, so D = 0 and a gradient of exactly 0, as in the
    reference (the kernels' forward-KL rows are q P - p)."""
    student = torch.randn(2, 37, requires_grad=True)
    ids, logprobs = torch.tensor([[1, 2, 3], [4, 5, -1]]), torch.tensor([[-1.0, -2.0, -3.0], [-math.inf] * 3])
    loss = distill_loss_topk(student, ids, logprobs, tail=tail, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert loss[1] == 0 and torch.equal(grad[1], torch.zeros_like(grad[1])) and (grad[0] != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_vocabulary_is_the_dense_forward_kl(backend):
    """With every id stored (K = V), student_full is the dense forward KL."""
    student, teacher = torch.randn(5, 61) * 2, torch.randn(5, 61) * 2
    logprobs, ids = torch.log_softmax(teacher / 2.0, -1).topk(61, dim=-1)
    dense = reference.distill_loss(student.double(), teacher.double(), temperature=1.3)
    sparse = distill_loss_topk(student, ids, logprobs, tail="student_full", temperature=1.3,
                               teacher_temperature=2.0, backend=backend)
    assert abs(float(sparse) - float(dense)) < 2e-5


# (rows, caches drawn per row). The Triton interpreter takes about 20 ms per row and call: fewer there, so a
# wider (still 4 SE) band; renormalize stays ~9 bands off, student_full within ~0.65 (2000 caches: ~60 / 0.75).
DRAWS = {"torch": (3, 2000), "triton": (2, 100)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_cache_gives_an_unbiased_gradient(backend):
    """k = 8 draws per position, stored as log(count / k): E[p_hat] = p, so the mean student_full gradient
    over many caches is the dense forward-KL gradient T (q - p) (T**2 scaling, sampled and trained at the
    same T). "renormalize" on the same samples is biased: the check can fail."""
    (rows, seeds), vocab, draws, temperature = DRAWS.get(backend, (3, 2000)), 40, 8, 2.0
    gen = torch.Generator().manual_seed(2025)
    teacher = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 2
    student = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 2
    p, q = torch.softmax(teacher / temperature, -1), torch.softmax(student / temperature, -1)
    dense = temperature * (q - p)  # the float64 oracle
    # Var(count_j / k) = p_j (1 - p_j) / k per draw set: the exact standard error of the mean.
    standard_error = temperature * (p * (1 - p) / (draws * seeds)).sqrt()
    ids, logprobs = sample_teacher(p.float().repeat(seeds, 1), draws, gen)
    mean_grads = {}
    for tail in ("student_full", "renormalize"):
        s = student.float().repeat(seeds, 1).requires_grad_()
        loss = distill_loss_topk(s, ids, logprobs, tail=tail, temperature=temperature, teacher_temperature=temperature,
                                 reduction="sum", backend=backend)
        (grad,) = torch.autograd.grad(loss, s)
        mean_grads[tail] = grad.double().view(seeds, rows, vocab).mean(0)
    band = 4 * standard_error + 1e-6  # + fp32 rounding of the summed gradients
    off = (mean_grads["student_full"] - dense).abs() / band
    assert (off <= 1).all(), f"student_full mean gradient {float(off.max()):.2f} bands off the dense gradient"
    assert ((mean_grads["renormalize"] - dense).abs() > band).any(), "renormalize should be biased"


# -- the tail registry: unknown tails and reverse KL fail loudly everywhere ---------------------------------------

def _op(backend, tail, divergence):
    student = torch.randn(2, 50)
    ids, logprobs = torch.tensor([[1, 2], [3, -1]]), torch.log(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    return topk_rows(student, ids, logprobs, torch.zeros(2), None, divergence, tail, 1.0, -100, False, backend)


def _op_backward(backend, tail, divergence):
    student, ids, tlp = torch.randn(2, 50), torch.tensor([[1, 2], [3, -1]]), torch.full((2, 2), -0.7)
    return topk_rows_backward(torch.ones(2), torch.ones(2), student, ids, tlp, torch.zeros(2), None,
                              torch.zeros(2, 4), divergence, tail, 1.0, -100, False, backend)


def _api(backend, **options):
    student, ids = torch.randn(2, 50), torch.tensor([[1, 2], [3, -1]])
    return distill_loss_topk(student, ids, torch.full((2, 2), -0.7), torch.tensor([1, 4]), backend=backend,
                             **options)


def _reference(**options):
    student, ids = torch.randn(2, 50, dtype=torch.float64), torch.tensor([[1, 2], [3, -1]])
    return reference_topk.distill_loss_topk(student, ids, torch.full((2, 2), -0.7, dtype=torch.float64), **options)


def _reference_divergence(**options):
    student, ids = torch.randn(2, 50, dtype=torch.float64), torch.tensor([[1, 2], [3, -1]])
    return reference_topk.divergence_per_token(student, ids, torch.full((2, 2), -0.7, dtype=torch.float64),
                                               **options)


NAMED_ENTRY_POINTS = {**{f"api-{b}": (lambda b: lambda **o: _api(b, **o))(b) for b in BACKENDS},
                      "api-ce-only": lambda **o: _api("torch", kl_weight=0.0, ce_weight=1.0, **o),
                      "reference": _reference, "reference-divergence": _reference_divergence}


@pytest.mark.parametrize("entry", NAMED_ENTRY_POINTS)
def test_reverse_kl_with_student_full_is_refused(entry):
    with pytest.raises(ValueError, match=r"tail='student_full'.*only \(reverse KL .*infinite\).*"
                                         r"divergence='reverse_kl'"):
        NAMED_ENTRY_POINTS[entry](tail="student_full", divergence="reverse_kl")


@pytest.mark.parametrize("entry", NAMED_ENTRY_POINTS)
def test_unknown_tail_name_is_refused(entry):
    with pytest.raises(ValueError, match=r"tail must be one of 'renormalize', 'bucket', 'student_full'; got 'zero'"):
        NAMED_ENTRY_POINTS[entry](tail="zero")


def test_unknown_tail_name_in_the_teacher_preprocessing():
    with pytest.raises(ValueError, match="tail must be one of"):
        teacher_log_probs(torch.tensor([[1, 2]]), torch.full((1, 2), -0.7), 50, tail="zero", ratio=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [_op, _op_backward])
def test_the_ops_refuse_an_unknown_tail_id_and_reverse_kl(backend, op):
    for divergence in (divergences.NO_DIVERGENCE, FORWARD_KL):  # CE only too
        with pytest.raises(ValueError, match="unknown tail id 99"):
            op(backend, 99, divergence)
    with pytest.raises(ValueError, match=r"tail='student_full'.*divergence='reverse_kl'"):
        op(backend, STUDENT_FULL, REVERSE_KL)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("tail,divergence,message", [(99, FORWARD_KL, "unknown tail id"),
                                                     (STUDENT_FULL, REVERSE_KL, "student_full defines forward_kl")])
def test_the_triton_kernels_refuse_them_too(tail, divergence, message):
    """Past the ops' check (a direct launch), the kernels' static assert."""
    student, ids = torch.randn(2, 50), torch.tensor([[1, 2], [3, -1]])
    div, ce, stats = torch.empty(2), torch.empty(2), torch.empty(2, 4)
    with pytest.raises(Exception, match=message):
        topk_ops._triton_launch("topk_forward_kernel", (), student, ids, torch.full((2, 2), -0.7), torch.zeros(2),
                                None, (div, ce, stats), divergence, tail, 1.0, -100, False)


def test_triton_constants_are_the_registry_ids():
    from distillkit.kernels import topk as K

    for tail in tails.TAIL_REGISTRY:
        assert getattr(K, tail.name.upper()).value == tail.id, tail.name
    assert len({t.id for t in tails.TAIL_REGISTRY}) == len(tails.TAIL_REGISTRY)


# -- torch.compile, opcheck, no host sync ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    student, ids, logprobs, labels = make_inputs(torch.float32, 131, "sampled", False)
    student.requires_grad_()
    tlp, trest = teacher_log_probs(ids, logprobs, 131, tail="student_full", ratio=0.8)
    args = (student, ids, tlp, trest, labels, FORWARD_KL, STUDENT_FULL, 1.5, -100, True, backend)
    torch.library.opcheck(topk_rows, args)
    stats = topk_rows(*args)[2]
    torch.library.opcheck(topk_rows_backward, (torch.rand(3, 4), torch.rand(3, 4), student.detach(), ids, tlp,
                                               trest, labels, stats, *args[5:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    student, ids, logprobs, labels = make_inputs(torch.float32, 131, "sampled", True)
    student.requires_grad_()
    kl = torch.rand(3, 4, requires_grad=True)

    def loss_fn(s, w):
        return distill_loss_topk(s, ids, logprobs, labels, tail="student_full", temperature=2.0, kl_weight=w,
                                 ce_weight=0.5, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student, kl)
    grads = torch.autograd.grad(loss, (student, kl))
    eager = loss_fn(student, kl)
    eager_grads = torch.autograd.grad(eager, (student, kl))
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_do_not_sync(backend):
    student, ids, logprobs, labels = make_inputs(torch.float32, 131, "sampled", False)
    student.requires_grad_()
    with RecordOps() as recorder:
        loss = distill_loss_topk(student, ids, logprobs, labels, tail="student_full", ce_weight=0.5,
                                 kl_weight=torch.rand(3, 4), backend=backend, check_labels=False)
        loss.backward()
    assert "topk_rows" in recorder.names and "topk_rows_backward" in recorder.names
    assert not set(recorder.names) & SYNCING_OPS, sorted(set(recorder.names) & SYNCING_OPS)
