"""The on-disk format of a teacher cache (teacher_cache.py): its constants, the packing of (id,
log-probability) pairs into int32 words, and the field-by-field check of index.json.

Every check raises `TeacherCacheError` naming the file and the field, e.g.
``cache/index.json: field 'shards[1].num_tokens': must be an int >= 0, got '12'``.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import torch

__all__ = ["FORMAT", "VERSION", "VERSIONS", "MODES", "INDEX_FILE", "LOGPROB_DTYPES", "MAX_VOCAB", "MAX_SEED",
           "TeacherCacheError", "packing_bits", "pack", "unpack", "index_version", "load_index", "show_value"]

FORMAT = "distillkit-teacher-cache"
VERSION = 2  # the newest format version; VERSIONS: those this reader knows
VERSIONS = (1, 2)
INDEX_FILE = "index.json"
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("topk", "sample")  # the teacher's top-k / k draws from it (the empirical distribution)
MAX_SEED = 2**63 - 1


class TeacherCacheError(ValueError):
    """A teacher cache that is incomplete, corrupt or does not match what it is read for."""


# -- packing ---------------------------------------------------------------------------------------

def packing_bits(vocab_size: int) -> tuple[int, int]:
    """(id_bits, logprob_bits) of the 32-bit word for a vocabulary of vocab_size ids."""
    id_bits = max(1, (vocab_size - 1).bit_length())
    logprob_bits = min(15, 32 - id_bits)
    if logprob_bits < 8:
        raise TeacherCacheError(f"vocabulary of {vocab_size} ids is too large to pack (at most 2**24 ids)")
    return id_bits, logprob_bits


def pack(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 words from ids [..., K] (0 <= id < vocab_size) and logprobs [..., K] (<= 0, may be -inf)."""
    _, lp_bits = packing_bits(vocab_size)
    shift = 15 - lp_bits
    neg = (-logprobs.float()).clamp_min(0.0).to(dtype)  # >= 0: the sign bit is always 0
    bits = neg.view(torch.int16).to(torch.int64) & 0x7FFF
    if shift:
        bits = ((bits + (1 << (shift - 1))) >> shift).clamp_max((1 << lp_bits) - 1)
    word = (ids.to(torch.int64) << lp_bits) | bits
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack(words: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32, logprobs dtype) from packed int32 words."""
    _, lp_bits = packing_bits(vocab_size)
    w = words.to(torch.int64) & 0xFFFFFFFF
    ids = (w >> lp_bits).to(torch.int32)
    bits = ((w & ((1 << lp_bits) - 1)) << (15 - lp_bits)).to(torch.int16)
    return ids, -bits.view(dtype)


def index_version(mode: str) -> int:
    """The version a writer records: the oldest one that describes the cache. Version 1 readers know neither
    "mode" nor absent entries (-inf entries, read as id -1), so only a top-k cache stays version 1 and any
    older reader still reads it; a sampled cache (version 2) is refused by them instead of misread."""
    return 1 if mode == "topk" else 2


# -- the index ---------------------------------------------------------------------------------------

MAX_VOCAB = 2**24  # the largest vocabulary the 32-bit word packs (packing_bits)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true must not pass for 1


def show_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_plain_file_name(name) -> bool:
    """A bare file name, so it cannot leave the cache folder: no separator, drive, '.' or '..'."""
    return isinstance(name, str) and name.strip(".") != "" and not any(c in name for c in "/\\:\0")


class _IndexChecker:
    """Field-by-field checks of index.json; every failure names the file and the field."""

    def __init__(self, index_path: str):
        self.index_path = index_path

    def fail(self, field: str, problem: str) -> TeacherCacheError:
        return TeacherCacheError(f"{self.index_path}: field '{field}': {problem}")

    def get(self, obj: dict, key: str, field: str):
        if key not in obj:
            raise self.fail(field, "is missing")
        return obj[key]

    def int(self, value, field: str, lo: int = 0, hi: Optional[int] = None, hi_label: str = "") -> int:
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            bound = f" and <= {hi}{hi_label}" if hi is not None else ""
            raise self.fail(field, f"must be an int >= {lo}{bound}, got {show_value(value)}")
        return value

    def list(self, value, field: str) -> list:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {show_value(value)}")
        return value


def _validate_header(index: dict, check: _IndexChecker, allow_incomplete: bool) -> Optional[int]:
    """The fields before the per-example lists; returns vocab_size (None: nothing written yet)."""
    if (fmt := check.get(index, "format", "format")) != FORMAT:
        raise check.fail("format", f"must be {FORMAT!r}, got {show_value(fmt)}")
    if not _is_int(version := check.get(index, "version", "version")) or version not in VERSIONS:
        raise check.fail("version", f"must be one of {list(VERSIONS)} (the format versions this reader knows), got "
                                    f"{show_value(version)}")
    complete = index.get("complete")
    if complete is not True and not (allow_incomplete and complete is False):
        raise check.fail("complete", f"the cache is incomplete (written halfway: \"complete\" is not true, got "
                                     f"{show_value(complete)}); write it again, or continue it with --resume")
    vocab = check.get(index, "vocab_size", "vocab_size")
    # null until the writer learns the vocabulary from the teacher's first batch (before any shard)
    if not (vocab is None and allow_incomplete and index.get("shards") == []):
        vocab = check.int(vocab, "vocab_size", 1, MAX_VOCAB)
    if vocab is None:
        check.int(check.get(index, "k", "k"), "k", 1)
    else:
        check.int(check.get(index, "k", "k"), "k", 1, vocab, " (vocab_size)")
    mode = index.get("mode", "topk")  # written before modes existed: a top-k cache
    if not isinstance(mode, str) or mode not in MODES:
        raise check.fail("mode", f"must be one of {list(MODES)}, got {show_value(mode)}")
    if version < index_version(mode):
        raise check.fail("version", f"must be >= {index_version(mode)} for mode {mode!r}, got {version}")
    seed = index.get("seed")
    if mode == "sample" or seed is not None:  # a top-k cache does not depend on a seed: null
        check.int(check.get(index, "seed", "seed"), "seed", 0, MAX_SEED)
    dtype = check.get(index, "logprob_dtype", "logprob_dtype")
    if not isinstance(dtype, str) or dtype not in LOGPROB_DTYPES:
        raise check.fail("logprob_dtype", f"must be one of {sorted(LOGPROB_DTYPES)}, got {show_value(dtype)}")
    for key, want in zip(("id_bits", "logprob_bits"), packing_bits(vocab) if vocab else (None, None)):
        if (not _is_int(got := check.get(index, key, key)) and want is not None) or got != want:
            raise check.fail(key, f"must be {show_value(want)} for vocab_size {vocab}, got {show_value(got)}")
    temperature = check.get(index, "temperature", "temperature")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise check.fail("temperature", f"must be a finite number > 0, got {show_value(temperature)}")
    if "world_size" in index:  # an unfinished write split across processes (cache_ranks.py)
        check.int(index["world_size"], "world_size", 1)
    return vocab


def _validate_index(index, index_path: str, folder: str, *, allow_incomplete: bool = False,
                    part: bool = False) -> None:
    """Check everything `write_teacher_cache` writes, so that a bad index fails here, not mid-training.
    allow_incomplete: an unfinished write ("complete": false), for resuming it. part: one process's part of
    a write split across processes, whose examples start at its "first_example"."""
    if not isinstance(index, dict):
        raise TeacherCacheError(f"{index_path}: the index must be a JSON object, got {type(index).__name__}")
    check = _IndexChecker(index_path)
    _validate_header(index, check, allow_incomplete)
    base = check.int(check.get(index, "first_example", "first_example"), "first_example") if part else 0
    lengths = check.list(check.get(index, "seq_lengths", "seq_lengths"), "seq_lengths")
    for i, n in enumerate(lengths):
        check.int(n, f"seq_lengths[{i}]")
    num_examples = check.int(check.get(index, "num_examples", "num_examples"), "num_examples")
    if num_examples != len(lengths):
        raise check.fail("num_examples", f"must equal the length of seq_lengths ({len(lengths)}), got {num_examples}")
    num_tokens = check.int(check.get(index, "num_tokens", "num_tokens"), "num_tokens")
    if num_tokens != sum(lengths):
        raise check.fail("num_tokens", f"must equal the sum of seq_lengths ({sum(lengths)}), got {num_tokens}")

    covered, files = 0, set()  # examples covered by the shards so far; shard file names seen
    for s, shard in enumerate(check.list(check.get(index, "shards", "shards"), "shards")):
        field = f"shards[{s}]"
        if not isinstance(shard, dict):
            raise check.fail(field, f"must be a JSON object (file, sha256, num_examples, num_tokens, first_example), "
                                    f"got {show_value(shard)}")
        name = check.get(shard, "file", f"{field}.file")
        if not _is_plain_file_name(name):
            raise check.fail(f"{field}.file", f"must be a plain file name inside the cache folder (no path "
                                              f"separators, '..' or absolute path), got {show_value(name)}")
        if name in files:
            raise check.fail(f"{field}.file", f"{name!r} is listed by an earlier shard too")
        files.add(name)
        if not os.path.isfile(os.path.join(folder, name)):
            raise check.fail(f"{field}.file", f"shard {name} is missing from {folder}")
        sha = check.get(shard, "sha256", f"{field}.sha256")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise check.fail(f"{field}.sha256", f"must be 64 lowercase hex digits, got {show_value(sha)}")
        first = check.int(check.get(shard, "first_example", f"{field}.first_example"), f"{field}.first_example")
        if first != base + covered:
            raise check.fail(f"{field}.first_example", f"must be {base + covered} (the examples of the shards before "
                                                       f"it), got {first}")
        count = check.int(check.get(shard, "num_examples", f"{field}.num_examples"), f"{field}.num_examples",
                          0, len(lengths) - covered, " (the examples left in seq_lengths)")
        tokens = check.int(check.get(shard, "num_tokens", f"{field}.num_tokens"), f"{field}.num_tokens")
        if tokens != (want := sum(lengths[covered:covered + count])):
            raise check.fail(f"{field}.num_tokens", f"must be {want} (the sum of seq_lengths[{covered}:"
                                                    f"{covered + count}]), got {tokens}")
        covered += count
    if covered != len(lengths):
        raise check.fail("shards", f"the shards cover {covered} examples, seq_lengths lists {len(lengths)}")


def load_index(path: str, *, allow_incomplete: bool = False, index_file: str = INDEX_FILE,
               part: bool = False) -> dict:
    """The validated index of the cache folder `path`; raises TeacherCacheError naming the file and field.
    allow_incomplete: accept an unfinished write (to resume it); index_file and part: read one process's
    part index of a write split across processes instead (cache_ranks.py)."""
    index_path = os.path.join(path, index_file)
    if not os.path.exists(index_path):
        raise TeacherCacheError(f"{path}: no {index_file}; not a teacher cache (or its writing never started)")
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except OSError as err:
        raise TeacherCacheError(f"{index_path}: cannot be read: {err}") from None
    except UnicodeDecodeError:
        raise TeacherCacheError(f"{index_path}: is not UTF-8 text, so not a JSON index") from None
    except (ValueError, RecursionError) as err:  # json.JSONDecodeError is a ValueError
        raise TeacherCacheError(f"{index_path}: is not valid JSON (truncated or corrupt?): {err}") from None
    _validate_index(index, index_path, path, allow_incomplete=allow_incomplete, part=part)
    return index


