"""Data-parallel training with a distillkit loss: 2 processes (DDP, gloo on CPU) == 1 process, same global batch.

The two ranks get micro-batches with very different numbers of loss-carrying tokens (13 vs 3), so
the normalization matters: with the global token count (distillkit.training.distributed.global_token_count)
and the world-size factor that undoes DDP's gradient averaging, a few optimizer steps land on the
single-process parameters; the per-rank mean (each rank divides by its own count) does not.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, worker_process
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distillkit
from distillkit.training import distributed as dd

VOCAB, HIDDEN, SEQ, STEPS = 29, 16, 7, 3
LENGTHS = (7, 6, 2, 1)  # loss-carrying tokens per sequence of the global batch: rank 0 gets 13, rank 1 gets 3
WORLD = 2


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _models():
    torch.manual_seed(0)
    student = TinyLM()
    teacher = TinyLM().requires_grad_(False)
    return student, teacher


def _batch(step):
    """The global batch of a step: ids, labels (-100 on padding and ignored tokens), a per-token KL weight."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (len(LENGTHS), SEQ), generator=g)
    mask = torch.arange(SEQ)[None, :] < torch.tensor(LENGTHS)[:, None]
    labels = torch.where(mask, torch.randint(0, VOCAB, ids.shape, generator=g), -100)
    labels[0, 2] = -100  # a token with a divergence and no label
    return ids, labels, mask.float()


def _loss(model, teacher, ids, labels, kl_weight, normalizer, scale=1):
    with torch.no_grad():
        teacher_logits = teacher(ids) * 3
    loss = distillkit.distill_loss(model(ids), teacher_logits, labels, divergence="forward_kl", temperature=2.0,
                                   kl_weight=kl_weight, ce_weight=0.5, normalizer=normalizer, backend="torch")
    return loss * scale


def _train(model, teacher, rows, normalization):
    """STEPS SGD steps; per step the global loss (mean over the global batch's tokens)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(STEPS):
        ids, labels, kl_weight = (x[rows] for x in _batch(step))
        if normalization == "global":
            normalizer = dd.global_token_count(kl_weight)  # tokens with a non-zero weight, over all ranks
            loss = _loss(model, teacher, ids, labels, kl_weight, normalizer, dd.data_parallel_loss_scale())
        else:  # each rank's own mean, as a plain reduction="mean" would give
            loss = _loss(model, teacher, ids, labels, kl_weight, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(dd.all_reduce_sum(loss.detach()) / dd.world_size())
    return torch.stack(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with worker_process():
        per_rank = len(LENGTHS) // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)

        # The helpers themselves.
        _, labels, kl_weight = (x[rows] for x in _batch(0))
        assert dd.is_distributed() and dd.rank() == rank and dd.world_size() == world
        assert float(dd.global_token_count(kl_weight)) == sum(LENGTHS)
        n_labels = int((_batch(0)[1] != -100).sum())  # over the global batch
        assert float(dd.global_token_count([labels, labels])) == 2 * n_labels  # two accumulation micro-batches
        info = logging.LogRecord("distillkit", logging.INFO, __file__, 0, "hello", None, None)
        warning = logging.LogRecord("distillkit", logging.WARNING, __file__, 0, "careful", None, None)
        rank_filter = dd.get_logger("distillkit.test").handlers[0].filters[0]
        assert rank_filter.filter(info) == (rank == 0) and rank_filter.filter(warning)
        assert info.rank == rank and info.world_size == world

        results = {}
        for normalization in ("global", "local"):
            student, teacher = _models()
            results[normalization] = _train(DDP(student), teacher, rows, normalization)
        if rank == 0:
            # DDP wraps the module: strip the "module." prefix for the comparison.
            results = {k: (losses, {name.removeprefix("module."): v for name, v in state.items()})
                       for k, (losses, state) in results.items()}
            torch.save(results, out_path)
        # dd.shutdown() destroys the group for good (its gloo threads joined): the DDP wrappers, dropped
        # above, no longer hold it.
        world_group = weakref.ref(dist.group.WORLD)
        dd.shutdown()
        assert not dd.is_distributed() and world_group() is None, "the process group outlived dd.shutdown()"


def test_ddp_with_global_normalization_matches_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=True)
    ddp = torch.load(out)

    student, teacher = _models()
    one_losses, one_state = _train(student, teacher, slice(None), "global")  # one process: the count is local

    losses, state = ddp["global"]
    torch.testing.assert_close(losses, one_losses, rtol=1e-5, atol=1e-6)
    for name, value in one_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    # The per-rank mean weighs rank 1's 3 tokens as much as rank 0's 13: a different model.
    _, local_state = ddp["local"]
    gap = max(float((local_state[k] - v).abs().max()) for k, v in one_state.items())
    assert gap > 1e-2, f"the per-rank mean should not match the single-process run (gap {gap:.2e})"


def test_helpers_in_one_process():
    assert not dd.is_distributed() and dd.rank() == 0 and dd.world_size() == 1
    labels = torch.tensor([[1, -100, 3], [-100, -100, 0]])
    assert float(dd.global_token_count(labels)) == 3.0
    assert float(dd.global_token_count(labels != -100)) == 3.0
    assert dd.data_parallel_loss_scale() == 1
    assert dd.rank_zero_only(lambda: 7)() == 7
    dd.shutdown()  # nothing to destroy
    assert not dd.is_distributed()
    logger = dd.get_logger("distillkit.test.single")
    assert logger is dd.get_logger("distillkit.test.single") and len(logger.handlers) == 1
