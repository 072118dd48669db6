"""Global-memory traffic of the Triton path, counted lane by lane under the interpreter.

One unit is one read of one [N, V] logits tensor (N * V * elem bytes). docs/DESIGN.md's
budget, forward + backward with the grad_output applied:

    forward_kl, reverse_kl    2 + 3 = 5
    jsd, skew, tvd            4 + 3 = 7
    CE only                   1 + 2 = 3

Per-row scalars (labels, the 8 stats, grad_div / grad_ce, the O(N) PyTorch glue of
the functional layer) are allowed on top, at most ROW_ALLOWANCE bytes a row: a kernel
that reads or writes one more [N, V] tensor (or one more pass) fails.
"""

from __future__ import annotations

import os

import pytest
import torch

import distillkit
from distillkit.tools.traffic import count_traffic, kernel_counting_available

pytestmark = pytest.mark.skipif(not kernel_counting_available(),
                                reason="counting Triton lanes needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")

ROW_ALLOWANCE = 512  # bytes per row for O(N) traffic (measured: at most ~370 at V=1271 bf16)
N = 6
VOCABS = [1271, 4096]
DTYPES = [torch.float32, torch.bfloat16]
# (forward, backward) units per docs/DESIGN.md
BUDGET = {
    "forward_kl": (2, 3), "reverse_kl": (2, 3),
    "jsd": (4, 3), "skew_forward_kl": (4, 3), "skew_reverse_kl": (4, 3), "tvd": (4, 3),
    None: (1, 2),  # CE only: the teacher is never read
}


def _inputs(vocab, dtype):
    torch.manual_seed(0)
    student = (torch.randn(2, N // 2, vocab) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(2, N // 2, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (2, N // 2))
    labels[0, 0] = -100
    return student, teacher, labels


def _measure(divergence, vocab, dtype, **options):
    """(forward, backward) traffic of one distill_loss call on the triton backend, grad_output included."""
    student, teacher, labels = _inputs(vocab, dtype)
    if divergence is None:
        kwargs = dict(kl_weight=0.0, ce_weight=1.0)
        teacher = None
    else:
        kwargs = dict(divergence=divergence, temperature=2.0, kl_weight=0.5, ce_weight=0.5)
    kwargs.update(options)
    with count_traffic() as forward:
        loss = distillkit.distill_loss(student, teacher, labels, backend="triton", **kwargs)
    with count_traffic() as backward:
        loss.backward(torch.full_like(loss, 0.7))  # a non-unit grad_output, applied inside the kernel
    assert student.grad is not None and torch.isfinite(student.grad.float()).all()
    return forward, backward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("divergence", list(BUDGET), ids=lambda d: d or "ce_only")
def test_triton_traffic_within_design_budget(divergence, vocab, dtype):
    forward, backward = _measure(divergence, vocab, dtype)
    unit = N * vocab * torch.empty((), dtype=dtype).element_size()
    allowance = ROW_ALLOWANCE * N / unit
    budget_fwd, budget_bwd = BUDGET[divergence]
    # Lower bounds prove the counting is live (a hook that saw nothing would pass any upper bound).
    # The row with the ignored label takes part in no term, so the backward only writes its zeros:
    # it reads s (CE only) or s and t of the other N - 1 rows.
    floor_bwd = 1 + (1 if divergence is None else 2) * (N - 1) / N
    for what, traffic, floor, budget in (("forward", forward, budget_fwd, budget_fwd),
                                         ("backward", backward, floor_bwd, budget_bwd)):
        got = traffic.units(unit)
        assert traffic.kernel_launches == 1, f"{what}: {traffic.kernel_launches} kernel launches"
        assert floor <= got <= budget + allowance, (
            f"{what} traffic {got:.3f} units (kernel {traffic.kernel / unit:.3f}, eager {traffic.eager / unit:.3f}), "
            f"budget {budget} + {allowance:.3f} for per-row scalars")
    total = forward.units(unit) + backward.units(unit)
    assert total <= budget_fwd + budget_bwd + allowance
    limit = 5 if divergence in ("forward_kl", "reverse_kl", None) else 7
    assert total <= limit + allowance


def test_masked_rows_are_not_read_in_backward():
    """Rows with kl_weight == 0 and no CE: the backward writes their zeros and reads nothing."""
    vocab, dtype = 4096, torch.float32
    kl_weight = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # 2 of 6 rows active (labelled ones)
    _, backward = _measure("forward_kl", vocab, dtype, kl_weight=kl_weight, ce_weight=0.0)
    unit = N * vocab * 4
    got_units = backward.units(unit)
    # write every row (1 unit) + read s and t of the 2 active rows (2 * 2/6)
    expected = 1 + 2 * 2 / N
    assert expected <= got_units <= expected + ROW_ALLOWANCE * N / unit, got_units


def test_eager_pytorch_traffic_is_counted_alike():
    """The same accounting charges eager log_softmax + kl_div + backward ~26 units in fp32, ~61 in bf16."""
    import torch.nn.functional as F

    results = {}
    for dtype in DTYPES:
        student, teacher, _ = _inputs(4096, dtype)
        with count_traffic() as traffic:
            log_q = torch.log_softmax(student.float() / 2.0, dim=-1)
            log_p = torch.log_softmax(teacher.float() / 2.0, dim=-1)
            loss = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * 4.0
            loss.backward()
        results[dtype] = traffic.units(N * 4096 * student.element_size())
    assert 20 <= results[torch.float32] <= 35, results
    assert 50 <= results[torch.bfloat16] <= 75, results


def test_kernels_true_without_interpreter_raises(monkeypatch):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with count_traffic(kernels=True):
            pass
