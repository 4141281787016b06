"""The registration itself, end to end, as one library function: ``register``.

The CLI is a thin layer over ``guard.check_not_registered`` and ``register``. One attempt
(``attempt.Attempt``) holds the lock, the identity and the install; this module chooses
the backend and talks to the server. Heavy modules (``cryptography``, ``requests``) are
imported only once a registration really starts, so the already-registered path stays
cheap on a small board.
"""

import logging
from typing import TYPE_CHECKING

from . import guard, preflight, testhook
from .attempt import Attempt, note_uuid
from .errors import AutoregError, ConfigError, NoAnswer, ServerRefused, Unreachable
from .result import Result
from .retry import Deadline, retry
from .settings import Settings
from .state import State
from .util import random_uuid

if TYPE_CHECKING:
    from .devicekey import KeyKind
    from .install import PlannedFile

LOG = logging.getLogger(__name__)

# error.remedy.case of a 409 for an identity the device sent before (lost_answer_conflict).
LOST_ANSWER_CONFLICT = "conflict-after-lost-answer"


def _describe(settings: Settings, uuid: str | None) -> Result:
    return Result(
        result="",
        uuid=uuid,
        name=settings.name or uuid,
        factory=settings.factory,
        hardware_id=settings.hardware_id,
        tag=settings.tag,
        apps=list(settings.apps) if settings.apps is not None else None,
        production=settings.production,
        device_api=settings.device_api,
        backend=settings.backend,
        sota_dir=str(settings.paths.sota_device),
    )


def _note_board(result: Result, settings: Settings) -> None:
    """The board's serial (``board``): into the result and every journal entry from now
    on, and named in the status line. Never into the request."""
    from . import board, log

    result.board = board.read(settings.paths)
    if result.board is None:
        LOG.debug("no board serial found (device tree, DMI, wired network interface)")
        return
    log.add_fields(LMP_BOARD_SERIAL=result.board["serial"])
    LOG.info("board serial %s (from %s)", result.board["serial"], result.board["source"])


def register(settings: Settings, *, dry_run: bool = False, force: bool = False) -> Result:
    """Register the device described by ``settings``; return what was done.

    Raises an ``AutoregError`` subclass for every failure docs/spec.md section 6 names. With
    ``dry_run`` everything is resolved and the request is returned, but nothing is sent
    and nothing is written. Otherwise the whole registration runs under the state lock,
    retries until ``settings.timeout`` and keeps one identity per device (``state``).
    """
    deadline = Deadline(settings.timeout)
    paths = settings.paths
    if not force:
        guard.check_not_registered(paths.sota, str(paths.sota_device))
    on_token = _on_token(settings)
    if on_token:
        _check_pkcs11()

    result = _describe(settings, settings.uuid)
    _note_board(result, settings)
    try:
        if dry_run:
            return _dry_run(settings, result, force=force)
        if on_token and settings.uuid is None:
            settings = _uuid_of_the_slot(settings)
        with Attempt.locked(settings, result, _key_kind(settings, force=force),
                            force=force) as attempt:
            if not attempt.resume():
                if settings.backend == "lmp-device-register":
                    _register_with_tool(attempt, deadline, force=force)
                else:
                    _register_native(attempt, deadline, force=force)
        # After the lock: the check-in may take a while, and the device is registered.
        from .poststeps import run_post_steps

        run_post_steps(settings, result, deadline=deadline)
        return result
    except AutoregError as e:
        e.result = result
        raise


def board_note(result: Result) -> str:
    """`` (board SERIAL)`` for a status line, or nothing when no serial was found."""
    return f" (board {result.board['serial']})" if result.board else ""


def _on_token(settings: Settings) -> bool:
    """The native backend keeps the key on the PKCS#11 token (HSM mode); lmp-device-register
    keeps an HSM key itself."""
    return settings.hsm is not None and settings.backend == "native"


def _key_kind(settings: Settings, *, force: bool) -> "KeyKind":
    """The kind of key the device's identity has: on the PKCS#11 token, else in a file."""
    from . import identity

    if _on_token(settings):
        from . import hsm

        assert settings.hsm is not None
        return hsm.TokenKeys(settings.hsm, force=force)
    return identity.FILE_KEYS


def _check_pkcs11() -> None:
    import importlib.util

    if importlib.util.find_spec("pkcs11") is None:
        raise ConfigError(
            "an HSM is configured, but python-pkcs11 is not installed: install "
            "lmp-autoreg[hsm] (python3-pkcs11), or use --backend lmp-device-register"
        )


def _uuid_of_the_slot(settings: Settings) -> Settings:
    """No --uuid: a uuid in a PKCS#11 slot's description is the device's, as the C++
    tool takes it (a secure element may name its slot after the device)."""
    from . import hsm

    assert settings.hsm is not None
    uuid = hsm.slot_uuid(settings.hsm)
    if uuid is None:
        return settings
    LOG.info("the PKCS#11 slot names the uuid %s: registering under it", uuid)
    return settings._replace(uuid=uuid)


