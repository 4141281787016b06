"""Verify the server's answer, then install it into the sota dir (docs/spec.md section 4).

``verify_answer`` decides (pure: it returns the files to write, in order, or raises
``BadAnswer``); ``install`` acts: one atomic file at a time, ``sota.toml`` last, and on
any failure it puts back what was there before this attempt.
"""

import base64
import binascii
import logging
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import checked, testhook  # TEST-ONLY pauses; each returns at once on a device
from .errors import BadAnswer, LocalFailure
from .paths import REGISTRATION_FILES
from .util import fsync_dir, link_atomic, write_atomic

if TYPE_CHECKING:
    from .devicekey import DeviceKey

LOG = logging.getLogger(__name__)

FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REQUIRED = ("client.pem", "root.crt", "sota.toml")
# Names in the sota dir that are not the server's to write: the device's own key,
# aktualizr-lite's database, and the apps' directories.
RESERVED = frozenset({"pkey.pem", "sql.db", "compose-apps", "reset-apps"})
KEY_MODE = 0o600
FILE_MODE = 0o644


class PlannedFile(NamedTuple):
    name: str
    data: bytes
    mode: int


def verify_answer(
    files: dict[str, str], *, uuid: str, key: "DeviceKey | None"
) -> list[PlannedFile]:
    """Check a 201 answer against the device's identity; return the install plan.

    ``key`` is the device key, which the certificate must be for (None: not known here).
    The plan starts with the key's own files (``pkey.pem`` of a key in a file; none of a
    key on a token) and ends with ``sota.toml``, with what the key adds to it (a token
    key's ``[p11]`` section, which holds the PIN: ``sota.toml`` is then 0600).
    """
    from . import identity  # cryptography is needed only once there is an answer

    bad = sorted(n for n in files if not FILE_NAME_RE.fullmatch(n))
    if bad:
        raise BadAnswer(f"the answer names files that may not be written: {bad!r}")
    missing = [n for n in REQUIRED if n not in files]
    if missing:
        raise BadAnswer(f"the answer lacks {', '.join(missing)}")
    if "pkey.pem" in files:
        raise BadAnswer("the answer carries a pkey.pem: the device key never leaves the device")
    reserved = sorted(RESERVED.intersection(files))
    if reserved:
        raise BadAnswer(f"the answer names files that are not the server's to write: {reserved!r}")
    identity.check_client_certificate(
        files["client.pem"], uuid=uuid, public_key=None if key is None else key.public_key()
    )
    checked.certificate(files["root.crt"], "root.crt")
    chained = files.get("client.chained")
    if chained is not None and not chained.lstrip().startswith(files["client.pem"].strip()):
        raise BadAnswer("client.chained does not start with client.pem")
    if not files["sota.toml"].strip():
        raise BadAnswer("sota.toml is empty")
    config = checked.toml_document(files["sota.toml"], "sota.toml")
    sota_toml, sota_mode = files["sota.toml"], FILE_MODE
    added = key.config() if key is not None else ""
    if added:
        clash = sorted(config.keys() & tomllib.loads(added).keys())
        if clash:
            raise BadAnswer(f"sota.toml has a [{clash[0]}] section already: the device "
                            "writes it")
        sota_toml, sota_mode = sota_toml.rstrip("\n") + "\n\n" + added, KEY_MODE

    plan = []
    for name, data in (key.files() if key is not None else {}).items():
        plan.append(PlannedFile(name, data, KEY_MODE))
    for name in sorted(files):
        if name != "sota.toml":
            plan.append(PlannedFile(name, files[name].encode(), FILE_MODE))
    plan.append(PlannedFile("sota.toml", sota_toml.encode(), sota_mode))
    return plan


class Before(NamedTuple):
    """What stood where an install writes a file: a file's bytes and mode, or a symbolic
    link's target (``link``), kept as a link and never read through (under ``--sysroot``
    it may name a file of the host)."""

    data: bytes
    mode: int
    link: str | None = None


def snapshot(sota: Path, names: list[str]) -> dict[str, Before | None]:
    """What each of ``names`` is in ``sota`` now (None: nothing), before an install."""
    return {name: _read_or_none(sota / name) for name in names}


