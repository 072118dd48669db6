"""DistillationLoss and SpanDistillationLoss."""

from __future__ import annotations

import pytest
import torch
from helpers import available_backends

import distillkit
from distillkit import PAD_SPAN, DistillationLoss, Span, SpanDistillationLoss

BACKENDS = available_backends()
V = 1271


def batch(lead=(2, 9)):
    student = torch.randn(*lead, V, requires_grad=True)
    teacher = torch.randn(*lead, V)
    labels = torch.randint(0, V, lead)
    spans = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 4, 4], [0, 1, 1, 2, 3, 3, 4, PAD_SPAN, PAD_SPAN]])[:, :lead[1]]
    labels[(spans == Span.PROMPT) | (spans == Span.OBSERVATION) | (spans == PAD_SPAN)] = -100
    return student, teacher, labels, spans


@pytest.mark.parametrize("backend", BACKENDS)
def test_distillation_loss_module_matches_functional(backend):
    student, teacher, labels, _ = batch()
    module = DistillationLoss("jsd", beta=0.3, temperature=2.0, kl_weight=0.7, ce_weight=0.3, backend=backend)
    expected = distillkit.distill_loss(student, teacher, labels, divergence="jsd", beta=0.3, temperature=2.0,
                                       kl_weight=0.7, ce_weight=0.3, backend=backend)
    torch.testing.assert_close(module(student, teacher, labels), expected)
    assert "jsd" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_span_loss_is_per_token_weighted_distill_loss(backend):
    student, teacher, labels, spans = batch()
    table = {"reason": (1.0, 0.0), "action": (0.2, 1.0), "answer": (0.5, 0.5)}
    module = SpanDistillationLoss(table, "forward_kl", temperature=1.5, backend=backend)
    loss = module(student, teacher, labels, spans)
    kl_w = torch.zeros(spans.shape)
    ce_w = torch.zeros(spans.shape)
    for name, (kl, ce) in table.items():
        kl_w[spans == Span[name.upper()]] = kl
        ce_w[spans == Span[name.upper()]] = ce
    expected = distillkit.distill_loss(student, teacher, labels, temperature=1.5, kl_weight=kl_w,
                                       ce_weight=ce_w, backend=backend)
    torch.testing.assert_close(loss, expected)
    parts = module.last_components
    assert set(parts) >= {"kl/reason", "kl/action", "kl/answer", "ce/action", "ce/answer", "tokens/reason"}
    assert "kl/observation" not in parts and int(parts["tokens/action"]) == 3


def test_observation_and_padding_spans_get_no_gradient():
    student, teacher, labels, spans = batch()
    module = SpanDistillationLoss(backend="torch")
    module(student, teacher, labels, spans).backward()
    silent = (spans == Span.OBSERVATION) | (spans == Span.PROMPT) | (spans == PAD_SPAN)
    assert torch.all(student.grad[silent] == 0)
    assert torch.all(student.grad[~silent].abs().sum(-1) > 0)


def test_learnable_weights_do_not_collapse():
    """Uncertainty weighting: minimizing exp(-s) L + s over s gives s = log L, so the effective weight
    settles at w / L_k, not at 0."""
    student, teacher, labels, spans = batch()
    module = SpanDistillationLoss({"reason": (1.0, 0.0), "action": (0.0, 1.0)}, learnable=True, backend="torch",
                                  reduction="sum")
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        module(student.detach(), teacher, labels, spans).backward()
        optimizer.step()
    table = module.effective_table().detach()
    kl_sum = float(module.last_components["kl/reason"])
    ce_sum = float(module.last_components["ce/action"])
    assert table[Span.REASON, 0] == pytest.approx(1.0 / kl_sum, rel=0.05)
    assert table[Span.ACTION, 1] == pytest.approx(1.0 / ce_sum, rel=0.05)
    assert table[Span.OBSERVATION].abs().sum() == 0


def test_learnable_regularizer_counted_once_over_micro_batches():
    """Two micro-batches, each with its share of the tokens as regularizer_scale, give the loss and the
    gradients (student and log-variances) of the whole batch in one call."""
    student, teacher, labels, spans = batch()
    module = SpanDistillationLoss({"reason": (1.0, 0.0), "action": (0.5, 1.0), "answer": (1.0, 0.2)},
                                  learnable=True, backend="torch")
    with torch.no_grad():
        module.log_vars.uniform_(-0.5, 0.5)
    n = int((labels != -100).sum())

    def run(rows_per_call):
        student.grad, module.log_vars.grad = None, None
        total = 0.0
        for rows in rows_per_call:
            share = float((labels[rows] != -100).sum()) / n
            loss = module(student[rows], teacher[rows], labels[rows], spans[rows], normalizer=n,
                          regularizer_scale=share)
            loss.backward()
            total = total + loss.detach()
        return total, student.grad.clone(), module.log_vars.grad.clone()

    whole = run([slice(0, 2)])
    parts = run([slice(0, 1), slice(1, 2)])
    for a, b in zip(parts, whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert whole[2].abs().sum() > 0
    # Without the scale, the regularizer would be counted once per call.
    module.log_vars.grad = None
    naive = sum(module(student[r], teacher[r], labels[r], spans[r], normalizer=n).detach()
                for r in (slice(0, 1), slice(1, 2)))
    assert float(naive - whole[0]) == pytest.approx(float(module.regularizer().detach()), rel=1e-5)


def test_span_table_errors():
    with pytest.raises(ValueError, match="span_weights has unknown span 'thinking'"):
        SpanDistillationLoss({"thinking": (1.0, 0.0)})
    with pytest.raises(ValueError, match="span_ids has shape"):
        student, teacher, labels, spans = batch()
        SpanDistillationLoss(backend="torch")(student, teacher, labels, spans[:, :3])
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)
