"""One teacher cache written by several processes (torchrun): the split of the examples, the per-rank
part indexes, and rank 0's merge of them into index.json.

Every rank is given the same examples and writes a contiguous range of them, cut at batch boundaries so
that each batch is the one a single process would run (same padding, same numbers), to its own shards
(shard-rankRRRRR-NNNNN.safetensors) and its own part index (index.rankRRRRR.json: the fields of an index
plus "first_example"). Meanwhile index.json says "complete": false and the number of processes
("world_size"), so that a reader refuses the folder and a resume checks that it runs on as many. When
every part is complete, rank 0 writes index.json listing every shard in example order, and removes the
part indexes. No object is pickled: the ranks exchange one int per collective.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch
import torch.distributed as dist

from .cache_format import INDEX_FILE, TeacherCacheError, load_index

__all__ = ["SHARED_FIELDS", "rank_range", "part_index_file", "shard_file", "is_writer_file", "all_ranks_ok",
           "broadcast_int", "merge_parts"]

# The fields every rank's part must share with index.json (vocab_size: once known).
SHARED_FIELDS = ("k", "mode", "seed", "logprob_dtype", "temperature", "vocab_size")
_WRITER_FILE = re.compile(r"(shard-(rank\d{5}-)?\d{5}\.safetensors|index(\.rank\d{5})?\.json)(\.tmp)?")


def rank_range(num_examples: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the examples of `rank`: contiguous, whole batches of `batch_size`, balanced."""
    batches = -(-num_examples // batch_size)
    first, last = rank * batches // world_size, (rank + 1) * batches // world_size
    return min(first * batch_size, num_examples), min(last * batch_size, num_examples)


def part_index_file(rank: Optional[int]) -> str:
    return INDEX_FILE if rank is None else f"index.rank{rank:05d}.json"


def shard_file(rank: Optional[int], number: int) -> str:
    return f"shard-{number:05d}.safetensors" if rank is None else f"shard-rank{rank:05d}-{number:05d}.safetensors"


def is_writer_file(name: str) -> bool:
    """A file name the writer uses (shards, indexes, their temporaries): the only ones it ever removes."""
    return _WRITER_FILE.fullmatch(name) is not None


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ranks_ok(ok: bool) -> bool:
    """True when `ok` on every rank (one all-reduce): how a failure on one rank reaches the others."""
    flag = torch.tensor([1 if ok else 0], device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_int(value: int) -> int:
    """rank 0's `value` on every rank."""
    tensor = torch.tensor([value], dtype=torch.int64, device=_flag_device())
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def merge_parts(path: str, header: dict, world_size: int) -> dict:
    """The complete index of the parts of ranks 0..world_size-1 (each complete), in example order."""
    index = {key: value for key, value in header.items() if key not in ("world_size", "complete")}
    index.update(num_examples=0, num_tokens=0, seq_lengths=[], shards=[])
    for rank in range(world_size):
        name = part_index_file(rank)
        part = load_index(path, allow_incomplete=True, index_file=name, part=True)
        where = os.path.join(path, name)
        if part["complete"] is not True:
            raise TeacherCacheError(f"{where}: field 'complete': rank {rank} has not finished its part")
        if part["first_example"] != index["num_examples"]:
            raise TeacherCacheError(f"{where}: field 'first_example': must be {index['num_examples']} (the examples "
                                    f"of ranks 0..{rank - 1}), got {part['first_example']}")
        for key in SHARED_FIELDS:
            if part["num_examples"] and index[key] is not None and part[key] != index[key]:
                raise TeacherCacheError(f"{where}: field {key!r}: {part[key]!r}, another rank wrote {index[key]!r}")
        if part["num_examples"] and index["vocab_size"] is None:
            index.update(vocab_size=part["vocab_size"], id_bits=part["id_bits"], logprob_bits=part["logprob_bits"])
        index["seq_lengths"] += part["seq_lengths"]
        index["shards"] += part["shards"]
        index["num_examples"] += part["num_examples"]
        index["num_tokens"] += part["num_tokens"]
    index["complete"] = True  # the last key
    return index
