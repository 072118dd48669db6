"""Process groups and the vocabulary layout of the vocabulary-parallel loss: shard ranges, the default
vocab_start, and the group-by-name plumbing of the custom ops (a ProcessGroup is not a custom-op argument
type, so they take its name, as torch's functional collectives do)."""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist


def vocab_shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's shard in the torch.chunk / DTensor ``Shard(-1)`` layout: ceil(V/P) ids per
    rank, the last ranks smaller (possibly empty). Any other layout works too: pass its vocab_start."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    chunk = -(-vocab_size // world_size)
    start = min(rank * chunk, vocab_size)
    return start, min(start + chunk, vocab_size)


def _group(process_group):
    """(group, rank, world size); a world of 1 when torch.distributed is not initialized and no group is given."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        process_group = dist.group.WORLD
    return process_group, dist.get_rank(process_group), dist.get_world_size(process_group)


# group -> {(rank, shard size): vocab_start}. Weak keys: the cache must not keep a destroyed group (and
# its gloo/NCCL threads) alive until interpreter exit, where a gloo worker freeing a finished collective
# needs the GIL while Python is finalizing and aborts the process.
_VOCAB_STARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _default_vocab_start(group, rank: int, world: int, shard_size: int) -> int:
    """Prefix sum of the shard sizes, all-gathered once per (group, shard size) and cached.

    The gather is a host-level collective (a device sync with NCCL). The cache assumes the group's
    layout never changes; a rank whose size changed while another's did not would desynchronize the
    collectives, so pass vocab_start explicitly whenever the layout is not fixed."""
    if world == 1:
        return 0
    if torch.compiler.is_compiling():
        raise ValueError("vocab_start is needed under torch.compile: the default all-gathers the shard sizes "
                         "(a host-level collective); pass vocab_start (e.g. from vocab_shard_range)")
    starts = _VOCAB_STARTS.setdefault(group, {})
    key = (rank, shard_size)
    if key not in starts:
        sizes: list = [None] * world
        dist.all_gather_object(sizes, shard_size, group=group)
        starts[key] = sum(sizes[:rank])
    return starts[key]


def _all_reduce(x: torch.Tensor, op, group, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _group_name(group, world: int) -> str:
    """The name the custom ops take; "" for a world of one (no collectives)."""
    return "" if group is None or world == 1 else group.group_name


def _resolve_group(group_name: str, world: int):
    if not group_name or world == 1:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)