def _dry_run(settings: Settings, result: Result, *, force: bool) -> Result:
    from . import client, identity

    # A dry run touches no token: its CSR is signed by a throwaway key in memory.
    keys = identity.FILE_KEYS
    pending = None if force else State(settings.paths).peek_identity()
    uuid, key = settings.uuid or random_uuid(), None
    if pending is not None and settings.uuid in (None, pending.uuid):
        uuid = pending.uuid
        LOG.info("would reuse the identity of an interrupted attempt: %s", pending.uuid)
        if isinstance(pending.key, str):  # a key in a file (a token key stays unread)
            try:
                key = keys.load(pending.key)
            except ValueError as e:
                LOG.warning("would not reuse the pending key of %s: %s", pending.uuid, e)
    note_uuid(result, settings, uuid)
    preflight.warn(token_file=settings.token_place, production=settings.production)
    result.result = "dry-run"
    if settings.oauth:  # no flow starts: a person would be asked for nothing
        from . import oauth

        result.oauth = oauth.state(settings, "would-start")
        LOG.info("would start an OAuth device authorization at %s (no API token)",
                 settings.oauth_url)
        settings = settings._replace(token="", token_header=oauth.HEADER)
    if settings.backend == "lmp-device-register":
        from . import backend_ldr

        result.request = backend_ldr.dry_run_request(settings, uuid)
        return result
    csr = identity.make_csr(key or keys.generate(), uuid, settings.factory,
                            settings.production)
    result.request = {
        "method": "POST",
        "url": settings.device_api,
        "headers": client.request_headers(settings, redact=True),
        "body": client.request_body(settings, uuid=uuid, csr=csr),
    }
    return result


def _register_native(attempt: Attempt, deadline: Deadline, *, force: bool) -> None:
    """The native backend: make the CSR, send it until an answer verifies, install it."""
    from . import client, identity

    settings = attempt.settings
    uuid = attempt.take_identity()
    assert attempt.key is not None
    LOG.info("registering %s as %s with factory %s%s", settings.hardware_id, uuid,
             settings.factory, board_note(attempt.result))
    preflight.warn(token_file=settings.token_place, production=settings.production)
    if settings.oauth:
        from . import oauth

        grant = oauth.obtain_token(settings, uuid, attempt.result, deadline)
        deadline = grant.deadline
        settings = settings._replace(token=oauth.bearer(grant.token), token_header=oauth.HEADER)
    csr = identity.make_csr(attempt.key, uuid, settings.factory, settings.production)
    body = client.request_body(settings, uuid=uuid, csr=csr)
    testhook.pause("before-request")  # TEST-ONLY: returns at once on a device

    http = client.RegistrationClient(settings)
    # Whether the server may hold this uuid already: the identity of an interrupted
    # attempt, or a request of this run that reached it but whose answer was lost.
    sent = [attempt.reused]

    def send(budget: float) -> "tuple[dict[str, str], list[PlannedFile]]":
        try:
            files = http.post(body, timeout=budget)
            LOG.info("the server answered with %s; verifying", ", ".join(sorted(files)))
            return files, attempt.verify(files)
        except Unreachable:  # no connection: the request never arrived
            raise
        except NoAnswer:
            sent[0] = True
            raise

    what = f"sending the registration request to {settings.device_api}"
    LOG.info("%s", what)
    try:
        files, plan = retry(send, deadline, what=what)
    except AutoregError as e:
        _discard_new_key(attempt, force=force)
        if isinstance(e, ServerRefused) and e.status == 409 and sent[0]:
            raise lost_answer_conflict(e, attempt.result, reused=attempt.reused) from e
        raise
    finally:
        http.close()
    attempt.install(files, plan)


def lost_answer_conflict(refusal: ServerRefused, result: Result, *, reused: bool
                         ) -> ServerRefused:
    """The 409 for a uuid this device sent before without getting the answer
    (docs/spec.md section 6, docs/reliability.md section 2): the server may have
    registered it then and cannot send its certificate again. Exit 4, the identity kept,
    with the remedy for the operator."""
    uuid, name = result.uuid, result.name or result.uuid
    when = "an interrupted attempt" if reused else "an earlier request of this run"
    text = (f"unless another board holds uuid {uuid} (the jig's records of board serials and "
            f"uuids tell), delete the device {name} in the factory (fioctl devices delete "
            f"{name}) and run again: this board keeps the identity {uuid} and its key, and "
            f"registers under it; or run with --force for a new identity, leaving {name} in "
            "the factory until it is deleted")
    remedy: dict[str, object] = {"case": LOST_ANSWER_CONFLICT,
                                 "device": {"uuid": uuid, "name": name}, "text": text}
    return ServerRefused(f"{refusal} (uuid {uuid} was sent by {when} whose answer never "
                         f"arrived, and the server may have registered it then: {text})",
                         refusal.status, remedy)


def _discard_new_key(attempt: Attempt, *, force: bool) -> None:
    """A failed ``--force`` leaves a token as it found it: the old key and certificate
    stayed; the new key goes (the next ``--force`` makes another anyway)."""
    if not force or attempt.settings.hsm is None:
        return
    from . import hsm

    if isinstance(attempt.key, hsm.TokenKey):
        try:
            attempt.key.discard()
        except AutoregError as e:
            LOG.warning("cannot remove the unused new key from the token: %s", e)


def _register_with_tool(attempt: Attempt, deadline: Deadline, *, force: bool) -> None:
    """The lmp-device-register backend: the tool keeps the key, the agent keeps the uuid."""
    from . import backend_ldr

    settings = attempt.settings
    uuid = attempt.take_identity(key=False)
    preflight.warn(token_file=settings.token_place, production=settings.production)
    if not settings.oauth:
        if force:  # the tool refuses to overwrite a registration: the old one waits aside
            attempt.set_aside()
        backend_ldr.register(settings, attempt.result, deadline=deadline)
        attempt.finish()
        return
    from . import oauth
    from .handoff import TokenHandOff

    # The agent runs the flow (all of RFC 8628, one deadline) and hands the tool the token
    # over loopback: the tool takes a token on its command line or from $OAUTH_BASE only.
    grant = oauth.obtain_token(settings, uuid, attempt.result, deadline)
    if force:
        attempt.set_aside()
    with TokenHandOff(grant.token, uuid) as handoff:
        backend_ldr.register(settings, attempt.result, deadline=grant.deadline,
                             oauth_base=handoff.url)
    attempt.finish()
