"""The vocabulary-parallel loss against the single-process distillkit.distill_loss.

Two processes (gloo on CPU, spawned with torch.multiprocessing, a free port on 127.0.0.1) each
hold a slice of the vocabulary; the loss, the student gradient (gathered here, in the test only)
and the per-token weights' gradients must match the single-process loss on the full logits
under the tolerance table (distillkit.core.tolerances.compare). One spawn runs a whole case table, and
the failures of all cases are reported together.
"""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import SYNCING_OPS, RecordOps, available_backends, free_port, worker_process

import distillkit
from distillkit.core import divergences
from distillkit.core.divergences import NAMES as DIVERGENCES
from distillkit.parallel import distill_loss_vocab_parallel, replicated_input, vocab_shard_range
from distillkit.core.tolerances import compare

WORLD = 2
BACKENDS = [b for b in available_backends() if b in ("torch", "triton")]


def _entry(rank, world, port, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    with worker_process():
        fn(rank, world, *args)


def spawn(fn, *args, world=WORLD):
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _gather_last_dim(shard: torch.Tensor) -> torch.Tensor:
    """The full tensor from unequal shards along the last dim (test-only: the op itself never does this)."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, shard.detach())
    return torch.cat(parts, dim=-1)


# -- the case table -------------------------------------------------------------------------------

LEAD = (2, 3)
VOCAB = 37
LAYOUTS = [(23, 14), (18, 19), (37, 0)]  # unequal, nearly equal, one empty shard


def _cases():
    """Every divergence meets CE on and off, per-token and scalar weights, each reduction, three layouts
    and fp32/bf16; plus CE only, "truncate", masked vocabulary entries and non-contiguous shards."""
    reductions = ["mean", "sum", "none"]
    temps = [2.0, 1.0, 0.7]
    cases = []
    for i, divergence in enumerate(DIVERGENCES):
        for j, ce in enumerate((True, False)):
            k = 2 * i + j
            cases.append(dict(divergence=divergence, ce=ce, weights="per_token" if k % 2 == 0 else "scalar",
                              reduction=reductions[k % 3], temperature=temps[k % 3], layout=LAYOUTS[k % 3],
                              dtype=torch.bfloat16 if k % 4 == 3 else torch.float32, contiguous=k % 3 == 1))
    cases.append(dict(divergence="forward_kl", ce=True, kl_zero=True, weights="scalar", reduction="mean",
                      temperature=1.0, layout=(23, 14), dtype=torch.float32))
    for divergence in ("forward_kl", "jsd"):
        cases.append(dict(divergence=divergence, ce=True, weights="per_token", reduction="mean", temperature=2.0,
                          layout=(19, 18), dtype=torch.float32, teacher_vocab=30))
    for divergence in ("forward_kl", "reverse_kl", "skew_reverse_kl", "tvd"):
        cases.append(dict(divergence=divergence, ce=True, weights="per_token", reduction="sum", temperature=1.5,
                          layout=(23, 14), dtype=torch.float32, masked=True))
    return cases


def _inputs(case, seed):
    g = torch.Generator().manual_seed(seed)
    teacher_vocab = case.get("teacher_vocab", VOCAB)
    student = (torch.randn(*LEAD, VOCAB, generator=g) * 3).to(case["dtype"])
    teacher = (torch.randn(*LEAD, teacher_vocab, generator=g) * 3).to(case["dtype"])
    labels = torch.randint(0, VOCAB, LEAD, generator=g)
    split = case["layout"][0]
    labels[0, 0], labels[1, 0] = 3, VOCAB - 2  # a label in each shard (the second is in the first when it is empty)
    labels[0, 1] = split if split < VOCAB else 5
    labels[1, 1] = -100  # ignored
    if case.get("masked"):
        # Row (0, 0): the whole second shard masked (both sides for the reverse-type divergences, whose
        # D is +inf where the student has mass and the teacher none); row (1, 2): part of the first shard.
        teacher[0, 0, split:] = float("-inf")
        teacher[1, 2, 4:9] = float("-inf")
        if case["divergence"] in ("reverse_kl", "skew_reverse_kl", "tvd"):
            student[0, 0, split:] = float("-inf")
            student[1, 2, 4:9] = float("-inf")
        labels[0, 0], labels[1, 2] = 1, 12
    kl = torch.rand(LEAD, generator=g)
    kl[0, 2] = 0.0  # a token left out of the divergence
    ce = torch.rand(LEAD, generator=g)
    grad_out = torch.rand(LEAD, generator=g) + 0.5
    return student, teacher, labels, kl, ce, grad_out


def _weights(case, kl, ce):
    if case.get("kl_zero"):
        kl_w = 0.0
    elif case["weights"] == "per_token":
        kl_w = kl.clone().requires_grad_()
    else:
        kl_w = 0.7
    if not case["ce"]:
        ce_w = 0.0
    elif case["weights"] == "per_token":
        ce_w = ce.clone().requires_grad_()
    else:
        ce_w = 0.4
    return kl_w, ce_w


def _check(failures, name, actual, expected, dtype, kind):
    result = compare(actual, expected, dtype, kind)
    if not result.ok:
        failures.append(f"{name}: {result.describe()}")


def _equivalence_worker(rank, world, backend):
    failures = []
    for n, case in enumerate(_cases()):
        context = f"case {n} {case}"
        student, teacher, labels, kl, ce, grad_out = _inputs(case, seed=1000 + n)
        sizes = case["layout"]
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        t_shard = teacher[..., start:min(stop, teacher.shape[-1])]
        if case.get("contiguous"):
            leaf = student[..., start:stop].contiguous().requires_grad_()
            s_par, t_shard = leaf, t_shard.contiguous()
        else:  # strided views of wider rows, as a slice of full logits would be
            leaf = student.detach().clone().requires_grad_()
            s_par = leaf[..., start:stop]
        options = dict(divergence=case["divergence"], temperature=case["temperature"],
                       reduction=case["reduction"], backend=backend, ignore_index=-100,
                       vocab_mismatch="truncate" if "teacher_vocab" in case else "error")

        kl_par, ce_par = _weights(case, kl, ce)
        loss_par = distill_loss_vocab_parallel(s_par, t_shard, labels, vocab_start=start, kl_weight=kl_par,
                                               ce_weight=ce_par, **options)
        loss_par.backward(grad_out if case["reduction"] == "none" else None)
        grad_par = _gather_last_dim(leaf.grad if case.get("contiguous") else leaf.grad[..., start:stop])

        s_one = student.detach().clone().requires_grad_()
        kl_one, ce_one = _weights(case, kl, ce)
        loss_one = distillkit.distill_loss(s_one, teacher, labels, kl_weight=kl_one, ce_weight=ce_one, **options)
        loss_one.backward(grad_out if case["reduction"] == "none" else None)

        dtype = case["dtype"]
        _check(failures, f"{context} loss", loss_par, loss_one, dtype, "loss")
        _check(failures, f"{context} student grad", grad_par, s_one.grad, dtype, "grad")
        for name, w_par, w_one in (("kl_weight", kl_par, kl_one), ("ce_weight", ce_par, ce_one)):
            if isinstance(w_par, torch.Tensor):
                _check(failures, f"{context} {name} grad", w_par.grad, w_one.grad, torch.float32, "loss")
        # Every rank returns the same loss.
        losses: list = [None] * world
        dist.all_gather_object(losses, loss_par.detach())
        if not all(torch.equal(x, losses[0]) for x in losses):
            failures.append(f"{context}: the loss differs between ranks")
    assert not failures, f"{len(failures)} failures on rank {rank} ({backend}):\n" + "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_single_process(backend):
    spawn(_equivalence_worker, backend)


# -- a column-parallel LM head, default vocab_start ----------------------------------------------

def _lm_head_worker(rank, world):
    torch.manual_seed(0)
    tokens, hidden_size, vocab = 10, 8, 41  # torch.chunk layout: 21 + 20
    hidden = torch.randn(tokens, hidden_size)
    weight = torch.randn(vocab, hidden_size)
    teacher = torch.randn(tokens, vocab) * 2
    labels = torch.randint(0, vocab, (tokens,))
    labels[::4] = -100
    start, stop = vocab_shard_range(vocab, rank, world)

    h_par = hidden.clone().requires_grad_()
    w_par = weight[start:stop].clone().requires_grad_()
    logits = replicated_input(h_par) @ w_par.T
    # Through the public entry point: distill_loss(process_group=...) (vocab_start gathered).
    loss = distillkit.distill_loss(logits, teacher[:, start:stop], labels, divergence="jsd", temperature=2.0,
                                   kl_weight=0.5, ce_weight=0.5, backend="torch",
                                   process_group=torch.distributed.group.WORLD)
    loss.backward()

    h_one = hidden.clone().requires_grad_()
    w_one = weight.clone().requires_grad_()
    ref = distillkit.distill_loss(h_one @ w_one.T, teacher, labels, divergence="jsd", temperature=2.0,
                                  kl_weight=0.5, ce_weight=0.5, backend="torch")
    ref.backward()
    for name, actual, expected, kind in (("loss", loss, ref, "loss"), ("hidden grad", h_par.grad, h_one.grad, "grad"),
                                         ("head grad", w_par.grad, w_one.grad[start:stop], "grad")):
        result = compare(actual, expected, torch.float32, kind)
        assert result.ok, f"{name} on rank {rank}: {result.describe()}"

    # The same under torch.compile(fullgraph=True) (vocab_start passed: the default would all-gather).
    def head_loss(h, w, pg):
        return distillkit.distill_loss(replicated_input(h, pg) @ w.T, teacher[:, start:stop], labels,
                                       divergence="jsd", temperature=2.0, kl_weight=0.5, ce_weight=0.5,
                                       backend="torch", process_group=pg, vocab_start=start)

    h_c, w_c = hidden.clone().requires_grad_(), weight[start:stop].clone().requires_grad_()
    compiled = torch.compile(head_loss, fullgraph=True, backend="aot_eager")(h_c, w_c, torch.distributed.group.WORLD)
    compiled.backward()
    torch.testing.assert_close(compiled.detach(), loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h_c.grad, h_par.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w_c.grad, w_par.grad, rtol=1e-6, atol=1e-7)


def test_column_parallel_lm_head_with_default_vocab_start():
    spawn(_lm_head_worker)


def _released_group_worker(rank, world):
    group = dist.new_group(list(range(world)))
    shard = torch.randn(3, 4 + rank)
    # The default vocab_start is all-gathered once and cached per group: the cache must not keep the
    # group (and its gloo threads) alive after destroy_process_group.
    for _ in range(2):
        distillkit.distill_loss(shard, shard * 2, divergence="forward_kl", process_group=group, backend="torch")
    collected = weakref.ref(group)
    dist.destroy_process_group(group)
    del group
    gc.collect()
    assert collected() is None, "the group outlived destroy_process_group and the last reference to it"


def test_vocab_start_cache_releases_destroyed_groups():
    spawn(_released_group_worker)


# -- single process -------------------------------------------------------------------------------

def test_vocab_shard_range_is_the_chunk_layout():
    for vocab, world in ((41, 2), (10, 3), (4, 3), (8, 4)):
        bounds = [vocab_shard_range(vocab, r, world) for r in range(world)]
        chunks = torch.arange(vocab).chunk(world)
        assert [stop - start for start, stop in bounds][:len(chunks)] == [len(c) for c in chunks]
        assert bounds[0][0] == 0 and bounds[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_process_group_is_the_single_process_loss(backend):
    student = torch.randn(4, 50) * 2
    teacher = torch.randn(4, 50) * 2
    labels = torch.tensor([3, -100, 49, 0])
    for divergence in ("reverse_kl", "skew_forward_kl"):
        results = []
        for fn in (distill_loss_vocab_parallel, distillkit.distill_loss):
            s = student.clone().requires_grad_()
            loss = fn(s, teacher, labels, divergence=divergence, kl_weight=0.5, ce_weight=0.5, temperature=2.0,
                      backend=backend)
            loss.backward()
            results.append((loss, s.grad))
        assert compare(results[0][0], results[1][0], torch.float32, "loss").ok
        assert compare(results[0][1], results[1][1], torch.float32, "grad").ok


def test_labels_outside_every_shard_raise():
    student, teacher = torch.randn(3, 20), torch.randn(3, 20)
    with pytest.raises(ValueError, match="any rank's vocabulary shard"):
        distill_loss_vocab_parallel(student, teacher, torch.tensor([1, 20, 2]), ce_weight=1.0, backend="torch")
    loss = distill_loss_vocab_parallel(student, teacher, torch.tensor([1, 20, 2]), ce_weight=1.0, backend="torch",
                                       check_labels=False)
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="vocab_start"):
        distill_loss_vocab_parallel(student, teacher, vocab_start=-1, backend="torch")


def _compile_worker(rank, world):
    """torch.compile(fullgraph=True) of the vocabulary-parallel loss (the op takes the group by name) equals
    eager, gradient included; torch.library.opcheck passes on its custom ops with a live group."""
    case = dict(divergence="jsd", ce=True, weights="per_token", reduction="mean", temperature=2.0,
                layout=(23, 14), dtype=torch.float32)
    student, teacher, labels, kl, ce, _ = _inputs(case, seed=11)
    start = 0 if rank == 0 else case["layout"][0]
    stop = start + case["layout"][rank]
    group = dist.new_group(list(range(world)))

    def loss_fn(s, t, y, kl_w, pg):
        return distillkit.distill_loss(s, t, y, divergence="jsd", temperature=2.0, kl_weight=kl_w, ce_weight=0.5,
                                       process_group=pg, vocab_start=start, backend="torch")

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        s = student[..., start:stop].clone().requires_grad_()
        loss = fn(s, teacher[..., start:stop], labels, kl, group)
        loss.backward()
        results.append((loss.detach(), s.grad))
    (eager_loss, eager_grad), (comp_loss, comp_grad) = results
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(comp_grad, eager_grad, rtol=1e-6, atol=1e-7)

    s = student[..., start:stop].clone().requires_grad_()
    args = (s, teacher[..., start:stop], labels, group.group_name, world, start, divergences.IDS["jsd"],
            0.5, 0.0, 2.0, -100, True, stop - start, "torch")
    torch.library.opcheck(torch.ops.distillkit.vocab_parallel_rows.default, args)
    div, ce_rows, valid, stats = torch.ops.distillkit.vocab_parallel_rows(*args)
    grads = (torch.rand_like(div), torch.rand_like(ce_rows))
    torch.library.opcheck(torch.ops.distillkit.vocab_parallel_rows_backward.default,
                          (*grads, s.detach(), args[1], labels, stats, valid, start, args[6], 0.5, 0.0, 2.0, -100, True,
                           stop - start, "torch"))
    x = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.distillkit.replicated_input.default, (x, group.group_name, world))
    torch.library.opcheck(torch.ops.distillkit.group_sum.default, (x.detach(), group.group_name, world))


def test_torch_compile_fullgraph_and_opcheck():
    spawn(_compile_worker)


def test_no_host_sync_with_explicit_vocab_start():
    student = torch.randn(2, 5, 64, requires_grad=True)
    teacher = torch.randn(2, 5, 64)
    labels = torch.randint(0, 64, (2, 5))
    for divergence in ("forward_kl", "tvd"):
        with RecordOps() as recorder:
            loss = distill_loss_vocab_parallel(student, teacher, labels, vocab_start=0, divergence=divergence,
                                               kl_weight=torch.rand(2, 5), ce_weight=0.5, backend="torch",
                                               check_labels=False)
            loss.backward()
        assert not set(recorder.names) & SYNCING_OPS, sorted(set(recorder.names) & SYNCING_OPS)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.main([__file__, "-q"])
