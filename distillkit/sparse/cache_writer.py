"""Writing a teacher cache: `write_teacher_cache` (the layout is described in teacher_cache.py, the
index checks are in cache_format.py, the "sample" mode in cache_sampling.py, the write split across
processes in cache_ranks.py).

Interrupted writes. The index is rewritten after every shard with "complete": false (files go to a
temporary name, then are renamed), so a write stopped at any point (Ctrl-C, kill -9) leaves an index
that lists only shards that are whole on disk. `resume=True` checks that the new write asks for the same
cache (k, mode, seed, temperature, dtype; the teacher's vocabulary; the length of every example already
written), skips those examples and writes the rest. Shards end after a whole batch, so the resumed
batches (of the same batch size) are the ones the uninterrupted run would have run: the result is the
same files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch

from . import cache_ranks as ranks
from .cache_format import (FORMAT, INDEX_FILE, LOGPROB_DTYPES, MAX_SEED, MODES, TeacherCacheError, index_version,
                           load_index, pack, packing_bits)
from .cache_sampling import example_generator, sample_empirical

__all__ = ["write_teacher_cache"]

_FAILED, _FRESH, _RESUME, _COMPLETE = range(4)  # what rank 0 found in the folder (a split write)


@dataclass(frozen=True)
class _Settings:
    """What defines a cache's content besides the teacher and the data: a resume must ask for the same."""

    k: int
    mode: str
    seed: Optional[int]  # None in "topk" mode, which draws nothing
    dtype: str
    temperature: float

    def fresh_index(self, **extra: Any) -> dict:
        """The index before any shard: `extra` ("first_example", "world_size") goes before the counts."""
        return {"format": FORMAT, "version": index_version(self.mode), "k": self.k, "vocab_size": None,
                "mode": self.mode, "seed": self.seed, "logprob_dtype": self.dtype, "id_bits": None,
                "logprob_bits": None, "temperature": self.temperature, **extra, "num_examples": 0, "num_tokens": 0,
                "seq_lengths": [], "shards": [], "complete": False}

    def check_same(self, index: dict, where: str) -> None:
        """A TeacherCacheError naming the first field in which the cache on disk differs from this write."""
        for key, want in (("k", self.k), ("mode", self.mode), ("seed", self.seed), ("logprob_dtype", self.dtype),
                          ("temperature", self.temperature)):
            got = index.get(key, "topk" if key == "mode" else None)
            if got != want:
                raise TeacherCacheError(f"{where}: field {key!r}: the cache was written with {got!r}, this write "
                                        f"asks for {want!r}: resume with the same {key}, or overwrite the cache")


@dataclass
class _Job:
    teacher: Any
    settings: _Settings
    batch_size: int
    tokens_per_shard: int
    pad_token_id: int
    device: Optional[Union[str, torch.device]]
    progress: Any


# -- the teacher ------------------------------------------------------------------------------------

def _as_ids(example) -> list[int]:
    if isinstance(example, dict):
        example = example["input_ids"]
    if isinstance(example, torch.Tensor):
        return [int(x) for x in example.reshape(-1).tolist()]
    return [int(x) for x in example]


def _length(example) -> int:
    if isinstance(example, dict):
        example = example["input_ids"]
    return example.numel() if isinstance(example, torch.Tensor) else len(example)


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


def _run_teacher(job: _Job, batch: list[list[int]], first_example: int, index: dict, where: str) -> list[torch.Tensor]:
    """Packed [L_i, K] int32 rows (CPU) of the examples of `batch`, the first being example `first_example`."""
    s = job.settings
    input_ids = torch.full((len(batch), max(1, max(len(x) for x in batch))), job.pad_token_id, dtype=torch.int64)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        mask[row, :len(ids)] = 1
    if job.device is not None:
        input_ids, mask = input_ids.to(job.device), mask.to(job.device)
    with torch.inference_mode():
        logits = _teacher_logits(job.teacher, input_ids, mask)
        vocab = logits.shape[-1]
        if index["vocab_size"] is None:
            if s.k > vocab:
                raise ValueError(f"k={s.k} is larger than the teacher's vocabulary ({vocab})")
            index["vocab_size"] = vocab
            index["id_bits"], index["logprob_bits"] = packing_bits(vocab)
        elif vocab != index["vocab_size"]:
            raise TeacherCacheError(f"{where}: field 'vocab_size': the teacher returns {vocab} logits per position, "
                                    f"the cache was written with {index['vocab_size']}")
        dtype = LOGPROB_DTYPES[s.dtype]
        if s.mode == "topk":
            logprobs, ids = torch.log_softmax(logits.float() / s.temperature, dim=-1).topk(s.k, dim=-1)
            packed = pack(ids, logprobs, vocab, dtype).cpu()
            return [packed[row, :len(seq)] for row, seq in enumerate(batch)]
        rows = []
        for row, seq in enumerate(batch):  # one generator per example: the batch does not matter
            generator = example_generator(s.seed, first_example + row, logits.device)
            ids, logprobs = sample_empirical(logits[row, :len(seq)], s.k, s.temperature, generator)
            rows.append(pack(ids, logprobs, vocab, dtype).cpu())
        return rows


