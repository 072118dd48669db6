"""vocab_mismatch: "error" names both sizes; "truncate" compares the shared first ids, CE keeps all."""

from __future__ import annotations

import pytest
import torch
from helpers import available_backends

import distillkit
from distillkit.core import reference
from distillkit.core.divergences import NAMES as DIVERGENCES
from distillkit.core.tolerances import compare

BACKENDS = available_backends()


def test_error_names_both_sizes_and_the_option():
    with pytest.raises(ValueError, match=r"vocabulary size 1280 but student_logits has 1271.*vocab_mismatch"):
        distillkit.distill_loss(torch.randn(2, 1271), torch.randn(2, 1280))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("student_vocab,teacher_vocab", [(1280, 1271), (1271, 1280)])
def test_truncate_matches_reference(backend, divergence, student_vocab, teacher_vocab):
    student = torch.randn(3, 4, student_vocab) * 2
    teacher = torch.randn(3, 4, teacher_vocab) * 2
    labels = torch.randint(0, student_vocab, (3, 4))  # may point past the teacher's vocabulary
    labels[0, 0] = student_vocab - 1
    labels[1] = -100
    options = dict(divergence=divergence, temperature=1.3, kl_weight=0.8, ce_weight=0.5,
                   vocab_mismatch="truncate")
    s = student.clone().requires_grad_()
    loss = distillkit.distill_loss(s, teacher, labels, backend=backend, **options)
    loss.backward()
    s64 = student.double().requires_grad_()
    ref = reference.distill_loss(s64, teacher.double(), labels, **options)
    ref.backward()
    for kind, got, want in (("loss", loss, ref), ("grad", s.grad, s64.grad)):
        result = compare(got, want, torch.float32, kind)
        assert result.ok, f"{kind}: {result.describe()}"
    assert torch.isfinite(s.grad).all()
    shared = min(student_vocab, teacher_vocab)
    if student_vocab > shared:  # the extra student ids get only the CE gradient
        s_ce = student.double().requires_grad_()
        ce_sum = reference.distill_loss(s_ce, None, labels, kl_weight=0.0, ce_weight=0.5, reduction="sum")
        (ce_grad,) = torch.autograd.grad(ce_sum, s_ce)
        # "mean" divides by the 8 active tokens (row 1's 4 labels are ignored: no term there)
        assert torch.allclose(s.grad[..., shared:].double(), ce_grad[..., shared:] / 8, atol=1e-7)
