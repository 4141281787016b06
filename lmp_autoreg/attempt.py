"""One registration attempt, from the lock to the installed answer: ``Attempt``.

``register`` drives an attempt through its life; the attempt keeps the settings, the
state directory (``state``), the identity and the ``Result`` it fills in:

1. ``Attempt.locked(settings, result, keys, force=...)`` holds the state lock for the body
   of a ``with``. On entry it checks that aktualizr-lite is not running, checks again,
   under the lock, that the device is not registered (``--force``: abandons what an
   earlier attempt left instead), and sweeps the temporary files of a killed run.
2. ``resume()`` completes an install an earlier run was interrupted in, from the journal
   and without asking the server again; True when it did, and the attempt is over.
3. ``take_identity()`` takes the pending identity of an interrupted attempt, or a new one,
   saved before it is used; ``uuid``, ``key`` and ``reused`` then describe it. With
   ``key=False`` the identity is the uuid alone (lmp-device-register keeps its own key).
4. ``verify(files)`` checks an answer against the identity (``BadAnswer``: retry), and
   ``install(files, plan)`` journals the verified answer, installs it and finishes.
   ``finish()`` alone ends an attempt whose files another program installed.
5. ``abandon(why)`` starts afresh: the unfinished install and the pending identity go.

Files set aside. A *half registration* (``client.pem`` or ``pkey.pem`` without
``sota.toml`` and without ``sql.db``: docs/spec.md section 1) is moved into the state dir
(``aside/``) on entry, whichever the backend; so is an old registration that
lmp-device-register must not find (``set_aside()``, for ``--force``). When the attempt
fails they are moved back, unchanged; when it succeeds they are dropped. A run killed in
between leaves them there, and the next run moves them back first (unless an install of
its own is journaled: that completes, and then drops them).

Keys. ``keys`` is a ``devicekey.KeyKind``: it makes the identity's key and reads it back
from the record the state keeps; the attempt uses the key only through
``devicekey.DeviceKey`` (``public_key()``, ``sign_csr(builder)``, ``record()``,
``files()``, ``config()``, ``store_certificate(cert)``):
``identity.FILE_KEYS``, a key in ``pkey.pem``, or ``hsm.TokenKeys``, a key on a PKCS#11
token.
"""

import logging
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from . import checked, guard, log
from .errors import BadAnswer, LocalFailure
from .install import Before, PlannedFile, remove_registration
from .paths import REGISTRATION_FILES
from .settings import Settings
from .state import Identity, State, check_aklite
from .util import fsync_dir

if TYPE_CHECKING:
    from pathlib import Path

    from .devicekey import DeviceKey, KeyKind, KeyRecord
    from .result import Result

LOG = logging.getLogger(__name__)

ASIDE = "aside"  # in the state dir: files of the sota dir set aside during an attempt
# A half registration has one of these, but neither sota.toml nor sql.db.
HALF_SIGNS = ("client.pem", "pkey.pem")


def note_uuid(result: "Result", settings: Settings, uuid: str) -> None:
    """The uuid is known: into the result, and into every journal entry from now on."""
    result.uuid = uuid
    result.name = settings.name or uuid
    log.add_fields(LMP_UUID=uuid, LMP_FACTORY=settings.factory)


