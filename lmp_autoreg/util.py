"""Small wrappers for the agent's main side effects: atomic file writes and commands.

Every file the agent installs or saves whole (the answer's files, the pending identity,
the install journal) is written by ``write_atomic``, and every command runs through
``run``. Smaller changes to the disk are made where they are needed: ``state``,
``install`` and ``backend_ldr`` create directories, remove files or set modes
themselves, and ``state`` writes its pid into the lock file. HTTP lives in ``client``.
Also here: a child's environment (``child_environ``) and a random uuid (``random_uuid``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

LOG = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory.

    The temporary file is created with ``mode`` already in force (never readable by others
    for a moment, whatever the umask), fsync-ed, then renamed over ``path``. The caller
    fsyncs the directory once all its files are in place (``fsync_dir``).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o600)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have taken bits away: put back exactly `mode`
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def link_atomic(path: Path, target: str) -> None:
    """Make ``path`` a symbolic link to ``target``, in one rename (as ``write_atomic``)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def random_uuid() -> str:
    """A random (version 4) UUID, written as ``str(uuid.uuid4())`` writes it.

    Made here from ``os.urandom``: the ``uuid`` module imports ``platform``, 2 ms of the
    start-up of every registration (docs/performance.md).
    """
    data = bytearray(os.urandom(16))
    data[6] = data[6] & 0x0F | 0x40  # version 4
    data[8] = data[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = data.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def fsync_dir(path: Path) -> None:
    """Make the directory entries of ``path`` (renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    umask: int = -1,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text, and never wait longer than ``timeout``.

    ``umask`` (when not -1) is the child's: files it creates never have more than that
    allows. Raises ``TimeoutError`` when it overruns (the child is killed; catch it before
    ``OSError``, its base class) and ``OSError`` when it cannot be started. A non-zero exit
    is returned, not raised. Callers need not import ``subprocess`` (about 3 MiB): it is
    imported here, only once a command really runs.
    """
    import subprocess

    LOG.debug("running %s", argv[0])
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",  # a child's output may carry a server's bytes: any will do
            timeout=timeout,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            check=False,
            umask=umask,
        )
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"{argv[0]} did not finish within {timeout:.1f} s") from e


def child_environ(
    environ: Mapping[str, str],
    *,
    drop: Sequence[str] = (),
    add: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a child: ``environ`` without the names in ``drop``, plus ``add``."""
    env = {name: value for name, value in environ.items() if name not in drop}
    env.update(add or {})
    return env
