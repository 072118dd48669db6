"""An on-disk cache of a teacher's log-probabilities (top-k or sampled) per token, for offline (sparse)
distillation.

    write_teacher_cache("cache/", teacher, examples, k=64)          # once, with the teacher
    cache = TeacherCache("cache/")                                  # then, in training
    batch = cache.batch(example_indices, length=input_ids.shape[1])
    loss = distill_loss_topk(student_logits, batch.ids, batch.logprobs, labels, tail="bucket")

(or, from a training YAML: `distillkit cache-teacher --config run.yaml --out cache/ --k 64`.)

Layout of the folder: safetensors shards plus ``index.json`` (parsed with `json`; nothing is pickled):

    index.json    {"format", "version", "k", "vocab_size", "mode", "seed", "logprob_dtype", "id_bits",
                   "logprob_bits", "temperature", "num_examples", "num_tokens", "seq_lengths": [...],
                   "shards": [{"file", "sha256", "num_examples", "num_tokens", "first_example"}, ...],
                   "complete": true}
    shard-00000.safetensors   "topk" int32 [tokens, K] (packed, below), "seq_lengths" int64 [examples]

Whole examples, in dataset order, are concatenated in the shards; position i of an example holds the
teacher's distribution at input position i (its next-token prediction there), aligned like the logits.
A cache written by several processes names its shards shard-rankRRRRR-NNNNN (cache_ranks.py).

mode "topk" (version 1; an index without "mode" is one): the teacher's K most likely ids. mode "sample"
(version 2; "seed" is recorded): K draws from the teacher, stored as the distinct ids with log(count / K)
(cache_sampling.py); fewer than K distinct ids leave absent entries, stored with log-probability -inf.
The reader returns id -1 for every -inf entry (it carries no mass; `distill_loss_topk` skips ids < 0).

Packing: 4 bytes per (token, k) entry, so 4 K bytes per token (+ the seq_lengths and a safetensors
header per shard). Each int32 word holds the id in its high ``id_bits`` bits and, in its low
``logprob_bits`` bits, the fp16/bf16 bit pattern of -logprob. Log-probabilities are <= 0, so the sign bit
is implied and 15 bits keep the value exactly: lossless up to 2**17 = 131072 ids. Larger vocabularies
round away 15 - logprob_bits low mantissa bits (one bit up to 2**18 ids).

Writing (cache_writer.py) rewrites the index after every shard with "complete": false, and with
"complete": true (its last key) only once every shard is on disk; an interrupted write can be resumed.
A reader checks index.json field by field on open (types, ranges, dtypes, plain shard file names that
exist, counts that add up; `TeacherCacheError` naming the file and field), refuses an incomplete cache,
and checks each shard when it first reads it (sha256, tensors, metadata; with verify, also no NaN, no id
outside the vocabulary and no id twice at a position; naming the shard file and tensor).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import OrderedDict
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from .cache_format import (FORMAT, INDEX_FILE, LOGPROB_DTYPES, VERSION, TeacherCacheError,  # noqa: F401
                           load_index, pack, packing_bits, show_value, unpack)
from .cache_writer import write_teacher_cache  # noqa: F401  (the writer's home before it had its own module)


class TopKBatch(NamedTuple):
    ids: torch.Tensor  # [B, L, K] int32; -1 at padding and absent entries (distill_loss_topk: no signal there)
    logprobs: torch.Tensor  # [B, L, K] fp16/bf16; -inf at padding and absent entries
    mask: torch.Tensor  # [B, L] bool, True at the cached (real) positions


def read_entries(words: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32, logprobs) of packed words, with id -1 at the -inf (absent) entries: their stored id is
    a filler, which must never reach the loss (a repeated id would count twice in the student's mass)."""
    ids, logprobs = unpack(words, vocab_size, dtype)
    return torch.where(logprobs == -math.inf, -1, ids), logprobs


def _check_entries(words: torch.Tensor, vocab_size: int, dtype: torch.dtype, file: str,
                   rows_per_chunk: int = 1 << 16) -> None:
    """No NaN log-probability, no id >= vocab_size and no id twice at a position (absent entries aside)."""
    for start in range(0, words.shape[0], rows_per_chunk):
        ids, logprobs = read_entries(words[start:start + rows_per_chunk], vocab_size, dtype)
        problem = ("a NaN log-probability" if torch.isnan(logprobs).any() else
                   f"an id >= vocab_size ({vocab_size})" if (ids >= vocab_size).any() else None)
        if problem is None:
            ordered = ids.sort(dim=-1).values
            if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
                problem = "an id twice at one position"
        if problem:
            raise TeacherCacheError(f"{file}: tensor 'topk' holds {problem} (rows from {start}): corrupt or not "
                                    "written by write_teacher_cache")


# -- reading ---------------------------------------------------------------------------------------

def _safetensors_metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len]).get("__metadata__") or {}