# -- files ------------------------------------------------------------------------------------------

def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_index(folder: str, index: dict, index_file: str = INDEX_FILE) -> None:
    _atomic_write(os.path.join(folder, index_file), json.dumps(index, indent=1).encode())


def _remove_leftovers(folder: str, index: dict) -> None:
    """Remove the writer's files that the finished index does not list: part indexes, temporaries, shards
    of an interrupted or replaced write. Only the writer's own file names are ever touched."""
    keep = {INDEX_FILE, *(shard["file"] for shard in index["shards"])}
    for name in os.listdir(folder):
        if name not in keep and ranks.is_writer_file(name):
            os.remove(os.path.join(folder, name))


def _sorted_header(data: bytes) -> bytes:
    """The safetensors file `data` with its JSON header's keys sorted: safetensors writes the metadata in
    hash-map order, which varies from call to call; sorted, the same tensors give the same bytes (and
    sha256) in every run, so that a resumed cache equals an uninterrupted one file for file."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + size:]


class _Shards:
    """Whole examples, in order, into shards; the (part) index is rewritten after each shard."""

    def __init__(self, folder: str, index_file: str, index: dict, rank: Optional[int], tokens_per_shard: int):
        self.folder, self.index_file, self.index, self.rank = folder, index_file, index, rank
        self.tokens_per_shard = tokens_per_shard
        self.pending: list[torch.Tensor] = []  # packed [L, K] per example of the shard being filled

    def add(self, rows: list[torch.Tensor]) -> None:
        index = self.index
        for row in rows:
            self.pending.append(row)
            index["seq_lengths"].append(row.shape[0])
            index["num_examples"] += 1
            index["num_tokens"] += row.shape[0]
        if sum(row.shape[0] for row in self.pending) >= self.tokens_per_shard:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save

        if not self.pending:
            return
        index, k = self.index, self.index["k"]
        topk = torch.cat(self.pending)
        lengths = [row.shape[0] for row in self.pending]
        first = index.get("first_example", 0) + index["num_examples"] - len(lengths)
        tensors = {"topk": topk.contiguous(), "seq_lengths": torch.tensor(lengths, dtype=torch.int64)}
        data = _sorted_header(save(tensors, metadata={"format": FORMAT, "k": str(k), "first_example": str(first)}))
        name = ranks.shard_file(self.rank, len(index["shards"]))
        _atomic_write(os.path.join(self.folder, name), data)
        index["shards"].append({"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                                "num_examples": len(lengths), "num_tokens": int(topk.shape[0]),
                                "first_example": first})
        _write_index(self.folder, index, self.index_file)
        self.pending.clear()


# -- the write --------------------------------------------------------------------------------------

_END = object()  # the end of an iterator (examples may hold None)


def _check_written(examples: Iterable, index: dict, where: str, first: int) -> None:
    """Consume the examples `index` already holds from `examples`, checking their lengths."""
    for i, cached in enumerate(index["seq_lengths"]):
        example = next(examples, _END)
        if example is _END:
            raise TeacherCacheError(f"{where}: field 'num_examples': the cache holds {len(index['seq_lengths'])} "
                                    f"examples from example {first} on, the data has only {i}")
        if (n := _length(example)) != cached:
            raise TeacherCacheError(f"{where}: field 'seq_lengths[{i}]': example {first + i} has {n} tokens, the "
                                    f"cache holds {cached}: not the same data (or tokenizer, max_length)")


def _start_progress(progress, examples, lo: int, hi: Optional[int]) -> None:
    """A tqdm-like hook learns the number of tokens this call writes (and restarts its clock)."""
    if progress is None or not hasattr(progress, "reset"):
        return
    total = None
    if hasattr(examples, "__len__") and hasattr(examples, "__getitem__"):
        total = sum(_length(examples[i]) for i in range(lo, len(examples) if hi is None else hi))
    progress.reset(total=total)


def _write_part(folder: str, index_file: str, index: dict, examples, lo: int, hi: Optional[int], job: _Job,
                rank: Optional[int]) -> None:
    """Continue `index`, which holds examples[lo:lo + num_examples], up to examples[hi - 1] (hi None: all);
    then mark it complete."""
    where = os.path.join(folder, index_file)
    todo = itertools.islice(examples, lo, hi)
    _check_written(todo, index, where, lo)
    _start_progress(job.progress, examples, lo + index["num_examples"], hi)
    report = None if job.progress is None else getattr(job.progress, "update", job.progress)
    shards = _Shards(folder, index_file, index, rank, job.tokens_per_shard)
    next_example, batch = lo + index["num_examples"], []
    for example in itertools.chain(todo, [_END]):
        if example is not _END:
            batch.append(_as_ids(example))
        if batch and (len(batch) == job.batch_size or example is _END):
            shards.add(_run_teacher(job, batch, next_example, index, where))
            if report is not None:
                report(sum(len(ids) for ids in batch))
            next_example += len(batch)
            batch = []
    shards.flush()
    del index["complete"]
    index["complete"] = True  # the last key, in the last write
    _write_index(folder, index, index_file)


def _existing_cache(folder: str, job: _Job, overwrite: bool, resume: bool, world_size: int) -> Optional[dict]:
    """The index to continue or to check (resume), or None to start afresh; raises for a cache in the way."""
    index_path = os.path.join(folder, INDEX_FILE)
    if not os.path.exists(index_path):
        return None
    if overwrite:
        os.remove(index_path)  # first, so that a half-written replacement is never taken for the old cache
        return None
    if not resume:
        try:
            with open(index_path, "rb") as f:
                unfinished = json.loads(f.read()).get("complete") is False
        except (OSError, ValueError, AttributeError):
            unfinished = False
        if unfinished:
            raise FileExistsError(f"{index_path}: an unfinished cache (its write was interrupted) is in the way; "
                                  "pass resume=True (--resume) to continue it, or overwrite=True (--overwrite) to "
                                  "replace it")
        raise FileExistsError(f"{index_path} exists; pass overwrite=True (--overwrite) to replace the cache")
    index = load_index(folder, allow_incomplete=True)
    job.settings.check_same(index, index_path)
    if not index["complete"] and (got := index.get("world_size", 1)) != world_size:
        raise TeacherCacheError(f"{index_path}: field 'world_size': the interrupted write ran in {got} process(es), "
                                f"this one in {world_size}: resume it with as many (and the same batch size)")
    return index


def _check_complete(index: dict, examples, where: str) -> dict:
    """A resume of a finished cache writes nothing: it checks that the cache holds exactly these examples."""
    rest = iter(examples)
    _check_written(rest, index, where, 0)
    if next(rest, _END) is not _END:
        raise TeacherCacheError(f"{where}: field 'num_examples': the cache is complete with {index['num_examples']} "
                                "examples, the data has more")
    return index


def write_teacher_cache(
    path: str,
    teacher: Union[Callable, torch.nn.Module],
    examples: Iterable,
    *,
    k: int,
    mode: str = "topk",
    seed: int = 0,
    dtype: str = "float16",
    temperature: float = 1.0,
    batch_size: int = 8,
    tokens_per_shard: int = 2**20,
    pad_token_id: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: Any = None,
    distributed: bool = False,
) -> dict:
    """Run `teacher` over `examples` and store k log-probabilities per token; returns the index.

    teacher: a callable {"input_ids", "attention_mask"} ([B, L] int64, right-padded) -> logits [B, L, V]
        (or an object with .logits), or a Hugging Face causal LM (called as teacher(input_ids=...,
        attention_mask=...)). examples: sequences of token ids, 1-D tensors or dicts with "input_ids".
    mode: "topk": the teacher's k most likely ids; "sample": k draws from the teacher, stored as the
        empirical distribution (distinct ids, log(count / k); fewer than k distinct ids leave absent entries,
        read back as id -1), from a random stream that depends only on (seed, example index).
    dtype: "float16" | "bfloat16" log-probabilities; temperature: the teacher is softmax(logits / temperature),
        recorded in the index (pass it as distill_loss_topk's teacher_temperature).
    resume: continue an interrupted write (see the module docstring); on a complete cache, only check it.
        overwrite: replace an existing cache. Without either, an existing cache is an error.
    progress: called with the number of tokens of each batch written, or a tqdm-like object: .update(n),
        and .reset(total=tokens this call writes) first.
    distributed: under torch.distributed (torchrun), every rank passes the same examples, writes a
        contiguous range of them, and the ranks write one cache (cache_ranks.py); every rank returns its index.
    """
    if dtype not in LOGPROB_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(LOGPROB_DTYPES)}; got {dtype!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}; got {mode!r}")
    for name, value, lo, hi in (("k", k, 1, None), ("seed", seed, 0, MAX_SEED), ("batch_size", batch_size, 1, None),
                                ("tokens_per_shard", tokens_per_shard, 1, None)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)):
            raise ValueError(f"{name} must be an int >= {lo}{f' and <= {hi}' if hi else ''}; got {value!r}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                                             and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
    if overwrite and resume:
        raise ValueError("overwrite=True replaces the cache, resume=True continues it: pass one of them")
    settings = _Settings(k, mode, seed if mode == "sample" else None, dtype, float(temperature))
    job = _Job(teacher, settings, batch_size, tokens_per_shard, pad_token_id, device, progress)
    os.makedirs(path, exist_ok=True)
    if distributed and ranks.dist.is_available() and ranks.dist.is_initialized() and ranks.dist.get_world_size() > 1:
        return _write_split(path, examples, job, overwrite, resume)
    index = _existing_cache(path, job, overwrite, resume, world_size=1)
    if index is not None and index["complete"]:
        return _check_complete(index, examples, os.path.join(path, INDEX_FILE))
    if index is None:
        index = settings.fresh_index()
        _write_index(path, index)
    _write_part(path, INDEX_FILE, index, examples, 0, None, job, rank=None)
    if index["vocab_size"] is None:
        raise ValueError("examples is empty: nothing to cache")
    _remove_leftovers(path, index)
    return index


def _write_split(path: str, examples, job: _Job, overwrite: bool, resume: bool) -> dict:
    """write_teacher_cache on every rank of the default process group (see cache_ranks.py)."""
    rank, world = ranks.dist.get_rank(), ranks.dist.get_world_size()
    if not (hasattr(examples, "__len__") and hasattr(examples, "__getitem__")):
        examples = list(examples)
    lo, hi = ranks.rank_range(len(examples), job.batch_size, rank, world)
    index_path = os.path.join(path, INDEX_FILE)
    # 1. rank 0 checks the folder (and writes the unfinished index.json); the others wait for its verdict
    state, problem = _FAILED, None
    if rank == 0:
        try:
            index = _existing_cache(path, job, overwrite, resume, world)
            state = _FRESH if index is None else _COMPLETE if index["complete"] else _RESUME
            if state == _FRESH:
                _write_index(path, job.settings.fresh_index(world_size=world))
        except Exception as exc:  # re-raised below, once the other ranks know
            problem = exc
    state = ranks.broadcast_int(state)
    if state == _FAILED:
        raise problem or TeacherCacheError(f"{index_path}: rank 0 could not start the cache (see its error)")
    if state == _COMPLETE:
        return _check_complete(load_index(path), examples, index_path)
    # 2. every rank writes its part
    try:
        part_file = ranks.part_index_file(rank)
        part = None
        if state == _RESUME and os.path.exists(os.path.join(path, part_file)):
            part = load_index(path, allow_incomplete=True, index_file=part_file, part=True)
            where = os.path.join(path, part_file)
            job.settings.check_same(part, where)
            if part["first_example"] != lo:
                raise TeacherCacheError(f"{where}: field 'first_example': this rank's examples start at {lo}, the "
                                        f"interrupted write's at {part['first_example']}: resume with the same "
                                        "number of processes and batch size")
        if part is None:
            part = job.settings.fresh_index(first_example=lo)
            _write_index(path, part, part_file)
        if not part["complete"]:
            _write_part(path, part_file, part, examples, lo, hi, job, rank)
    except BaseException:  # Ctrl-C too: the other ranks must not wait for this one forever
        ranks.all_ranks_ok(False)
        raise
    if not ranks.all_ranks_ok(True):
        raise TeacherCacheError(f"{index_path}: another rank failed to write its part (see its error); the parts "
                                "written are kept: rerun with resume=True (--resume)")
    # 3. rank 0 writes the index of every part
    problem = None
    if rank == 0:
        try:
            index = ranks.merge_parts(path, load_index(path, allow_incomplete=True), world)
            if index["vocab_size"] is None:
                raise ValueError("examples is empty: nothing to cache")
            _write_index(path, index)
            load_index(path)  # what the readers will check
            _remove_leftovers(path, index)
        except Exception as exc:
            problem = exc
    if not ranks.all_ranks_ok(problem is None):
        raise problem or TeacherCacheError(f"{index_path}: rank 0 could not write the index (see its error)")
    return load_index(path)
