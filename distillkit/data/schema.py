"""Reading JSONL files of agent trajectories: `load_trajectories` and its report of skipped lines.

The representation (`Trajectory`, `Step`, `ToolCall`, `TrajectoryError`) lives in trajectory.py and
the record parsers (`parse_trajectory`, `detect_format`, `FORMATS`) in formats.py; both are
re-exported here, where they were defined before. Every way a line can be malformed (docs/DATA.md,
"Errors") is a TrajectoryError naming the file, the line and the field, so that errors="skip" can
leave out exactly that line.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

from .formats import FORMATS, UNKNOWN_KEY_MODES, UnknownKey, detect_format, parse_record, parse_trajectory
from .known_keys import unknown_key_warning
from .limits import MAX_DEPTH, JSONLimitError, loads_within_limits
from .trajectory import Step, ToolCall, Trajectory, TrajectoryError, UnknownKeyWarning

__all__ = ["Trajectory", "Step", "ToolCall", "TrajectoryError", "UnknownKeyWarning", "FORMATS", "detect_format",
           "parse_trajectory", "LoadReport", "TrajectoryList", "load_trajectories", "read_json_lines", "MAX_LINE_BYTES", "MAX_DEPTH"]

logger = logging.getLogger("distillkit.data")

MAX_LINE_BYTES = 16 * 1024 * 1024  # default of load_trajectories(max_line_bytes=...)
_DRAIN_CHUNK = 1024 * 1024  # the rest of an over-long line is read and dropped in pieces of this size
_JSON_WHITESPACE = " \t\r\n"
_TOO_LONG = object()


@dataclass
class LoadReport:
    """What load_trajectories did: lines loaded and skipped (with their errors, in file order) and the
    unknown keys met with unknown_keys="warn" (key path such as "stepz" or "messages[*].foo" -> lines)."""

    path: str
    loaded: int = 0
    skipped: int = 0
    errors: list[TrajectoryError] = field(default_factory=list)
    unknown_keys: dict[str, int] = field(default_factory=dict)


class TrajectoryList(list):
    """The loaded trajectories (a plain list) plus `.report`, and `.skipped` / `.errors` from it."""

    def __init__(self, items, report: LoadReport):
        super().__init__(items)
        self.report = report

    @property
    def skipped(self) -> int:
        return self.report.skipped

    @property
    def errors(self) -> list[TrajectoryError]:
        return self.report.errors


def _read_line(handle, limit: int):
    """The next line's bytes (b"" at the end of the file), or _TOO_LONG for a line of more than `limit`
    bytes before its newline; the rest of such a line is read in chunks and dropped, never held."""
    raw = handle.readline(limit + 1)
    if len(raw) <= limit or raw.endswith(b"\n"):
        return raw
    while True:
        chunk = handle.readline(_DRAIN_CHUNK)
        if not chunk or chunk.endswith(b"\n"):
            return _TOO_LONG


def _decode_line(raw: bytes, first: bool) -> str:
    """The line without its newline (a JSON error at its end is then placed on it), sliced without a copy."""
    end = len(raw) - 1 if raw.endswith(b"\n") else len(raw)
    try:  # a UTF-8 byte order mark is allowed at the start of the file
        return str(memoryview(raw)[:end], "utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise TrajectoryError(f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})",
                              field="(record)") from None


def read_json_lines(path: Union[str, Path], max_line_bytes: int = MAX_LINE_BYTES, *, check_strings: bool = True
                    ) -> Iterator[tuple[int, Any, Optional[TrajectoryError]]]:
    """(line number, decoded value, None) per non-blank line of a JSONL file, or (line number, None, error)
    for a line that is too long, not UTF-8, not JSON or outside the limits of limits.py; the error has its
    field but not yet its line and path (the caller locates it, and raises or skips)."""
    with open(path, "rb") as handle:  # bytes, so that one badly encoded line is one bad record
        number = 0
        while (raw := _read_line(handle, max_line_bytes)) != b"":
            number += 1
            try:
                if raw is _TOO_LONG:
                    raise TrajectoryError(f"longer than max_line_bytes={max_line_bytes} bytes", field="(record)")
                text = _decode_line(raw, number == 1)
                raw = None  # hold one copy of a long line at a time
                if not text.strip(_JSON_WHITESPACE):
                    continue
                try:
                    record = loads_within_limits(text, check_strings=check_strings)
                except JSONLimitError as exc:
                    raise TrajectoryError(exc.reason, field=exc.path or "(record)") from None
                text = None
            except TrajectoryError as exc:
                yield number, None, exc
                continue
            yield number, record, None


def _check_options(errors: str, format: Optional[str], unknown_keys: str, max_line_bytes: int) -> None:
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    if unknown_keys not in UNKNOWN_KEY_MODES:
        raise ValueError(f"unknown_keys must be one of {UNKNOWN_KEY_MODES}, got {unknown_keys!r}")
    if isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int) or max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be a positive int, got {max_line_bytes!r}")


def load_trajectories(path: Union[str, Path], errors: Literal["raise", "skip"] = "raise", *,
                      format: Optional[str] = None, unknown_keys: Literal["warn", "error"] = "warn",
                      max_line_bytes: int = MAX_LINE_BYTES) -> TrajectoryList:
    """Read a JSONL file of trajectories (blank lines, of spaces, tabs and CRs only, are ignored).

    Any malformed line (invalid UTF-8 or JSON, longer than `max_line_bytes`, nested deeper than
    MAX_DEPTH, an integer over Python's digit limit, a lone surrogate, not an object, not a valid
    record) is a TrajectoryError with `.path`, `.line` and `.field`; nothing else escapes for any
    content of the file (a missing or unreadable file raises OSError).
    errors="raise": the first malformed line raises.
    errors="skip": malformed lines are left out, counted in `.report.skipped` (their errors in
    `.report.errors`) and one warning is logged on the "distillkit.data" logger.
    unknown_keys="warn": one UnknownKeyWarning per distinct unknown key (and level) in the file, with
    the number of lines and the first, also counted in `.report.unknown_keys`; "error": a line with
    an unknown key is malformed. A native step or tool call with an unknown key is always malformed.
    """
    _check_options(errors, format, unknown_keys, max_line_bytes)
    report = LoadReport(str(path))
    items = []
    first_seen: dict[str, tuple[UnknownKey, int]] = {}  # key path -> (the key, its first line)
    # parse_record checks the strings of the record, so the decoder need not
    for number, record, error in read_json_lines(path, max_line_bytes, check_strings=False):
        try:
            if error is not None:
                raise error
            trajectory, unknown = parse_record(record, format=format, unknown_keys=unknown_keys)
        except TrajectoryError as exc:
            located = exc.located(line=number, path=report.path)
            if errors == "raise":
                raise located from None
            report.skipped += 1
            report.errors.append(located)
            continue
        items.append(trajectory)
        for item in unknown:  # one entry per level and key of this record: counts are lines
            report.unknown_keys[item.path] = report.unknown_keys.get(item.path, 0) + 1
            first_seen.setdefault(item.path, (item, number))
    report.loaded = len(items)
    for key_path, count in report.unknown_keys.items():
        item, first = first_seen[key_path]
        lines = f" on {count} line{'s' if count != 1 else ''} (first line {first})"
        warnings.warn(unknown_key_warning(item, f"{report.path}: ", lines), stacklevel=2)
    if report.skipped:
        logger.warning("%s: skipped %d malformed line(s) of %d records; first: %s", path, report.skipped,
                       report.skipped + report.loaded, report.errors[0])
    return TrajectoryList(items, report)