class TeacherCache:
    """Read a cache written by `write_teacher_cache`, aligned with training batches by example index."""

    def __init__(self, path: str, *, verify: bool = True, max_open_shards: int = 2):
        self.path = path
        self.verify = verify
        self.index = index = load_index(path)  # validated: the fields below have their types and ranges
        self.k: int = index["k"]
        self.vocab_size: int = index["vocab_size"]
        self.temperature: float = index["temperature"]
        self.mode: str = index.get("mode", "topk")  # written before modes existed: top-k
        self.seed: Optional[int] = index.get("seed")
        self.dtype: torch.dtype = LOGPROB_DTYPES[index["logprob_dtype"]]
        self.seq_lengths: list[int] = list(index["seq_lengths"])
        # example -> (shard, first token in the shard)
        self._where: list[tuple[int, int]] = []
        for s, shard in enumerate(index["shards"]):
            offset = 0
            for n in self.seq_lengths[shard["first_example"]:shard["first_example"] + shard["num_examples"]]:
                self._where.append((s, offset))
                offset += n
        self._open: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._max_open = max_open_shards
        self._entries_checked: set[int] = set()  # shards whose entries passed _check_entries

    def __len__(self) -> int:
        return len(self.seq_lengths)

    def _shard(self, s: int) -> torch.Tensor:
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        from safetensors.torch import load

        shard = self.index["shards"][s]
        file = os.path.join(self.path, shard["file"])
        if not os.path.exists(file):
            raise TeacherCacheError(f"{file}: shard {shard['file']} is missing from {self.path}")
        with open(file, "rb") as f:
            data = f.read()
        if self.verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise TeacherCacheError(f"{file}: sha256 mismatch with the index (corrupt or replaced file)")
        try:
            meta = _safetensors_metadata(data)
            tensors = load(data)  # safetensors: raw tensor bytes, nothing is unpickled
        except Exception as err:  # safetensors raises its own error types
            raise TeacherCacheError(f"{file}: not a readable safetensors file: {err}") from None
        first, count = shard["first_example"], shard["num_examples"]
        expected = {"topk": (torch.int32, [shard["num_tokens"], self.k]), "seq_lengths": (torch.int64, [count])}
        for name, (dtype, shape) in expected.items():
            tensor = tensors.get(name)
            if tensor is None:
                raise TeacherCacheError(f"{file}: tensor {name!r} is missing")
            if tensor.dtype != dtype or list(tensor.shape) != shape:
                raise TeacherCacheError(f"{file}: tensor {name!r} must be {dtype} {shape} (from the index), got "
                                        f"{tensor.dtype} {list(tensor.shape)}")
        for key, want in (("format", FORMAT), ("k", str(self.k)), ("first_example", str(first))):
            if meta.get(key) != want:
                raise TeacherCacheError(f"{file}: metadata {key!r} is {show_value(meta.get(key))}, the index says {want!r}")
        if tensors["seq_lengths"].tolist() != self.seq_lengths[first:first + count]:
            raise TeacherCacheError(f"{file}: tensor 'seq_lengths' differs from the index's "
                                    f"seq_lengths[{first}:{first + count}]")
        topk = tensors["topk"]
        if self.verify and s not in self._entries_checked:
            _check_entries(topk, self.vocab_size, self.dtype, file)
            self._entries_checked.add(s)
        self._open[s] = topk
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return topk

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [L, K] int32, logprobs [L, K]) of example i; id -1 / -inf at absent entries."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for a cache of {len(self)} examples")
        s, offset = self._where[i]
        words = self._shard(s)[offset:offset + self.seq_lengths[i]]
        return read_entries(words, self.vocab_size, self.dtype)

    def batch(self, indices: Sequence[int], *, length: Optional[int] = None,
              lengths: Optional[Sequence[int]] = None, padding_side: str = "right",
              truncate: bool = False) -> TopKBatch:
        """Examples `indices` (any order) padded to `length` (default: the longest).

        lengths: the training batch's own sequence lengths (e.g. attention_mask.sum(-1)); a mismatch with the
        cache raises, naming the example. truncate: allow examples longer than `length` (cut on the right).
        """
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
        indices = [int(i) for i in indices]
        if lengths is not None:
            lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
            for i, n in zip(indices, lengths, strict=True):
                if not 0 <= i < len(self):
                    raise IndexError(f"example {i} out of range for a cache of {len(self)} examples")
                if n != self.seq_lengths[i]:
                    s = self._where[i][0]
                    raise TeacherCacheError(f"example {i} has {n} tokens in the batch but {self.seq_lengths[i]} in "
                                            f"the cache (shard {self.index['shards'][s]['file']})")
        parts = [self.example(i) for i in indices]
        longest = max((p[0].shape[0] for p in parts), default=0)
        length = longest if length is None else length
        if longest > length and not truncate:
            raise TeacherCacheError(f"an example has {longest} cached tokens, more than length={length}; pass "
                                    "truncate=True to cut it")
        ids = torch.full((len(parts), length, self.k), -1, dtype=torch.int32)
        logprobs = torch.full((len(parts), length, self.k), -math.inf, dtype=self.dtype)
        mask = torch.zeros(len(parts), length, dtype=torch.bool)
        for row, (pid, plp) in enumerate(parts):
            n = min(pid.shape[0], length)
            cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
            ids[row, cols], logprobs[row, cols], mask[row, cols] = pid[:n], plp[:n], True
        return TopKBatch(ids, logprobs, mask)

    def iter_batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                     drop_last: bool = False) -> Iterator[tuple[list[int], TopKBatch]]:
        """(example indices, their TopKBatch) over the whole cache, shuffled by example index with `seed`."""
        order = list(range(len(self)))
        if shuffle:
            random.Random(seed).shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield chunk, self.batch(chunk)


def bytes_per_token(path: str) -> float:
    """Bytes of the shard files per cached token (the index excluded)."""
    index = load_index(path)
    size = sum(os.path.getsize(os.path.join(path, s["file"])) for s in index["shards"])
    return size / max(index["num_tokens"], 1)
