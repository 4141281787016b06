"""Run systemd-nspawn from a cgroup of our own, bounded in time.

PID 1 of the host is not systemd: nspawn (``--keep-unit``) uses the cgroup it starts in and
adds ``payload/`` and ``supervisor/`` under it. Each run gets its own cgroup, in the
``name=systemd`` and the unified hierarchy, removed afterwards.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger(__name__)

CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
NSPAWN = ["systemd-nspawn", "--register=no", "--keep-unit", "--private-network", "--quiet"]
KILL_GRACE = 15.0


@dataclass
class Outcome:
    returncode: int | None  # None: killed after the timeout
    seconds: float
    log: str


def _cgroups(name: str) -> list[Path]:
    return [root / name for root in CGROUP_ROOTS if root.is_dir()]


def _enter(cgroups: list[Path]) -> None:
    for cg in cgroups:
        (cg / "cgroup.procs").write_text("0\n")


def _remove(cgroups: list[Path]) -> None:
    for cg in cgroups:
        for child in sorted(cg.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            try:
                child.rmdir()
            except OSError as e:
                LOG.warning("cannot remove cgroup %s: %s", child, e)


def stop(child: subprocess.Popen[bytes]) -> None:
    """End a child still running: SIGTERM, then SIGKILL after KILL_GRACE."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def nspawn(tree: Path, cgroup_name: str, options: Sequence[str], argv: Sequence[str],
           timeout: float, log: Path, environ: dict[str, str] | None = None) -> Outcome:
    """Run nspawn on ``tree``; past ``timeout`` it is stopped (SIGTERM, then SIGKILL)."""
    cgroups = _cgroups(cgroup_name)
    for cg in cgroups:
        cg.mkdir()
    env = {**os.environ, **(environ or {})}
    start = time.monotonic()
    try:
        with open(log, "w") as out:
            child = subprocess.Popen([*NSPAWN, "-D", str(tree), *options, *argv],
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=lambda: _enter(cgroups))
            try:
                rc: int | None = child.wait(timeout)
            except subprocess.TimeoutExpired:
                LOG.error("%s: no end after %.0f s, stopping it", tree, timeout)
                stop(child)
                rc = None
    finally:
        _remove(cgroups)
    return Outcome(rc, time.monotonic() - start, log.read_text(errors="replace"))


def run_in(tree: Path, cgroup_name: str, options: Sequence[str], argv: Sequence[str],
           timeout: float = 300) -> str:
    """Run one command in the tree (no boot); fail on a non-zero exit, else return its
    output."""
    log = tree.parent / f"{cgroup_name}.log"
    # A machine name of its own: the default, the directory's name, is the same for every
    # root's prepared tree, and nspawn keeps per-machine state under /run/systemd/nspawn.
    outcome = nspawn(tree, cgroup_name, ["--console=pipe", f"--machine={cgroup_name}",
                                         *options], argv, timeout, log)
    if outcome.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} in {tree} failed:\n{outcome.log}")
    return outcome.log


def boot(tree: Path, cgroup_name: str, options: Sequence[str], timeout: float, log: Path,
         unified: bool = False) -> Outcome:
    """Boot the tree with systemd as PID 1 until it powers off (or the timeout)."""
    env = {"SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"} if unified else {}
    return nspawn(tree, cgroup_name, ["--boot", "--console=pipe", *options], [], timeout,
                  log, env)
