"""A rehearsed factory line: ``python -m lmp_autoreg.testing line``.

Runs ``devices`` simulated boards, ``parallel`` at a time, through one registration
server: the kit's own (over TLS, with its device gateway, in a process of its own:
:mod:`lmp_autoreg.testing.kitprocess`), or any other given by ``device_api``. Each board
is a :class:`~lmp_autoreg.testing.device.FakeDevice` root with a serial of its own in its
device tree, registered by a real agent process (``python -m lmp_autoreg --sysroot ROOT
--json``, ``PRODUCTION=1``); with the kit's gateway it then checks in as ``make demo``
does. The chaos of :mod:`lmp_autoreg.testing.chaos` strikes the kit's server as the line
runs. Afterwards the line writes into ``out``: the manufacturing record (``record.csv``,
``record.jsonl``: :mod:`lmp_autoreg.testing.record`), ``summary.json``
(:mod:`lmp_autoreg.testing.report`) and the pictures (``line.svg``, ``line.png``:
:mod:`lmp_autoreg.testing.plot`), and each board's agent output under ``devices/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lmp_autoreg.testing import chaos as chaoslib
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.fioconfig import CheckIn, Config, Fatal
from lmp_autoreg.testing.kitprocess import KitOptions, KitProcess, KitRun, fingerprint
from lmp_autoreg.testing.record import Row, row, write_csv, write_jsonl
from lmp_autoreg.testing.report import Board, operator_case, summarize

LOG = logging.getLogger(__name__)
KIT_FACTORY = "acme"
# Bounds a board's agent run (its --timeout) and its check-in retries.
AGENT_TIMEOUT = 120
CHECKIN_RETRIES = (1.0, 2.0, 5.0)


@dataclass(frozen=True)
class LineOptions:
    """The line's settings (``python -m lmp_autoreg.testing line --help``)."""

    out: Path
    devices: int = 50
    parallel: int = os.cpu_count() or 1
    device_api: str | None = None
    cacert: Path | None = None
    factory: str | None = None
    partially_detached: bool = False
    group: str | None = None
    config_dir: Path | None = None
    chaos: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class Station:
    """One board's run on the line."""

    station: int
    serial: str
    root: Path
    started: float = 0.0
    ended: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    exit_code: int = -1
    stderr: str = ""
    cpu_seconds: float = 0.0
    config_files: list[str] = field(default_factory=list)
    installed: str | None = None


def board_serial(seed: int, station: int) -> str:
    """The serial the line gives the board of ``station``: distinct within a line."""
    return f"LINE{seed:04d}-{station:05d}"


