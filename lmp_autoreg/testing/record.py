"""The manufacturing record of a rehearsed factory line: one row a device.

:func:`row` builds a row from what the line saw of one device (pure); :func:`write_csv`
and :func:`write_jsonl` write the rows. The columns, in order, are :data:`COLUMNS`. In the
CSV a list (``config_files``) is its items joined by ``;`` and a missing value is empty;
in the JSONL it stays a list, and a missing value is ``null``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    "station",
    "board_serial",
    "uuid",
    "name",
    "group",
    "certificate_serial",
    "not_after",
    "exit_code",
    "result",
    "attempts",
    "seconds",
    "config_files",
)
# The agent's status line for each registration request it sends (attempt 1, 2, ...).
ATTEMPT_LINE = "sending the registration request to "

Row = dict[str, Any]


def attempts(stderr: str) -> int:
    """How many registration requests the agent sent, from its status lines."""
    return sum(1 for line in stderr.splitlines() if ATTEMPT_LINE in line)


def board_serial(result: Mapping[str, Any]) -> str | None:
    """The board's serial the agent reported in its result's ``board`` (None: none)."""
    board = result.get("board")
    serial = board.get("serial") if isinstance(board, Mapping) else None
    return serial if isinstance(serial, str) else None


def row(
    *,
    station: int,
    result: Mapping[str, Any],
    exit_code: int,
    stderr: str,
    seconds: float,
    group: str | None,
    config_files: Sequence[str],
) -> Row:
    """The record of one device, from the agent's JSON ``result`` and its stderr."""
    certificate = result.get("certificate")
    if not isinstance(certificate, Mapping):
        certificate = {}
    return {
        "station": station,
        "board_serial": board_serial(result),
        "uuid": result.get("uuid"),
        "name": result.get("name"),
        "group": group,
        "certificate_serial": certificate.get("serial"),
        "not_after": certificate.get("not_after"),
        "exit_code": exit_code,
        "result": result.get("result") if isinstance(result.get("result"), str) else "no result",
        "attempts": attempts(stderr),
        "seconds": round(seconds, 3),
        "config_files": sorted(config_files),
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(str(item) for item in value)
    return str(value)


def write_csv(path: Path, rows: Iterable[Row]) -> None:
    # A lone surrogate (JSON's "\ud800" in an agent's result) is written as its escape.
    with open(path, "w", encoding="utf-8", errors="backslashreplace", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for entry in rows:
            writer.writerow([_cell(entry[column]) for column in COLUMNS])


def write_jsonl(path: Path, rows: Iterable[Row]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for entry in rows:
            handle.write(json.dumps({column: entry[column] for column in COLUMNS}) + "\n")
