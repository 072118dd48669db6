"""ignore_index means what TRL, Liger-Kernel and torchtune mean, on every entry point; the README
Quickstart on causal-LM logits gives their number; every option is validated by name.

The peers' losses are transcribed here in float64 from their published code (TRL's
`GKDTrainer.generalized_jsd_loss` on logits[:, :-1] and labels[:, 1:], Hugging Face's shifted
cross-entropy); when TRL is installed, its own function is checked too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import available_backends

import distillkit
from distillkit.core import divergences, reference
from distillkit.core.fused_linear import fused_linear_distill_loss
from distillkit.sparse.topk import distill_loss_topk
from distillkit.core.tolerances import compare

BACKENDS = available_backends()
DIVERGENCES = divergences.NAMES


def causal_batch(batch=2, seq=9, vocab=61, *, scale=2.0):
    """HF-style causal-LM logits [B, S, V] and labels [B, S]: -100 on a prompt prefix and right padding."""
    student = torch.randn(batch, seq, vocab) * scale
    teacher = torch.randn(batch, seq, vocab) * scale
    labels = torch.randint(0, vocab, (batch, seq))
    labels[:, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    return student, teacher, labels


def trl_generalized_jsd(student_logits, teacher_logits, labels, beta, temperature):
    """TRL's generalized_jsd_loss (reduction="batchmean"), float64, on already shifted inputs."""
    s_lp = F.log_softmax(student_logits.double() / temperature, -1)
    t_lp = F.log_softmax(teacher_logits.double() / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s_lp, t_lp, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t_lp, s_lp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        mix = torch.logsumexp(torch.stack([s_lp + torch.log(1 - b), t_lp + torch.log(b)]), 0)
        jsd = b * F.kl_div(mix, t_lp, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(mix, s_lp, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def hf_shifted_ce(logits, labels):
    """transformers' causal-LM loss: logits[..., :-1] against labels[..., 1:], mean over non-ignored."""
    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta,divergence", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.5, "jsd"),
                                              (0.3, "jsd")])
def test_quickstart_on_causal_logits_equals_trl(backend, beta, divergence):
    student, teacher, labels = causal_batch()
    ours = distillkit.distill_loss(student, teacher, distillkit.shift_labels(labels), divergence=divergence,
                                   beta=beta if divergence == "jsd" else 0.5, temperature=1.7,
                                   temperature_scaling=False, backend=backend)
    theirs = trl_generalized_jsd(student[:, :-1], teacher[:, :-1], labels[:, 1:], beta, 1.7)
    assert compare(ours, theirs, torch.float32, "loss").ok, (float(ours), float(theirs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quickstart_kd_plus_ce_equals_the_peers_combination(backend):
    """L = 0.5 CE + 0.5 T^2 KL over the label tokens: torchtune's and Liger's (1 - a) CE + a KD split."""
    student, teacher, labels = causal_batch()
    ours = distillkit.distill_loss(student, teacher, distillkit.shift_labels(labels), divergence="forward_kl",
                                   temperature=2.0, kl_weight=0.5, ce_weight=0.5, backend=backend)
    expected = 0.5 * hf_shifted_ce(student, labels) + \
        0.5 * 4.0 * trl_generalized_jsd(student[:, :-1], teacher[:, :-1], labels[:, 1:], 0.0, 2.0)
    assert compare(ours, expected, torch.float32, "loss").ok, (float(ours), float(expected))


def test_quickstart_equals_real_trl_when_installed():
    trl_gkd = pytest.importorskip("trl.experimental.gkd", reason="TRL is not installed")
    student, teacher, labels = causal_batch()
    ours = distillkit.distill_loss(student, teacher, distillkit.shift_labels(labels), divergence="jsd",
                                   beta=0.5, temperature=1.0, temperature_scaling=False)
    theirs = trl_gkd.GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:],
                                                      beta=0.5, temperature=1.0)
    assert compare(ours, theirs.double(), torch.float32, "loss").ok


def test_shift_labels():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert distillkit.shift_labels(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]
    assert distillkit.shift_labels(labels, ignore_index=-1)[:, -1].tolist() == [-1, -1]
    with pytest.raises(TypeError, match="labels"):
        distillkit.shift_labels(labels.float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ignored_tokens_take_part_in_no_term(backend, divergence):
    """The loss with ignored tokens equals the loss on the kept tokens alone (values and gradient)."""
    student, teacher, labels = causal_batch(vocab=37)
    keep = labels != -100
    s_all = student.clone().requires_grad_()
    loss = distillkit.distill_loss(s_all, teacher, labels, divergence=divergence, temperature=1.3,
                                   kl_weight=0.7, ce_weight=0.3, backend=backend)
    loss.backward()
    s_kept = student[keep].clone().requires_grad_()
    kept = distillkit.distill_loss(s_kept, teacher[keep], labels[keep], divergence=divergence, temperature=1.3,
                                   kl_weight=0.7, ce_weight=0.3, backend=backend)
    kept.backward()
    assert compare(loss, kept.double(), torch.float32, "loss").ok
    assert torch.equal(s_all.grad[~keep], torch.zeros_like(s_all.grad[~keep]))
    assert compare(s_all.grad[keep], s_kept.grad.double(), torch.float32, "grad").ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_opt_out_keeps_the_divergence_on_ignored_tokens(backend):
    student, teacher, labels = causal_batch(vocab=37)
    kwargs = dict(kl_weight=0.7, ce_weight=0.3, temperature=1.3, divergence_on_ignored=True)
    ours = distillkit.distill_loss(student, teacher, labels, backend=backend, **kwargs)
    expected = reference.distill_loss(student.double(), teacher.double(), labels, **kwargs)
    # By hand: divergence over every token, CE over the labelled ones, mean over all tokens.
    by_hand = (0.7 * 1.69 * reference.divergence_per_token(student.double(), teacher.double(), temperature=1.3)
               + 0.3 * reference.cross_entropy_per_token(student.double(), labels)).mean()
    assert torch.allclose(expected, by_hand, rtol=1e-12)
    assert compare(ours, expected, torch.float32, "loss").ok
    masked = distillkit.distill_loss(student, teacher, labels, backend=backend, kl_weight=0.7, ce_weight=0.3,
                                     temperature=1.3)
    assert not torch.allclose(ours, masked)


def test_every_entry_point_masks_ignored_tokens():
    """distill_loss, DistillationLoss, fused-linear, top-k and the vocabulary-parallel loss (one process)
    agree with the loss on the kept tokens alone."""
    n, h, vocab = 12, 8, 29
    hidden, t_hidden = torch.randn(n, h), torch.randn(n, h)
    weight, t_weight = torch.randn(vocab, h), torch.randn(vocab, h)
    student, teacher = hidden @ weight.T, t_hidden @ t_weight.T
    labels = torch.randint(0, vocab, (n,))
    labels[::3] = -100
    keep = labels != -100
    opts = dict(divergence="reverse_kl", temperature=1.5, kl_weight=0.6, ce_weight=0.4)
    expected = reference.distill_loss(student[keep].double(), teacher[keep].double(), labels[keep], **opts)
    from distillkit.parallel import distill_loss_vocab_parallel
    got = {
        "distill_loss": distillkit.distill_loss(student, teacher, labels, backend="torch", **opts),
        "module": distillkit.DistillationLoss(backend="torch", **opts)(student, teacher, labels),
        "fused_linear": fused_linear_distill_loss(hidden, weight, t_hidden, t_weight, labels, backend="torch",
                                                  chunk_size=5, **opts),
        "vocab_parallel": distill_loss_vocab_parallel(student, teacher, labels, backend="torch", **opts),
    }
    for name, value in got.items():
        assert compare(value, expected, torch.float32, "loss").ok, (name, float(value), float(expected))
    # top-k: a teacher given by its top 5 log-probabilities, ignored tokens excluded likewise
    ids = teacher.topk(5, -1).indices
    lps = torch.log_softmax(teacher, -1).gather(-1, ids)
    topk_all = distill_loss_topk(student, ids, lps, labels, temperature=1.5, kl_weight=0.6, ce_weight=0.4)
    topk_kept = distill_loss_topk(student[keep], ids[keep], lps[keep], labels[keep], temperature=1.5,
                                  kl_weight=0.6, ce_weight=0.4)
    assert torch.allclose(topk_all, topk_kept, rtol=1e-5)


def test_span_loss_keeps_per_span_control():
    """SpanDistillationLoss: the span ids decide where the divergence applies, labels only mask CE."""
    student, teacher = torch.randn(1, 4, 11), torch.randn(1, 4, 11)
    labels = torch.tensor([[-100, -100, 3, 4]])
    spans = torch.tensor([[int(distillkit.Span.REASON)] * 4])
    loss_fn = distillkit.SpanDistillationLoss({"reason": (1.0, 0.0)}, backend="torch")
    expected = reference.distill_loss(student.double(), teacher.double(), labels, divergence_on_ignored=True)
    assert compare(loss_fn(student, teacher, labels, spans), expected, torch.float32, "loss").ok


# -- validation: every option named -----------------------------------------------------------------

def _call(**overrides):
    student, teacher = torch.randn(3, 7), torch.randn(3, 7)
    labels = torch.tensor([1, 2, -100])
    options = dict(divergence="jsd", backend="torch", ce_weight=0.5)
    options.update(overrides)
    return distillkit.distill_loss(student, teacher, labels, **options)


@pytest.mark.parametrize("name,value,error", [
    ("beta", "0.5", TypeError), ("beta", True, TypeError), ("beta", torch.tensor(0.5), TypeError),
    ("skew", "0.1", TypeError), ("skew", False, TypeError),
    ("temperature", True, TypeError), ("temperature", "2", TypeError), ("temperature", None, TypeError),
    ("normalizer", "4", TypeError), ("normalizer", True, TypeError),
    ("normalizer", 0.0, ValueError), ("normalizer", -2.0, ValueError), ("normalizer", math.inf, ValueError),
    ("normalizer", math.nan, ValueError), ("divergence_on_ignored", "yes", TypeError),
])
def test_bad_option_raises_naming_it(name, value, error):
    with pytest.raises(error, match=name):
        _call(**{name: value})


@pytest.mark.parametrize("value", [0.0, -2.0, math.inf, math.nan])
@pytest.mark.parametrize("entry", ["distill_loss", "reference", "fused_linear"])
def test_tensor_normalizer_must_be_finite_and_positive(entry, value):
    normalizer = torch.tensor(value)
    with pytest.raises(RuntimeError, match="normalizer"):
        if entry == "fused_linear":
            fused_linear_distill_loss(torch.randn(3, 4), torch.randn(7, 4), torch.randn(3, 4), torch.randn(7, 4),
                                      normalizer=normalizer, backend="torch")
        elif entry == "reference":
            reference.distill_loss(torch.randn(3, 7), torch.randn(3, 7), normalizer=normalizer)
        else:
            _call(normalizer=normalizer)
    assert torch.isfinite(_call(normalizer=torch.tensor(4.0)))


def test_tensor_normalizer_check_is_skipped_under_compile():
    fn = torch.compile(lambda s, t, n: distillkit.distill_loss(s, t, normalizer=n, backend="torch"),
                       fullgraph=True, backend="eager")
    assert torch.isfinite(fn(torch.randn(3, 7), torch.randn(3, 7), torch.tensor(2.0)))


@pytest.mark.parametrize("bad", [-4, -2, 5, 7])
def test_span_ids_outside_the_table_raise(bad):
    loss_fn = distillkit.SpanDistillationLoss(backend="torch")
    student, teacher = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    spans = torch.tensor([[1, bad, 2]])
    with pytest.raises(ValueError, match="span_ids"):
        loss_fn(student, teacher, torch.tensor([[1, 2, 3]]), spans)


def test_span_ids_outside_the_table_weigh_zero_without_the_check():
    """With the check off (as under torch.compile), an unknown id is never read as another span."""
    loss_fn = distillkit.SpanDistillationLoss({"reason": (1.0, 0.0)}, backend="torch", check_labels=False,
                                              reduction="sum")
    student, teacher = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    reason = int(distillkit.Span.REASON)
    labels = torch.tensor([[1, 2, 3]])
    with_bad = loss_fn(student, teacher, labels, torch.tensor([[reason, -4, 7]]))
    only_reason = loss_fn(student[:, :1], teacher[:, :1], labels[:, :1], torch.tensor([[reason]]))
    assert torch.allclose(with_bad, only_reason)
