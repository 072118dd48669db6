"""Masked-row compaction in the fused-linear ops (distillkit/core/row_compaction.py): rows without an active term
skip the GEMMs; the loss and every gradient are those of the uncompacted op, with one host-device sync per
eager call (none with compact_rows=False)."""

from __future__ import annotations

import pytest
import torch
from helpers import SYNCING_OPS, RecordOps, available_backends

from distillkit.core.fused_linear import fused_linear_distill_loss
from distillkit.sparse.fused_linear_topk import fused_linear_distill_loss_topk

N, H, V, K = 24, 8, 29, 4


def _masked_blocks(n: int) -> torch.Tensor:
    """[n] bool, True where masked: scattered blocks, as prompts and tool results are in agent trajectories."""
    masked = torch.zeros(n, dtype=torch.bool)
    for start, stop in ((0, 4), (7, 8), (11, 16), (20, 23)):
        masked[start:stop] = True
    return masked


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 2
    bias = torch.randn(V, generator=g) / 4
    t_hidden = torch.randn(N, H + 3, generator=g)
    t_weight = torch.randn(V, H + 3, generator=g) / 2
    labels = torch.randint(0, V, (N,), generator=g)
    masked = _masked_blocks(N)
    labels[masked] = -100
    labels[9] = -100  # a row with a divergence term but no CE term: stays active
    kl_weight = torch.rand(N, generator=g) * (~masked)
    return hidden, weight, bias, t_hidden, t_weight, labels, kl_weight


def _loss_and_grads(fn, compact, leaves, reduction, grad_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(leaves, compact)
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed)) + 0.5
    grads = torch.autograd.grad((loss * grad_out).sum(), leaves)
    return loss.detach(), grads


def _assert_same(fn, leaves, reduction):
    loss_c, grads_c = _loss_and_grads(fn, True, leaves, reduction)
    loss_u, grads_u = _loss_and_grads(fn, False, leaves, reduction)
    torch.testing.assert_close(loss_c, loss_u, rtol=1e-6, atol=1e-7)
    for i, (a, b) in enumerate(zip(grads_c, grads_u)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"gradient {i}: {m}")
    return loss_c, grads_c


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_dense_compaction_changes_nothing(backend, reduction, divergence):
    hidden, weight, bias, t_hidden, t_weight, labels, kl_weight = _inputs()

    def fn(leaves, compact):
        h, w, b, kw = leaves
        return fused_linear_distill_loss(h, w, t_hidden, t_weight, labels, student_bias=b, divergence=divergence,
                                         temperature=1.5, kl_weight=kw, ce_weight=0.4, reduction=reduction,
                                         backend=backend, chunk_size=5, compact_rows=compact,
                                         divergence_on_ignored=True)  # row 9: a divergence term, no CE term

    loss, (g_hidden, *_rest) = _assert_same(fn, [hidden, weight, bias, kl_weight], reduction)
    masked = _masked_blocks(N)
    assert torch.all(g_hidden[masked] == 0) and torch.all(g_hidden[~masked].abs().sum(-1) > 0)
    if reduction == "none":
        assert torch.all(loss[masked] == 0) and torch.all(loss[~masked] > 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_only_and_a_tensor_normalizer(reduction):
    hidden, weight, _, _, _, labels, _ = _inputs(seed=3)
    normalizer = torch.tensor(7.0)

    def fn(leaves, compact):
        h, w, *norm = leaves
        return fused_linear_distill_loss(h, w, None, None, labels, kl_weight=0.0, ce_weight=1.0, reduction=reduction,
                                         normalizer=norm[0] if norm else None, backend="torch", compact_rows=compact)

    _assert_same(fn, [hidden, weight] + ([normalizer] if reduction == "mean" else []), reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_compaction_changes_nothing(reduction):
    hidden, weight, bias, _, _, labels, kl_weight = _inputs(seed=5)
    g = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    ids[10] = -1  # a token without teacher: only its CE term is left
    logprobs = torch.log_softmax(torch.randn(N, K, generator=g), -1) - 0.2

    def fn(leaves, compact):
        h, w, b, kw = leaves
        return fused_linear_distill_loss_topk(h, w, ids, logprobs, labels, student_bias=b, kl_weight=kw,
                                              ce_weight=0.3, reduction=reduction, backend="torch", chunk_size=4,
                                              compact_rows=compact)

    _assert_same(fn, [hidden, weight, bias, kl_weight], reduction)


def test_every_row_masked_gives_zero_and_zero_gradients():
    hidden, weight, _, t_hidden, t_weight, labels, _ = _inputs()
    labels[:] = -100
    hidden[3] = float("nan")  # a masked row's value never reaches the results
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = fused_linear_distill_loss(h, w, t_hidden, t_weight, labels, ce_weight=1.0, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("compact,syncs", [(True, 1), (False, 0)])
def test_one_sync_with_compaction_and_none_without(compact, syncs):
    hidden, weight, bias, t_hidden, t_weight, labels, kl_weight = _inputs()
    h = hidden.requires_grad_()
    with RecordOps() as recorder:
        loss = fused_linear_distill_loss(h, weight, t_hidden, t_weight, labels, kl_weight=kl_weight, ce_weight=0.5,
                                         backend="torch", check_labels=False, compact_rows=compact)
        loss.backward()
    synced = [name for name in recorder.names if name in SYNCING_OPS]
    assert len(synced) == syncs, synced


def test_compiled_op_does_not_compact():
    hidden, weight, _, t_hidden, t_weight, labels, kl_weight = _inputs()

    def loss_fn(h, w):
        return fused_linear_distill_loss(h, w, t_hidden, t_weight, labels, kl_weight=kl_weight, ce_weight=0.5,
                                         backend="torch", check_labels=False)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(hidden, weight), loss_fn(hidden, weight), rtol=1e-6, atol=1e-7)
