"""An on-disk cache of a teacher's top-k log-probabilities per token, for offline (sparse) distillation.

    write_teacher_cache("cache/", teacher, examples, k=64)          # once, with the teacher
    cache = TeacherCache("cache/")                                  # then, in training
    batch = cache.batch(example_indices, length=input_ids.shape[1])
    loss = distill_loss_topk(student_logits, batch.ids, batch.logprobs, labels, tail="bucket")

Layout of the folder: safetensors shards plus ``index.json`` (parsed with `json`; nothing is pickled):

    index.json    {"format", "version", "k", "vocab_size", "logprob_dtype", "id_bits", "logprob_bits",
                   "temperature", "num_examples", "num_tokens", "seq_lengths": [...],
                   "shards": [{"file", "sha256", "num_examples", "num_tokens", "first_example"}, ...],
                   "complete": true}
    shard-00000.safetensors   "topk" int32 [tokens, K] (packed, below), "seq_lengths" int64 [examples]

Whole examples, in dataset order, are concatenated in the shards; position i of an example holds the
teacher's distribution at input position i (its next-token prediction there), aligned like the logits.

Packing: 4 bytes per (token, k) entry, so 4 K bytes per token (+ the seq_lengths and a safetensors
header per shard). Each int32 word holds the id in its high ``id_bits`` bits and, in its low
``logprob_bits`` bits, the fp16/bf16 bit pattern of -logprob. Log-probabilities are <= 0, so the sign bit
is implied and 15 bits keep the value exactly: lossless up to 2**17 = 131072 ids. Larger vocabularies
round away 15 - logprob_bits low mantissa bits (one bit up to 2**18 ids).

The index is rewritten after every shard with "complete": false, and with "complete": true (its last
key) only once every shard is on disk; files are written to a temporary name and renamed. A reader
checks index.json field by field on open (types, ranges, dtypes, plain shard file names that exist,
counts that add up; `TeacherCacheError` naming the file and field), refuses an incomplete cache, and
checks each shard when it first reads it (sha256, tensors, metadata; naming the shard file and tensor).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from .cache_format import (FORMAT, INDEX_FILE, LOGPROB_DTYPES, VERSION, TeacherCacheError,  # noqa: F401
                           load_index, pack, packing_bits, show_value, unpack)


class TopKBatch(NamedTuple):
    ids: torch.Tensor  # [B, L, K] int32; -1 at padding (distill_loss_topk: no teacher signal there)
    logprobs: torch.Tensor  # [B, L, K] fp16/bf16; -inf at padding
    mask: torch.Tensor  # [B, L] bool, True at the cached (real) positions


# -- writing ---------------------------------------------------------------------------------------

def _as_ids(example) -> list[int]:
    if isinstance(example, dict):
        example = example["input_ids"]
    if isinstance(example, torch.Tensor):
        return [int(x) for x in example.reshape(-1).tolist()]
    return [int(x) for x in example]


def _teacher_logits(teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits from a callable batch -> logits, or from a Hugging Face causal LM."""
    if isinstance(teacher, torch.nn.Module) and hasattr(teacher, "config"):
        out = teacher(input_ids=input_ids, attention_mask=attention_mask)
    else:
        out = teacher({"input_ids": input_ids, "attention_mask": attention_mask})
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise TeacherCacheError(f"the teacher must return logits [B, L, V] for input_ids {tuple(input_ids.shape)}; "
                                f"got {getattr(logits, 'shape', type(logits).__name__)}")
    return logits


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_index(folder: str, index: dict) -> None:
    _atomic_write(os.path.join(folder, INDEX_FILE), json.dumps(index, indent=1).encode())