def install(sota: Path, plan: list[PlannedFile],
            before: dict[str, Before | None] | None = None) -> list[Path]:
    """Write the plan into ``sota``; all of it, or (after a failure) none of it.

    What stood there before (``before``, as ``snapshot`` took it before the first attempt
    of this install; now when not given) is put back on failure, so nothing is lost.
    Raises ``LocalFailure`` naming the path that failed.
    """
    previous: dict[Path, Before | None] = {}
    written: list[Path] = []
    path = sota
    try:
        sota.mkdir(parents=True, exist_ok=True)
        _check_nothing_in_the_way(sota, plan)
        if before is None:
            before = snapshot(sota, [item.name for item in plan])
        for item in plan:
            path = sota / item.name
            if item.name == "sota.toml":
                testhook.pause("before-sota-toml")
            write_atomic(path, item.data, item.mode)  # all or nothing: no restore if it fails
            previous[path] = before.get(item.name)
            written.append(path)
            LOG.debug("installed %s (%o)", path, item.mode)
            if len(written) == 1:
                testhook.pause("between-files")
        fsync_dir(sota)
    except OSError as e:
        stuck = _restore(previous)
        outcome = (
            f"rolled back all but {', '.join(stuck)}, which the next run replaces"
            if stuck
            else "nothing was installed"
        )
        raise LocalFailure(f"cannot write {path}: {e.strerror or e}; {outcome}") from e
    except BaseException:
        _restore(previous)
        raise
    return written


def _check_nothing_in_the_way(sota: Path, plan: list[PlannedFile]) -> None:
    """Before the first write: every target is a file (or a link to replace), or absent."""
    for item in plan:
        path = sota / item.name
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise LocalFailure(f"cannot write {path}: something other than a file is in the "
                               "way; nothing was installed")


def _read_or_none(path: Path) -> Before | None:
    """A link's target, or the file's bytes and its mode (an HSM's sota.toml holds the
    PIN: 0600 stays); the file is opened without following a link."""
    try:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            return Before(b"", 0, os.readlink(path))
        if not stat.S_ISREG(mode):
            return None  # a directory, a FIFO: the install refuses it before any write
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return Before(f.read(), mode & 0o777)


def put_back(path: Path, before: Before | None) -> None:
    """Make ``path`` what it was (``before``): the link, the file, or nothing."""
    if before is None:
        path.unlink(missing_ok=True)
    elif before.link is not None:
        link_atomic(path, before.link)
    else:
        write_atomic(path, before.data, KEY_MODE if path.name == "pkey.pem" else before.mode)


def before_record(before: Before | None) -> dict[str, object] | None:
    """``before`` as the install journal keeps it (JSON)."""
    if before is None:
        return None
    if before.link is not None:
        return {"link": before.link}
    return {"data": base64.b64encode(before.data).decode("ascii"), "mode": before.mode}


def before_from_record(record: object) -> Before | None:
    """The ``Before`` of a journal's record; None for nothing or a damaged record (the
    file is then removed, as an install journaled before records existed does)."""
    if isinstance(record, dict) and isinstance(record.get("link"), str):
        return Before(b"", 0, record["link"])
    if isinstance(record, dict) and isinstance(record.get("data"), str) \
            and isinstance(record.get("mode"), int) and 0 <= record["mode"] <= 0o777:
        try:
            return Before(base64.b64decode(record["data"], validate=True), record["mode"])
        except binascii.Error:
            return None
    return None


def _restore(previous: dict[Path, Before | None]) -> list[str]:
    """Put back what ``install`` found; best effort. Return the names it could not."""
    stuck = []
    for path, before in reversed(previous.items()):
        try:
            put_back(path, before)
        except OSError as e:
            LOG.error("could not roll back %s: %s", path, e.strerror or e)
            stuck.append(path.name)
    return stuck


def remove_registration(sota: Path, keep: frozenset[str] = frozenset()) -> list[str]:
    """Remove a previous registration's files, but those in ``keep`` (which the new
    registration replaces in place); return the names removed."""
    removed = []
    for name in REGISTRATION_FILES:
        if name in keep:
            continue
        path = sota / name
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise LocalFailure(f"cannot remove {path}: {e.strerror or e}") from e
        removed.append(name)
    if removed:
        fsync_dir(sota)
    return removed


def file_modes(sota: Path, names: list[str]) -> dict[str, str]:
    """The octal mode of each installed file, for showing."""
    return {name: format((sota / name).stat().st_mode & 0o7777, "04o") for name in names}

