"""Vocabulary-parallel loss on CPU/gloo: time, peak memory per rank, bytes all-reduced per token.

    python -m pytest benchmarks/bench_vocab_parallel.py --benchmark-only -s -q
    BENCH_VP_TOKENS=1024 BENCH_VP_VOCAB=32768 python -m pytest benchmarks/bench_vocab_parallel.py --benchmark-only -s

One forward + backward of kl_weight=0.5, ce_weight=0.5, T=2, fp32, torch backend, on [N, V] logits
(default N=512, V=16384) with the vocabulary split over P ranks (torch.chunk layout):

    single   distillkit.distill_loss on the full [N, V] logits (the baseline)
    P=1      distill_loss_vocab_parallel without a process group (no collective)
    P=2      distill_loss_vocab_parallel on 2 gloo ranks: this pytest process is rank 0 and times the
             step with pytest-benchmark; a spawned helper process is rank 1 and runs the same steps
             (it is told each step by a broadcast, which the timing includes)

Every rank runs with one intra-op thread (the machine has 2 cores), so P=2 uses both cores and
single / P=1 one. Reported per test (printed, and in the benchmark JSON's extra_info):

    peak MiB      peak torch tensor memory one step allocates on top of its inputs, per rank (running
                  sum of torch.profiler's memory events: the gradient, the fp32 temporaries, the
                  per-row statistics)
    shard MiB     the rank's student + teacher logits, for scale
    bytes/token   bytes the step all-reduces per token (rank 0's dist.all_reduce calls; 0 for P=1)
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distillkit
from distillkit.parallel import distill_loss_vocab_parallel, vocab_shard_range

TOKENS = int(os.environ.get("BENCH_VP_TOKENS", "512"))
VOCAB = int(os.environ.get("BENCH_VP_VOCAB", "16384"))
DIVERGENCES = ["forward_kl", "jsd"]
MiB = 2.0**20


def _peak_allocated_mib(step) -> float:
    """Peak of the torch tensor memory allocated during one call of step and not yet freed (the running sum
    of torch.profiler's memory events): what the step adds on top of its inputs, whatever the allocator
    keeps cached (an RSS high-water mark would depend on the process's earlier allocations)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / MiB


def _inputs(variant: str, rank: int, world: int):
    """This rank's logits shard (vocab_start, student, teacher) and the replicated labels."""
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(0))
    start, stop = (0, VOCAB) if variant == "single" else vocab_shard_range(VOCAB, rank, world)
    g = torch.Generator().manual_seed(1 + rank)
    student = (torch.randn(TOKENS, stop - start, generator=g) * 3).requires_grad_()
    teacher = torch.randn(TOKENS, stop - start, generator=g) * 3
    return start, student, teacher, labels


def _step_fn(variant: str, divergence: str, rank: int, world: int):
    start, student, teacher, labels = _inputs(variant, rank, world)
    options = dict(divergence=divergence, temperature=2.0, kl_weight=0.5, ce_weight=0.5, backend="torch",
                   check_labels=False)

    def step():
        student.grad = None
        if variant == "single":
            loss = distillkit.distill_loss(student, teacher, labels, **options)
        else:
            loss = distill_loss_vocab_parallel(student, teacher, labels, vocab_start=start, **options)
        loss.backward()

    shard_mib = (student.numel() + teacher.numel()) * 4 / MiB
    return step, shard_mib


def _count_all_reduce_bytes(step) -> int:
    """Bytes passed to dist.all_reduce during one call of step."""
    seen = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        seen.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        step()
    finally:
        dist.all_reduce = original
    return sum(seen)


# -- rank 1 of P=2: a helper process driven by rank 0 ----------------------------------------------

_STOP, _STEP, _MEMORY = 0, 1, 2


def _helper(port: int, divergence: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    try:
        step, shard_mib = _step_fn("P=2", divergence, 1, 2)
        command = torch.zeros((), dtype=torch.int64)
        while True:
            dist.broadcast(command, src=0)
            if int(command) == _STOP:
                break
            if int(command) == _MEMORY:
                results.put((_peak_allocated_mib(step), shard_mib))
            else:
                step()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _report(benchmark, variant, divergence, peaks, shards, bytes_per_token):
    benchmark.extra_info.update(tokens=TOKENS, vocab=VOCAB, ranks=len(peaks), peak_mib_per_rank=peaks,
                                shard_mib_per_rank=shards, allreduce_bytes_per_token=bytes_per_token)
    peaks_txt = " / ".join(f"{p:.1f}" for p in peaks)
    shards_txt = " / ".join(f"{s:.1f}" for s in shards)
    print(f"\n[{variant:6s} {divergence:10s}] N={TOKENS} V={VOCAB}: peak MiB per rank {peaks_txt} "
          f"(shard MiB {shards_txt}), all-reduced {bytes_per_token:.0f} bytes/token")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("variant", ["single", "P=1"])
def test_one_process(benchmark, variant, divergence):
    torch.set_num_threads(1)
    step, shard_mib = _step_fn(variant, divergence, 0, 1)
    step()  # warm-up
    peak = _peak_allocated_mib(step)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    _report(benchmark, variant, divergence, [peak], [shard_mib], 0.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_two_ranks(benchmark, divergence):
    torch.set_num_threads(1)
    port = _free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    helper = ctx.Process(target=_helper, args=(port, divergence, results))
    helper.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    command = torch.zeros((), dtype=torch.int64)

    def tell(value):
        command.fill_(value)
        dist.broadcast(command, src=0)

    try:
        step, shard_mib = _step_fn("P=2", divergence, 0, 2)

        def timed_step():
            tell(_STEP)
            step()

        timed_step()  # warm-up
        tell(_MEMORY)
        peak0 = _peak_allocated_mib(step)
        peak1, shard1 = results.get(timeout=120)
        tell(_STEP)
        bytes_per_token = _count_all_reduce_bytes(step) / TOKENS
        benchmark.pedantic(timed_step, rounds=5, iterations=1, warmup_rounds=1)
        tell(_STOP)
        _report(benchmark, "P=2", divergence, [peak0, peak1], [shard_mib, shard1], bytes_per_token)
    finally:
        dist.destroy_process_group()
        helper.join(timeout=60)
        if helper.is_alive():
            helper.terminate()