def write_teacher_cache(
    path: str,
    teacher: Union[Callable, torch.nn.Module],
    examples: Iterable,
    *,
    k: int,
    dtype: str = "float16",
    temperature: float = 1.0,
    batch_size: int = 8,
    tokens_per_shard: int = 2**20,
    pad_token_id: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    overwrite: bool = False,
) -> dict:
    """Run `teacher` over `examples` and store its top-k log-probabilities per token; returns the index.

    teacher: a callable {"input_ids", "attention_mask"} ([B, L] int64, right-padded) -> logits [B, L, V]
        (or an object with .logits), or a Hugging Face causal LM (called as teacher(input_ids=...,
        attention_mask=...)). examples: sequences of token ids, 1-D tensors or dicts with "input_ids".
    dtype: "float16" | "bfloat16" log-probabilities; temperature: log_softmax(logits / temperature) is
        stored, and recorded in the index (pass it as distill_loss_topk's teacher_temperature).
    """
    if dtype not in LOGPROB_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(LOGPROB_DTYPES)}; got {dtype!r}")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be an int >= 1; got {k!r}")
    from safetensors.torch import save

    os.makedirs(path, exist_ok=True)
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        if not overwrite:
            raise FileExistsError(f"{index_path} exists; pass overwrite=True to replace the cache")
        os.remove(index_path)  # first, so that a half-written replacement is never taken for the old cache
    torch_dtype = LOGPROB_DTYPES[dtype]
    index = {"format": FORMAT, "version": VERSION, "k": k, "vocab_size": None, "logprob_dtype": dtype,
             "id_bits": None, "logprob_bits": None, "temperature": float(temperature), "num_examples": 0,
             "num_tokens": 0, "seq_lengths": [], "shards": [], "complete": False}
    _write_index(path, index)
    pending: list[torch.Tensor] = []  # packed [L, K] per example of the shard being filled
    pending_lengths: list[int] = []

    def flush() -> None:
        if not pending_lengths:
            return
        topk = torch.cat(pending) if pending else torch.zeros(0, k, dtype=torch.int32)
        tensors = {"topk": topk.contiguous(), "seq_lengths": torch.tensor(pending_lengths, dtype=torch.int64)}
        first = index["num_examples"] - len(pending_lengths)
        data = save(tensors, metadata={"format": FORMAT, "k": str(k), "first_example": str(first)})
        name = f"shard-{len(index['shards']):05d}.safetensors"
        _atomic_write(os.path.join(path, name), data)
        index["shards"].append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                "num_examples": len(pending_lengths), "num_tokens": int(topk.shape[0]),
                                "first_example": first})
        _write_index(path, index)
        pending.clear()
        pending_lengths.clear()

    def run(batch: list[list[int]]) -> None:
        length = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), max(length, 1)), pad_token_id, dtype=torch.int64)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
            mask[row, :len(ids)] = 1
        if device is not None:
            input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = _teacher_logits(teacher, input_ids, mask)
            vocab = logits.shape[-1]
            if index["vocab_size"] is None:
                if k > vocab:
                    raise ValueError(f"k={k} is larger than the teacher's vocabulary ({vocab})")
                index["vocab_size"] = vocab
                index["id_bits"], index["logprob_bits"] = packing_bits(vocab)
            elif vocab != index["vocab_size"]:
                raise TeacherCacheError(f"the teacher returned {vocab} logits, earlier batches {index['vocab_size']}")
            logprobs, ids = torch.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
            packed = pack(ids, logprobs, vocab, torch_dtype).cpu()
        for row, seq in enumerate(batch):
            pending.append(packed[row, :len(seq)])
            pending_lengths.append(len(seq))
            index["seq_lengths"].append(len(seq))
            index["num_examples"] += 1
            index["num_tokens"] += len(seq)
        if sum(pending_lengths) >= tokens_per_shard:
            flush()

    batch: list[list[int]] = []
    for example in examples:
        batch.append(_as_ids(example))
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    flush()
    if index["vocab_size"] is None:
        raise ValueError("examples is empty: nothing to cache")
    del index["complete"]
    index["complete"] = True  # the last key, in the last write
    _write_index(path, index)
    return index


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
        self._open[s] = topk
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return topk

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [L, K] int32, logprobs [L, K]) of example i."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range for a cache of {len(self)} examples")
        s, offset = self._where[i]
        words = self._shard(s)[offset:offset + self.seq_lengths[i]]
        return unpack(words, self.vocab_size, self.dtype)

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
