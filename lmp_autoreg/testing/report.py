"""The accounting of a rehearsed factory line: what ``summary.json`` says, and whether the
line passed. Pure functions of what the line recorded.

A line passes when every board ended with exactly one identity and the result the chaos
predicts: every device registered, except that in a partially detached factory a device
whose answer was lost (by ``lost-answer``, or by a restart that cut it off) is an operator
case (the devices API answers its retry 409: docs/reliability.md); no duplicate; no
ghost; every orphan certificate explained by a lost answer; and every board reporting the
serial the line gave it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmp_autoreg.testing.record import Row

# The seconds before a restart in which a signed answer may have been cut off by it: the
# longest the kit's server waits for its handlers when it stops (server._JOIN_TIMEOUT),
# and one more.
RESTART_WINDOW = 6.0
# An operator's remedy when the agent's result names none, by exit code (docs/spec.md 6).
REMEDIES = {
    2: "fix the device's settings the agent names, then run the agent again",
    3: "the board is registered already: check that this is the identity the record "
    "expects; register again only with --force",
    4: "the server refused the registration: read its reason, fix the factory's side, then "
    "run the agent again on the board",
    5: "the server did not answer: check it and the network, then run the agent again "
    "(it resumes with the identity it kept)",
}
OTHER_REMEDY = "read the agent's log for the board, fix what it names, run the agent again"


@dataclass(frozen=True)
class Issued:
    """One certificate the kit's server signed and put in an answer: the uuid, the
    certificate's fingerprint, seconds into the line, and whether the answer was dropped
    on purpose (``lost-answer``)."""

    uuid: str
    fingerprint: str
    time: float
    lost: bool = False


@dataclass(frozen=True)
class Board:
    """What the line knows of one station's board: the serial it gave the board, the
    fingerprint of the certificate installed on it (None: none), and the operator's
    ``why`` and ``remedy`` when the agent did not register it."""

    serial: str
    installed: str | None
    why: str | None = None
    remedy: str | None = None


def operator_case(result: Mapping[str, Any], exit_code: int, stderr: str) -> tuple[str, str]:
    """Why a device needs an operator, and the remedy: the agent's, when its JSON error
    carries one (``error.remedy.text``), else one by exit code."""
    error = result.get("error")
    why: str | None = None
    remedy: str | None = None
    if isinstance(error, Mapping):
        why = _text(error.get("message"))
        given = error.get("remedy")
        remedy = _text(given.get("text")) if isinstance(given, Mapping) else _text(given)
    else:
        why = _text(error)
    if why is None:
        lines = [line for line in stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit {exit_code} without a message"
    return why, remedy or REMEDIES.get(exit_code, OTHER_REMEDY)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (None for none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def duplicates(rows: Sequence[Row], boards: Mapping[int, Board]) -> list[dict[str, Any]]:
    """A board with two identities, and a uuid installed on two boards or with two
    certificates."""
    found: list[dict[str, Any]] = []
    by_board: dict[str, set[str]] = defaultdict(set)
    by_uuid: dict[str, list[Row]] = defaultdict(list)
    for entry in rows:
        board = boards.get(entry["station"])
        serial = entry["board_serial"] or (board.serial if board else None)
        if entry["uuid"] and serial:
            by_board[serial].add(entry["uuid"])
        if entry["uuid"] and board is not None and board.installed:
            by_uuid[entry["uuid"]].append(entry)
    for serial, uuids in sorted(by_board.items()):
        if len(uuids) > 1:
            found.append({"kind": "board", "board_serial": serial, "uuids": sorted(uuids)})
    for uuid, entries in sorted(by_uuid.items()):
        certificates = {boards[e["station"]].installed for e in entries}
        if len(entries) > 1 or len(certificates) > 1:
            found.append({
                "kind": "uuid", "uuid": uuid,
                "board_serials": sorted(str(boards[e["station"]].serial) for e in entries),
                "certificates": len(certificates),
            })
    return found


def lost_uuids(issued: Sequence[Issued], restarts: Sequence[float]) -> set[str]:
    """The uuids whose answer the chaos may have lost: a ``lost-answer``, or an answer
    signed just before a restart."""
    return {
        i.uuid for i in issued
        if i.lost or any(r - RESTART_WINDOW <= i.time <= r for r in restarts)
    }


def orphans(
    issued: Sequence[Issued], boards: Mapping[int, Board], explained: set[str]
) -> list[dict[str, Any]]:
    """Certificates the server issued that no board installed; ``why`` says which lost
    answer explains each (None: nothing does)."""
    installed = {b.installed for b in boards.values() if b.installed}
    return [
        {"uuid": i.uuid, "fingerprint": i.fingerprint, "issued_at": round(i.time, 3),
         "why": ("lost-answer" if i.lost else "restart") if i.uuid in explained else None}
        for i in issued if i.fingerprint not in installed
    ]


def ghosts(rows: Sequence[Row], api_devices: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Devices the devices API holds with no board of the line behind them."""
    held = {entry["uuid"] for entry in rows if entry["uuid"]}
    return [
        {"uuid": d.get("uuid"), "name": d.get("name"), "group": d.get("group")}
        for d in api_devices if d.get("uuid") not in held
    ]


