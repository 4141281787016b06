"""The agent's own state, in ``<sota>/.lmp-autoreg`` (mode 0700): lock, identity, journal.

- ``lock``: an exclusive ``flock`` held for the whole registration, the holder's pid in it.
  A second run (the unit and a jig at once) fails at once, naming that pid.
- ``identity.json`` (0600): the *pending identity*, the uuid and the key's record
  (``devicekey``: a file key's PEM) of an attempt not yet installed. It is saved before
  the first request, so that a retry, a crash, a power cut or the next run use the same
  identity and the server sees one device. It is removed after a successful install;
  ``--force`` or another ``--uuid`` drop it.
- ``install.json`` (0600): the *install journal*, the server's verified answer, the key's
  record and the names the install writes, saved before the first file is installed and
  removed once ``sota.toml`` is in place. While it exists the device is not registered
  (``guard.is_registered``), and the next run completes the install from it without
  asking the server again (which might refuse a uuid it already knows).

Every write is atomic and fsync-ed (``util.write_atomic``), directory included. Which
step comes when is ``attempt.Attempt``'s business; this module keeps the files.
"""

import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import checked
from .errors import LocalFailure
from .guard import JOURNAL, STATE_DIR
from .paths import DevicePaths
from .settings import UUID_RE, redacted_repr
from .util import fsync_dir, random_uuid, write_atomic

if TYPE_CHECKING:
    from .devicekey import KeyRecord
    from .install import Before

LOG = logging.getLogger(__name__)

LOCK = "lock"
IDENTITY = "identity.json"
DIR_MODE = 0o700
FILE_MODE = 0o600
# The largest state file read back: an install journal holds a verified answer (a few kB).
MAX_STATE_FILE = 16 << 20
# Temporary files of util.write_atomic that a killed run may leave behind.
TEMP_RE = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9._-]*\.tmp-[0-9]+")


class Identity(NamedTuple):
    """A device identity: its uuid and its key's record (None: the backend keeps the key)."""

    uuid: str
    key: "KeyRecord | None"
    reused: bool = False  # True when it comes from an interrupted attempt

    def __repr__(self) -> str:
        return redacted_repr(self, ("key",))


class Journal(NamedTuple):
    """An answer the server gave, verified, whose install did not finish: the files it
    writes (``installs``) are the answer's and the key's own; ``before``, what stood in
    their places before its first attempt (``install.snapshot``), which abandoning it puts
    back."""

    uuid: str
    key: "KeyRecord | None"
    files: dict[str, str]
    installs: tuple[str, ...]
    before: "dict[str, Before | None]"

    def __repr__(self) -> str:
        return redacted_repr(self, ("key", "files", "before"))


def _failure(action: str, path: Path, error: OSError) -> LocalFailure:
    return LocalFailure(f"cannot {action} {path}: {error.strerror or error}")


