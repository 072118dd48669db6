"""Already tokenized examples: JSONL of {"input_ids": [...], "labels": [...]} (plus optional "span_ids",
"attention_mask" and "id"), the plain datasets that `distillkit train` reads with `data.format: tokenized`.

Without span_ids, DistillationTrainer counts the labelled tokens as ANSWER spans (docs/TRAINER.md).
Every line is checked as the trajectory loader checks its lines (limits.py: depth, integer length,
surrogates) and then field by field; failures are TrajectoryError naming the file, line and field,
and errors="skip" leaves out exactly the bad lines, counted in `.report`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Optional, Union

from ..core.spans import NUM_SPANS, PAD_SPAN
from .schema import MAX_LINE_BYTES, LoadReport, TrajectoryList, read_json_lines
from .tokenize import IGNORE_INDEX
from .trajectory import TrajectoryError, UnknownKeyWarning

__all__ = ["TOKENIZED_KEYS", "load_tokenized", "check_tokenized"]

TOKENIZED_KEYS = ("input_ids", "labels", "span_ids", "attention_mask", "id")


def _int_list(record: dict, key: str, low: int, high: Optional[int], length: Optional[int], *,
              also: Optional[int] = None) -> list[int]:
    """record[key] as a list of ints in [low, high) (or equal to `also`), of `length` items."""
    values = record[key]
    if not isinstance(values, list):
        raise TrajectoryError(f"must be a list of integers, got {type(values).__name__}", field=key)
    if length is not None and len(values) != length:
        raise TrajectoryError(f"has {len(values)} items but input_ids has {length}", field=key)
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrajectoryError(f"must be an integer, got {type(value).__name__} {value!r}", field=f"{key}[{i}]")
        if value != also and not (low <= value and (high is None or value < high)):
            bound = f"[{low}, {high})" if high is not None else f">= {low}"
            extra = f" or {also}" if also is not None else ""
            raise TrajectoryError(f"must be in {bound}{extra}, got {value}", field=f"{key}[{i}]")
    return values


def check_tokenized(record, *, vocab_size: Optional[int] = None, ignore_index: int = IGNORE_INDEX,
                    unknown_keys: Literal["warn", "error"] = "warn") -> tuple[dict, list[str]]:
    """(the example, its unknown keys) for one decoded record; TrajectoryError (with field) if malformed."""
    if not isinstance(record, dict):
        raise TrajectoryError(f"must be a JSON object, got {type(record).__name__}", field="(record)")
    unknown = [key for key in record if key not in TOKENIZED_KEYS]
    if unknown and unknown_keys == "error":
        raise TrajectoryError(f"unknown key; known: {', '.join(TOKENIZED_KEYS)}", field=unknown[0])
    for key in ("input_ids", "labels"):
        if key not in record:
            raise TrajectoryError("is required", field=key)
    input_ids = _int_list(record, "input_ids", 0, vocab_size, None)
    if not input_ids:
        raise TrajectoryError("must not be empty", field="input_ids")
    length = len(input_ids)
    example = {"input_ids": input_ids,
               "labels": _int_list(record, "labels", 0, vocab_size, length, also=ignore_index)}
    if "span_ids" in record:
        example["span_ids"] = _int_list(record, "span_ids", 0, NUM_SPANS, length, also=PAD_SPAN)
    if "attention_mask" in record:
        example["attention_mask"] = _int_list(record, "attention_mask", 0, 2, length)
    return example, unknown


def load_tokenized(path: Union[str, Path], errors: Literal["raise", "skip"] = "raise", *,
                   vocab_size: Optional[int] = None, ignore_index: int = IGNORE_INDEX,
                   unknown_keys: Literal["warn", "error"] = "warn", max_line_bytes: int = MAX_LINE_BYTES
                   ) -> TrajectoryList:
    """Read a JSONL file of tokenized examples (blank lines are ignored); ids are checked against
    `vocab_size` when given. errors="raise": the first malformed line raises TrajectoryError; "skip":
    malformed lines are left out and counted in `.report`. Lines are read and checked as load_trajectories
    reads them (max_line_bytes, nesting depth, integer length, UTF-8, surrogates)."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if unknown_keys not in ("warn", "error"):
        raise ValueError(f"unknown_keys must be 'warn' or 'error', got {unknown_keys!r}")
    report = LoadReport(str(path))
    examples, first_seen = [], {}
    for number, record, error in read_json_lines(path, max_line_bytes):
        try:
            if error is not None:
                raise error
            example, unknown = check_tokenized(record, vocab_size=vocab_size, ignore_index=ignore_index,
                                               unknown_keys=unknown_keys)
        except TrajectoryError as exc:
            located = exc.located(line=number, path=str(path))
            if errors == "raise":
                raise located from None
            report.skipped += 1
            report.errors.append(located)
            continue
        for key in unknown:
            first_seen.setdefault(key, [number, 0])[1] += 1
            report.unknown_keys[key] = report.unknown_keys.get(key, 0) + 1
        examples.append(example)
    for key, (line, count) in first_seen.items():
        warnings.warn(f"{path}: unknown key {key!r} on {count} line(s) (first line {line}), ignored; known: "
                      f"{', '.join(TOKENIZED_KEYS)}", UnknownKeyWarning, stacklevel=2)
    report.loaded = len(examples)
    return TrajectoryList(examples, report)