def summarize(
    rows: Sequence[Row],
    boards: Mapping[int, Board],
    *,
    issued: Sequence[Issued],
    api_devices: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    partially_detached: bool,
    wall_seconds: float,
    checked_in: bool = False,
) -> dict[str, Any]:
    """``summary.json``: the accounting, and ``passed`` with the ``problems`` that failed
    the line (``checked_in``: every registered device was to get configuration files at
    its check-in)."""
    restarts = [float(e["time"]) for e in events if e.get("kind") == "restart"]
    orphaned = orphans(issued, boards, lost_uuids(issued, restarts))
    registered = [e for e in rows if e["exit_code"] == 0 and boards[e["station"]].installed]
    operator = [
        {"uuid": e["uuid"], "board_serial": e["board_serial"] or boards[e["station"]].serial,
         "why": boards[e["station"]].why, "remedy": boards[e["station"]].remedy}
        for e in rows if e["exit_code"] != 0
    ]
    summary: dict[str, Any] = {
        "devices": len(rows),
        "registered": len(registered),
        "refused": sum(1 for e in rows if e["exit_code"] == 4),
        "operator": operator,
        "duplicates": duplicates(rows, boards),
        "orphan_certificates": orphaned,
        "ghosts": ghosts(rows, api_devices),
    }
    seconds = [float(e["seconds"]) for e in rows]
    summary.update(
        p50_seconds=percentile(seconds, 0.50),
        p95_seconds=percentile(seconds, 0.95),
        max_seconds=max(seconds) if seconds else None,
        devices_per_minute=round(len(rows) * 60 / wall_seconds, 2) if wall_seconds > 0 else None,
        wall_seconds=round(wall_seconds, 3),
        chaos=list(events),
    )
    problems = verdict(rows, boards, summary, {o["uuid"] for o in orphaned if o["why"]},
                       {i.uuid for i in issued if i.lost}, partially_detached)
    problems += [f"station {e['station']} (uuid {e['uuid']}): registered, but no configuration "
                 "arrived at its check-in" for e in registered
                 if checked_in and not e["config_files"]]
    summary.update(passed=not problems, problems=problems)
    return summary


def verdict(
    rows: Sequence[Row],
    boards: Mapping[int, Board],
    summary: Mapping[str, Any],
    lost: set[str],
    dropped: set[str],
    partially_detached: bool,
) -> list[str]:
    """What keeps the line from passing (empty: it passed). ``lost``: the uuids whose
    answer was lost (an explained orphan certificate); ``dropped``: those whose answer
    ``lost-answer`` dropped on purpose."""
    problems: list[str] = []
    for entry in rows:
        board = boards[entry["station"]]
        where = f"station {entry['station']} (board {board.serial}, uuid {entry['uuid']})"
        if entry["exit_code"] == 0 and not board.installed:
            problems.append(f"{where}: exit 0, but no certificate is installed")
        elif entry["exit_code"] != 0 and not (partially_detached and entry["uuid"] in lost):
            problems.append(f"{where}: exit {entry['exit_code']} ({board.why})")
        elif entry["exit_code"] == 0 and partially_detached and entry["uuid"] in dropped:
            problems.append(f"{where}: registered, though the devices API held its uuid")
        if entry["board_serial"] is not None and entry["board_serial"] != board.serial:
            problems.append(f"{where}: the agent reported board {entry['board_serial']}")
    for case in summary["operator"]:
        if not case["remedy"]:
            problems.append(f"operator case {case['uuid']} without a remedy")
    problems += [f"duplicate: {d}" for d in summary["duplicates"]]
    problems += [f"ghost: {g['uuid']}" for g in summary["ghosts"]]
    problems += [f"orphan certificate of {o['uuid']} that no lost answer explains"
                 for o in summary["orphan_certificates"] if o["why"] is None]
    return problems