class Progress:
    """On a terminal, a bar redrawn in place; otherwise one line a device."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()

    def finished(self, station: Station) -> None:
        with self._lock:
            self.done += 1
            self.failed += station.exit_code != 0
            if self.tty:
                width = 40
                filled = width * self.done // self.total
                self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] "
                                  f"{self.done}/{self.total}, {self.failed} for an operator")
                if self.done == self.total:
                    self.stream.write("\n")
            else:
                self.stream.write(
                    f"{self.done}/{self.total} station {station.station} board "
                    f"{station.serial}: {station.result.get('result') or 'no result'} "
                    f"{station.result.get('uuid') or ''} (exit {station.exit_code}, "
                    f"{station.ended - station.started:.1f} s)\n")
            self.stream.flush()


class Line:
    """One run of the line; :meth:`run` returns the summary."""

    def __init__(self, options: LineOptions, progress: TextIO = sys.stdout) -> None:
        if options.device_api is not None and (options.chaos or options.partially_detached):
            raise ValueError("--chaos and --partially-detached act on the kit's own server: "
                             "not with --device-api")
        self.options = options
        self.factory = options.factory or KIT_FACTORY
        self.events = chaoslib.schedule(options.chaos, options.devices, options.seed)
        self.happened: list[dict[str, Any]] = []
        self.runs: list[KitRun] = []
        self.progress = Progress(options.devices, progress)
        self._lock = threading.Lock()
        self._kit: KitProcess | None = None
        self._started = 0.0

    # -- the kit's server and its chaos -------------------------------------------------

    def _kit_options(self, port: int = 0, gateway_port: int = 0) -> KitOptions:
        o = self.options
        return KitOptions(factory=self.factory, state_dir=o.out / "kit-state",
                          started=self._started, port=port, gateway_port=gateway_port,
                          partially_detached=o.partially_detached, group=o.group,
                          config_dir=o.config_dir)

    def _strike(self, station: int) -> None:
        """Set off the chaos events of the device now starting."""
        for event in (e for e in self.events if e.at == station):
            with self._lock:
                kit = self._kit
                assert kit is not None
                at = time.time() - self._started
                if event.kind == "restart":
                    self.runs.append(kit.stop())
                    self._kit = KitProcess(self._kit_options(kit.port, kit.gateway_port))
                elif event.kind == "lost-answer":
                    kit.fault({"lost": True})
                elif event.kind == "5xx":
                    kit.fault(*({"status": 503} for _ in range(event.count)))
                elif event.kind == "slow":
                    kit.fault(*({"delay": chaoslib.SLOW_SECONDS} for _ in range(event.count)))
                self.happened.append({**event.as_json(), "time": round(at, 3),
                                      "until": round(time.time() - self._started, 3)})
                LOG.info("chaos: %s at device %d", event.kind, station)

    # -- one board ----------------------------------------------------------------------

    def _board(self, station: int) -> Station:
        o = self.options
        serial = board_serial(o.seed, station)
        root = o.out / "devices" / f"{station:04d}"
        board = Station(station, serial, root)
        FakeDevice(root, factory=self.factory, token=None, hostname=f"board-{station}",
                   board_serial=serial).build()
        self._strike(station)
        kit = self._kit
        url = kit.url if kit is not None else o.device_api
        cacert = kit.ca_file if kit is not None else o.cacert
        argv = [sys.executable, "-m", "lmp_autoreg", "--sysroot", str(root), "--json",
                "--device-api", str(url), "--timeout", str(AGENT_TIMEOUT)]
        if cacert is not None:
            argv += ["--cacert", str(cacert)]
        if o.factory is not None:
            argv += ["--factory", o.factory]
        board.started = time.time() - self._started
        board.exit_code, board.cpu_seconds, stdout, board.stderr = run_agent(
            argv, root.with_suffix(".json"), root.with_suffix(".log"))
        try:
            parsed = json.loads(stdout)
        except ValueError:
            parsed = None
        board.result = parsed if isinstance(parsed, dict) else {}
        client = root / "var" / "sota" / "client.pem"
        if board.exit_code == 0 and client.is_file():
            board.installed = fingerprint(client.read_text(encoding="ascii"))
            if kit is not None:
                board.config_files = check_in(root)
        board.ended = time.time() - self._started
        self.progress.finished(board)
        return board

    # -- the line -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        o = self.options
        (o.out / "devices").mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        before = resource.getrusage(resource.RUSAGE_SELF)
        if o.device_api is None:
            self._kit = KitProcess(self._kit_options())
        try:
            # The check-ins' own log lines (fioconfig's, on stderr) go to a file.
            with open(o.out / "check-in.log", "w", encoding="utf-8") as log, \
                    contextlib.redirect_stderr(log), \
                    ThreadPoolExecutor(max_workers=max(1, o.parallel)) as pool:
                stations = list(pool.map(self._board, range(o.devices)))
        finally:
            if self._kit is not None:
                self.runs.append(self._kit.stop())
        wall = time.time() - self._started
        after = resource.getrusage(resource.RUSAGE_SELF)
        runner = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return self._account(stations, wall, runner)

    def _account(self, stations: list[Station], wall: float, runner: float) -> dict[str, Any]:
        o = self.options
        api_devices = [{**d, "group": group_name(d.get("group"))}
                       for d in (self.runs[-1].api_devices if self.runs else [])]
        groups = {d.get("uuid"): d["group"] for d in api_devices}
        rows: list[Row] = []
        boards: dict[int, Board] = {}
        for s in stations:
            rows.append(row(station=s.station, result=s.result, exit_code=s.exit_code,
                            stderr=s.stderr, seconds=s.ended - s.started,
                            group=groups.get(s.result.get("uuid")),
                            config_files=s.config_files))
            why, remedy = (None, None)
            if s.exit_code != 0:
                why, remedy = operator_case(s.result, s.exit_code, s.stderr)
            boards[s.station] = Board(s.serial, s.installed, why, remedy)
        summary = summarize(
            rows, boards, issued=[i for r in self.runs for i in r.issued],
            api_devices=api_devices, events=self.happened,
            partially_detached=o.partially_detached, wall_seconds=wall,
            checked_in=o.device_api is None)
        agents = sum(s.cpu_seconds for s in stations)
        kit = sum(r.cpu_seconds for r in self.runs)
        total = agents + kit + runner
        summary["cpu"] = {
            "agents_seconds": round(agents, 3),
            "agent_seconds_per_device": round(agents / len(stations), 3) if stations else None,
            "kit_server_seconds": round(kit, 3),
            "line_runner_seconds": round(runner, 3),
            "kit_server_share": round(kit / total, 4) if total > 0 else None,
        }
        summary["parallel"] = o.parallel
        summary["partially_detached"] = o.partially_detached
        write_csv(o.out / "record.csv", rows)
        write_jsonl(o.out / "record.jsonl", rows)
        with open(o.out / "summary.json", "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
        from lmp_autoreg.testing.plot import Span, draw

        draw([Span(s.station, s.started, s.ended, outcome(r, s.installed))
              for s, r in zip(stations, rows, strict=True)],
             self.happened, o.out / "line.svg", o.out / "line.png",
             title=f"{len(stations)} devices, --parallel {o.parallel}"
             + (f", --chaos {','.join(o.chaos)}" if o.chaos else "")
             + (", partially detached" if o.partially_detached else ""))
        return summary


def group_name(group: object) -> str | None:
    """A device's group as the devices API shows it (``{"name": G}``, or G)."""
    name = group.get("name") if isinstance(group, dict) else group
    return name if isinstance(name, str) else None


def outcome(entry: Row, installed: str | None) -> str:
    """A device's outcome in the pictures."""
    if entry["exit_code"] == 0 and installed:
        return "registered" if entry["attempts"] <= 1 else "registered after retries"
    return "operator case"


def run_agent(argv: list[str], stdout: Path, stderr: Path) -> tuple[int, float, str, str]:
    """Run one agent, its output into files; (exit code, CPU seconds, stdout, stderr)."""
    env = dict(os.environ, PRODUCTION="1")
    with open(stdout, "w+b") as out, open(stderr, "w+b") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (code, usage.ru_utime + usage.ru_stime,
                out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))


def check_in(root: Path) -> list[str]:
    """Check in with the kit's gateway as ``make demo`` does; the files that arrived."""
    secrets = root / "var" / "run" / "secrets"
    secrets.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        config = Config([str(root / "var" / "sota" / "sota.toml")], root=str(root))
        return sorted(CheckIn(config, str(secrets), retry_delays=CHECKIN_RETRIES).run())
    except (Fatal, OSError) as error:
        LOG.warning("board %s: check-in failed: %s", root.name, error)
        return []
