"""Reading JSONL files of agent trajectories: `load_trajectories` and its report of skipped lines.

The representation (`Trajectory`, `Step`, `ToolCall`, `TrajectoryError`) lives in trajectory.py and
the record parsers (`parse_trajectory`, `detect_format`, `FORMATS`) in formats.py; both are
re-exported here, where they were defined before.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from .formats import FORMATS, detect_format, parse_trajectory
from .trajectory import Step, ToolCall, Trajectory, TrajectoryError

__all__ = ["Trajectory", "Step", "ToolCall", "TrajectoryError", "FORMATS", "detect_format", "parse_trajectory",
           "LoadReport", "TrajectoryList", "load_trajectories"]

logger = logging.getLogger("distillkit.data")


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: int = 0
    errors: list[TrajectoryError] = field(default_factory=list)


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


def load_trajectories(path: Union[str, Path], errors: Literal["raise", "skip"] = "raise", *,
                      format: Optional[str] = None) -> TrajectoryList:
    """Read a JSONL file of trajectories (blank lines are ignored).

    errors="raise": the first malformed line raises TrajectoryError (with .line and .field).
    errors="skip": malformed lines are left out, counted in `.report.skipped` (their errors in
    `.report.errors`) and one warning is logged on the "distillkit.data" logger.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    report = LoadReport(str(path))
    items = []
    with open(path, "rb") as handle:  # bytes, so that one badly encoded line is one bad record
        for number, raw in enumerate(handle, start=1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise TrajectoryError(f"not valid UTF-8 ({exc.reason})", line=number) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrajectoryError(f"not valid JSON ({exc.msg} at column {exc.colno})",
                                          field="(record)", line=number) from None
                items.append(parse_trajectory(record, line=number, format=format))
            except TrajectoryError as exc:
                if errors == "raise":
                    raise
                report.skipped += 1
                report.errors.append(exc)
    report.loaded = len(items)
    if report.skipped:
        logger.warning("%s: skipped %d malformed line(s) of %d records; first: %s", path, report.skipped,
                       report.skipped + report.loaded, report.errors[0])
    return TrajectoryList(items, report)