class Attempt:
    """One attempt to register the device of ``settings``, under the state lock."""

    def __init__(self, settings: Settings, state: State, result: "Result", keys: "KeyKind"):
        self.settings = settings
        self.paths = settings.paths
        self.state = state
        self.result = result
        self.keys = keys
        self.uuid: str | None = None
        self.key: DeviceKey | None = None
        self.reused = False  # the identity is that of an interrupted attempt

    @classmethod
    @contextmanager
    def locked(
        cls, settings: Settings, result: "Result", keys: "KeyKind", *, force: bool
    ) -> Iterator["Attempt"]:
        with State(settings.paths).locked() as state:
            attempt = cls(settings, state, result, keys)
            try:
                attempt._begin(force=force)
                yield attempt
            except BaseException:
                attempt._put_back()
                raise
            attempt._drop_aside()

    def _begin(self, *, force: bool) -> None:
        check_aklite(self.paths)
        journaled = self.state.load_journal() is not None
        if not journaled:
            self._put_back()  # what a killed run set aside
        if force:
            # The previous registration stays until a new answer is verified (``install``).
            self.abandon("--force")
        else:
            # Again, under the lock: another run may just have ended.
            guard.check_not_registered(self.paths.sota, str(self.paths.sota_device))
            sota = self.paths.sota
            if (any(os.path.lexists(sota / name) for name in HALF_SIGNS)
                    and not (sota / "sota.toml").exists() and not (sota / "sql.db").exists()
                    and not journaled):
                LOG.warning("%s holds a half registration (no sota.toml): setting it aside "
                            "until this attempt succeeds", sota)
                self.set_aside()
        self.state.sweep()

    def _check_files_are_files(self) -> None:
        """Before files are set aside: LocalFailure when something other than a file (or a
        link) stands where a registration file goes. A directory named ``pkey.pem`` is not
        a half registration to set aside (and drop after a success): nothing of it is moved
        or deleted."""
        for name in REGISTRATION_FILES:
            path = self.paths.sota / name
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:
                continue
            except OSError as e:
                raise LocalFailure(f"cannot check {path}: {e.strerror or e}") from e
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise LocalFailure(f"{path} is a {checked.kind(mode)} where a file goes: "
                                   "nothing was changed; move it away and run again")

    @property
    def _aside_dir(self) -> "Path":
        return self.state.dir / ASIDE

    def set_aside(self) -> None:
        """Move the registration files of the sota dir into the state dir, to be put back
        unchanged if this attempt fails."""
        sota, aside = self.paths.sota, self._aside_dir
        self._check_files_are_files()
        try:
            aside.mkdir(mode=0o700, exist_ok=True)
            moved = []
            for name in REGISTRATION_FILES:
                # A dangling link too: set aside, never written through.
                if os.path.lexists(sota / name) and not os.path.lexists(aside / name):
                    os.replace(sota / name, aside / name)
                    moved.append(name)
            fsync_dir(aside)
            fsync_dir(sota)
        except OSError as e:
            raise LocalFailure(f"cannot set {sota}'s files aside in {aside}: "
                               f"{e.strerror or e}") from e
        if moved:
            LOG.info("set aside until this attempt succeeds: %s", ", ".join(moved))

    def _put_back(self) -> None:
        """Move what was set aside back into the sota dir, over anything of the same name;
        best effort, logged."""
        sota, aside = self.paths.sota, self._aside_dir
        try:
            names = sorted(os.listdir(aside))
        except FileNotFoundError:
            return
        except OSError as e:
            LOG.error("cannot read %s: %s", aside, e.strerror or e)
            return
        for name in names:
            try:
                os.replace(aside / name, sota / name)
            except OSError as e:
                LOG.error("could not put %s back into %s: %s", name, sota, e.strerror or e)
        try:
            fsync_dir(sota)
            aside.rmdir()
        except OSError as e:
            LOG.error("could not finish putting back %s: %s", aside, e.strerror or e)
        if names:
            LOG.warning("put back what was set aside: %s", ", ".join(names))

    def _drop_aside(self) -> None:
        """The attempt succeeded: what was set aside is no longer needed."""
        if self._aside_dir.exists():
            shutil.rmtree(self._aside_dir, ignore_errors=True)

    def _note_uuid(self, uuid: str) -> None:
        self.uuid = uuid
        note_uuid(self.result, self.settings, uuid)

    def resume(self) -> bool:
        """Complete an interrupted install; True when one was completed.

        An install journaled for another uuid than ``--uuid`` asks for is abandoned; one
        that cannot be completed (its answer or key no longer checks out) is abandoned
        too, but its identity is kept for asking the server again.
        """
        from . import install

        journal = self.state.load_journal()
        if journal is None:
            return False
        requested = self.settings.uuid
        if requested not in (None, journal.uuid):
            self.state.abandon(f"--uuid {requested}")
            return False
        self._note_uuid(journal.uuid)
        LOG.warning("an earlier run was interrupted while installing the answer for %s: "
                    "completing it", journal.uuid)
        try:
            self.key = self.keys.load(journal.key) if journal.key is not None else None
            plan = install.verify_answer(journal.files, uuid=journal.uuid, key=self.key)
        except (BadAnswer, ValueError) as e:  # ValueError: an unreadable key
            LOG.warning("the interrupted install cannot be completed: %s", e)
            self.state.abandon("asking the server again", keep_identity=True)
            self.key = None
            return False
        self._install(journal.files, plan, journal.before)
        return True

    def take_identity(self, *, key: bool = True) -> str:
        """The identity of this attempt, saved before it is used; return its uuid.

        The pending identity's key is reused; an unreadable one is replaced, with a new
        uuid. A new key is used as generated, never read back from its record.
        """
        ident = self._identity_with_key() if key else self.state.take_identity(
            self.settings.uuid, None
        )
        self.reused = ident.reused
        self._note_uuid(ident.uuid)
        return ident.uuid

    def _identity_with_key(self) -> Identity:
        generated: list[DeviceKey] = []

        def new_key() -> "KeyRecord":
            generated.append(self.keys.generate())
            return generated[-1].record()

        ident = self.state.take_identity(self.settings.uuid, new_key)
        if generated:
            self.key = generated[-1]
            return ident
        assert ident.key is not None  # a pending identity without a key got a new one
        try:
            self.key = self.keys.load(ident.key)
        except ValueError as e:
            LOG.warning("the key of the pending identity %s cannot be read: %s", ident.uuid, e)
            self.abandon("an unreadable key")
            ident = self.state.take_identity(self.settings.uuid, new_key)
            self.key = generated[-1]
        return ident

    def verify(self, files: dict[str, str]) -> list[PlannedFile]:
        """Check the server's answer against this identity; the install plan, or
        ``BadAnswer``. Decides only."""
        from . import install

        assert self.uuid is not None, "take_identity() first"
        return install.verify_answer(files, uuid=self.uuid, key=self.key)

    def install(self, files: dict[str, str], plan: list[PlannedFile]) -> None:
        """Journal a verified answer, install it, finish the attempt."""
        from . import install

        assert self.uuid is not None, "take_identity() first"
        names = [item.name for item in plan]
        before = install.snapshot(self.paths.sota, names)
        self.state.save_journal(self.uuid, self.key.record() if self.key else None, files,
                                names, before)
        self._install(files, plan, before)

    def _install(self, files: dict[str, str], plan: list[PlannedFile],
                 before: dict[str, Before | None]) -> None:
        from . import identity, install

        sota = self.paths.sota
        names = [item.name for item in plan]
        # What the new answer does not replace of an old registration (--force, or an
        # install completed from the journal) goes first: sota.toml, written last, must not
        # appear beside the old sql.db.
        self.remove_previous(keep=frozenset(names))
        cert = identity.load_certificate(files["client.pem"])
        if self.key is not None:
            self.key.store_certificate(cert)
        try:
            install.install(sota, plan, before)
        except LocalFailure:
            LOG.warning("the server's answer is kept in %s: the next run installs it without "
                        "asking the server again", self.state.dir)
            raise
        self.finish()
        self.result.files = install.file_modes(sota, names)
        self.result.certificate = identity.summary(cert)
        self.result.result = "registered"
        LOG.info("registered: installed %s into %s", ", ".join(names), sota)

    def remove_previous(self, keep: frozenset[str] = frozenset()) -> None:
        """Remove a previous registration's files, but those in ``keep``."""
        removed = remove_registration(self.paths.sota, keep)
        if removed:
            LOG.warning("removed the previous registration's %s", ", ".join(removed))

    def finish(self) -> None:
        """The registration is installed: drop the journal and the pending identity."""
        self.state.finish()

    def abandon(self, why: str) -> None:
        """Start afresh: drop the unfinished install and the pending identity."""
        self.state.abandon(why)
        self.key = None