class State:
    """The state directory of the device at ``paths``. Only ``peek_identity`` and
    ``has_pending`` may be used without the lock (they only read)."""

    def __init__(self, paths: DevicePaths) -> None:
        self.sota = paths.sota
        self.dir = paths.state_dir  # resolved inside the sysroot: reads never leave it

    # -- reading, without the lock --------------------------------------------------------

    def has_pending(self) -> bool:
        """An interrupted attempt's identity or journal is waiting."""
        return (self.dir / IDENTITY).exists() or (self.dir / JOURNAL).exists()

    def peek_identity(self) -> Identity | None:
        """The pending identity, or None (missing or unreadable). Reads only."""
        data = self._load(IDENTITY)
        if data is None:
            return None
        return Identity(data["uuid"], data.get("key"), reused=True)

    def load_journal(self) -> Journal | None:
        data = self._load(JOURNAL)
        if data is None:
            return None
        files = data.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            LOG.warning("ignoring %s: it holds no answer", self.dir / JOURNAL)
            return None
        installs = data.get("installs")
        if not isinstance(installs, list) or not all(isinstance(n, str) for n in installs):
            installs = list(files)  # at least the answer's files
        from .install import before_from_record

        records = data.get("before")
        records = records if isinstance(records, dict) else {}
        before = {name: before_from_record(records.get(name)) for name in installs}
        return Journal(data["uuid"], data.get("key"), files, tuple(installs), before)

    def _load(self, name: str) -> dict | None:
        """A state file's object, or None: missing, or damaged (logged; the attempt then
        starts afresh and replaces it). The agent writes these files itself, as regular
        files: a link, a FIFO or anything else there is damage too, never followed."""
        path = self.dir / name
        try:
            raw = checked.read_file(path, MAX_STATE_FILE, os.O_NOFOLLOW)
            if raw is None:
                return None
            data = json.loads(raw)
        except (OSError, ValueError, RecursionError) as e:
            LOG.warning("ignoring %s: %s", path, getattr(e, "strerror", None) or e)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("uuid"), str):
            LOG.warning("ignoring %s: it holds no uuid", path)
            return None
        if not UUID_RE.fullmatch(data["uuid"]):
            LOG.warning("ignoring %s: its uuid %s is not of the form 8-4-4-4-12 hex digits",
                        path, checked.shown(data["uuid"][:80]))
            return None
        if not isinstance(data.get("key"), str | dict | None):
            LOG.warning("ignoring %s: its key is not a key record", path)
            return None
        return data

    # -- the lock -------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator["State"]:
        """Hold the registration lock for the body of the ``with``; LocalFailure if taken."""
        self._make_dir()
        path = self.dir / LOCK
        # Held open read-only: a file open for writing would keep the file system from
        # being remounted read-only (at shutdown, say) while the agent runs.
        try:
            fd = checked.open_regular(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except OSError as e:
            raise _failure("open the lock", path, e) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise LocalFailure(
                    f"another registration is running (pid {holder} holds {path}); "
                    "not starting a second one"
                ) from None
            try:
                path.write_text(f"{os.getpid()}\n", encoding="ascii")
            except OSError as e:  # the lock holds anyway; only the pid is not shown
                LOG.debug("cannot write the pid into %s: %s", path, e.strerror)
            yield self
        finally:
            os.close(fd)

    def _make_dir(self) -> None:
        """Create the state dir (0700) or check it: a link where it goes is refused,
        wherever it leads (the agent makes that directory itself; ``chmod`` through a link
        would change another directory)."""
        entry = self.sota / STATE_DIR
        if entry.is_symlink():
            raise LocalFailure(f"{entry} is a symbolic link, not the agent's own directory: "
                               "nothing was changed; remove it and run again")
        try:
            if not self.dir.is_dir():
                self.sota.mkdir(parents=True, exist_ok=True)
                self.dir.mkdir(mode=DIR_MODE, exist_ok=True)
                fsync_dir(self.sota)
            if self.dir.stat().st_mode & 0o777 != DIR_MODE:
                self.dir.chmod(DIR_MODE)
        except OSError as e:
            raise _failure("create", self.dir, e) from e

    # -- writing, with the lock held ------------------------------------------------------

    def take_identity(
        self, requested: str | None, new_key: "Callable[[], KeyRecord] | None"
    ) -> Identity:
        """The identity for this attempt, saved before it is used.

        The pending identity, unless ``requested`` (an explicit uuid) differs; else a new
        one: ``requested`` or a random uuid, with the record of ``new_key()`` (None: the
        backend keeps the key itself, as lmp-device-register does).
        """
        pending = self.peek_identity()
        if pending is not None and requested in (None, pending.uuid):
            LOG.info("reusing the identity of an interrupted attempt: %s", pending.uuid)
            if pending.key is not None or new_key is None:
                return pending
            identity = Identity(pending.uuid, new_key(), reused=True)
        else:
            if pending is not None:
                LOG.info("--uuid %s: dropping the pending identity %s", requested, pending.uuid)
            key = new_key() if new_key is not None else None
            identity = Identity(requested or random_uuid(), key)
        self._write(IDENTITY, {"uuid": identity.uuid, "key": identity.key})
        return identity

    def save_journal(
        self, uuid: str, key: "KeyRecord | None", files: dict[str, str], installs: list[str],
        before: "dict[str, Before | None]",
    ) -> None:
        """Journal a verified answer, ``files``, whose install writes ``installs`` where
        ``before`` stands."""
        from .install import before_record

        records = {name: before_record(before.get(name)) for name in installs}
        self._write(JOURNAL, {"uuid": uuid, "key": key, "files": files, "installs": installs,
                              "before": records})

    def finish(self) -> None:
        """After a successful install: drop the journal, then the pending identity."""
        for name in (JOURNAL, IDENTITY):
            self._remove(self.dir / name, warn_only=True)
        self._sync(warn_only=True)

    def abandon(self, why: str, *, keep_identity: bool = False) -> None:
        """Start afresh: drop any journal, put back what its unfinished install found in
        the sota dir (the image's own files stay; what the install wrote goes), and
        (unless ``keep_identity``) drop the pending identity."""
        from .install import FILE_NAME_RE, put_back

        journal = self.load_journal()
        if journal is not None:
            LOG.warning("%s: abandoning the unfinished install of %s", why, journal.uuid)
            for name in journal.installs:
                if FILE_NAME_RE.fullmatch(name):  # a plain file name, never a path
                    try:
                        put_back(self.sota / name, journal.before.get(name))
                    except OSError as e:
                        raise _failure("put back", self.sota / name, e) from e
            fsync_dir(self.sota)
        elif (self.dir / IDENTITY).exists() and not keep_identity:
            LOG.info("%s: dropping the pending identity", why)
        for name in (JOURNAL,) if keep_identity else (JOURNAL, IDENTITY):
            self._remove(self.dir / name)
        self._sync()

    def sweep(self) -> None:
        """Remove temporary files a killed run left (we hold the lock: none are live)."""
        for directory in (self.sota, self.dir):
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if TEMP_RE.fullmatch(name):
                    LOG.debug("removing the leftover %s", directory / name)
                    self._remove(directory / name)

    def _write(self, name: str, data: dict) -> None:
        path = self.dir / name
        try:
            write_atomic(path, json.dumps(data).encode(), FILE_MODE)
            fsync_dir(self.dir)
        except OSError as e:
            raise _failure("write", path, e) from e

    def _remove(self, path: Path, *, warn_only: bool = False) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            if not warn_only:
                raise _failure("remove", path, e) from e
            LOG.warning("cannot remove %s: %s", path, e.strerror or e)

    def _sync(self, *, warn_only: bool = False) -> None:
        try:
            fsync_dir(self.dir)
        except OSError as e:
            if not warn_only:
                raise _failure("sync", self.dir, e) from e
            LOG.warning("cannot sync %s: %s", self.dir, e.strerror or e)


def check_aklite(paths: DevicePaths) -> None:
    """LocalFailure when aktualizr-lite runs: someone holds its lock file.

    aktualizr-lite takes an exclusive ``flock`` on ``/var/lock/aklite.lock`` (older
    versions a POSIX record lock); a shared try of both fails while it holds either. The
    file is only opened for reading and never created, and the lock is not kept: the update
    client must be free to start as soon as ``sota.toml`` appears.
    """
    path = paths.aklite_lock
    try:
        fd = checked.open_regular(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise _failure("check", path, e) from e
    try:
        for take in (fcntl.flock, fcntl.lockf):
            try:
                take(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise _failure("check", path, e) from e
                raise LocalFailure(
                    f"aktualizr-lite is running (it holds {path}): the device is in use by "
                    "the update client; stop it before registering"
                ) from None
            take(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
