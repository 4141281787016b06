"""The registration itself, end to end, as one library function: ``register``.

The CLI is a thin layer over ``guard.check_not_registered`` and ``register``. Heavy modules
(``cryptography``, ``requests``) are imported only once a registration really starts, so
the already-registered path stays cheap on a small board.
"""

import logging
from typing import TYPE_CHECKING, Any

from . import guard, log, preflight, testhook
from .errors import (
    AutoregError,
    BadAnswer,
    ConfigError,
    LocalFailure,
    ServerRefused,
)
from .install import PlannedFile, remove_registration
from .paths import DevicePaths
from .retry import Deadline, retry
from .settings import Settings
from .state import Identity, State, check_aklite

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

    from .identity import DeviceKey
from .util import random_uuid

LOG = logging.getLogger(__name__)


class Result:
    """What happened, in the shape of SPEC section 6's JSON object.

    A plain class rather than a dataclass, for the reason given in ``settings``. The
    annotated names are the JSON keys, in order.
    """

    result: str = ""
    uuid: str | None = None
    name: str | None = None
    factory: str | None = None
    hardware_id: str | None = None
    tag: str | None = None
    apps: list[str] | None = None
    production: bool | None = None
    device_api: str | None = None
    backend: str | None = None
    sota_dir: str | None = None
    files: dict[str, str] | None = None  # name -> octal mode
    certificate: dict[str, str] | None = None
    fioconfig: str | None = None
    services: dict[str, str] | None = None
    request: dict[str, Any] | None = None  # dry-run only

    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            if name not in Result.__annotations__:
                raise TypeError(f"Result has no field {name!r}")
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in Result.__annotations__}
        if data["request"] is None:
            del data["request"]
        return data


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


def register(settings: Settings, *, dry_run: bool = False, force: bool = False) -> Result:
    """Register the device described by ``settings``; return what was done.

    Raises an ``AutoregError`` subclass for every failure SPEC section 6 names. With
    ``dry_run`` everything is resolved and the request is returned, but nothing is sent
    and nothing is written. Otherwise the whole registration runs under the state lock,
    retries until ``settings.timeout`` and keeps one identity per device (``state``).
    """
    deadline = Deadline(settings.timeout)
    paths = settings.paths
    if not force:
        guard.check_not_registered(paths.sota, str(paths.sota_device))
    if settings.hsm is not None and settings.backend == "native":
        _check_pkcs11()

    result = _describe(settings, settings.uuid)
    try:
        if dry_run:
            return _dry_run(settings, result, force=force)
        with State(paths).locked() as state:
            _register(settings, state, result, force=force, deadline=deadline)
        # After the lock: the check-in may take a while, and the device is registered.
        from .poststeps import run_post_steps

        run_post_steps(settings, result)
        return result
    except AutoregError as e:
        e.result = result
        raise


def _check_pkcs11() -> None:
    import importlib.util

    if importlib.util.find_spec("pkcs11") is None:
        raise ConfigError(
            "an HSM is configured, but python-pkcs11 is not installed: install "
            "lmp-autoreg[hsm] (python3-python-pkcs11), or use --backend lmp-device-register"
        )


def _set_uuid(result: Result, settings: Settings, uuid: str) -> None:
    result.uuid = uuid
    result.name = settings.name or uuid
    log.add_fields(LMP_UUID=uuid, LMP_FACTORY=settings.factory)


def _dry_run(settings: Settings, result: Result, *, force: bool) -> Result:
    from . import client, identity

    pending = None if force else State(settings.paths).peek_identity()
    uuid, key = settings.uuid or random_uuid(), None
    if pending is not None and settings.uuid in (None, pending.uuid):
        uuid = pending.uuid
        LOG.info("would reuse the identity of an interrupted attempt: %s", pending.uuid)
        if pending.key_pem:
            try:
                key = identity.key_from_pem(pending.key_pem)
            except ValueError as e:
                LOG.warning("would not reuse the pending key of %s: %s", pending.uuid, e)
    _set_uuid(result, settings, uuid)
    preflight.warn(token_file=settings.token_place, production=settings.production)
    result.result = "dry-run"
    if settings.backend == "lmp-device-register":
        from . import backend_ldr

        result.request = backend_ldr.dry_run_request(settings, uuid)
        return result
    csr = identity.make_csr(key or identity.new_key(), uuid, settings.factory,
                            settings.production)
    result.request = {
        "method": "POST",
        "url": settings.device_api,
        "headers": client.request_headers(settings, redact=True),
        "body": client.request_body(
            settings, uuid=uuid, csr=csr, reset_apps_dir=settings.paths.reset_apps.is_dir()
        ),
    }
    return result


def _register(
    settings: Settings, state: State, result: Result, *, force: bool, deadline: Deadline
) -> Result:
    from . import client, identity, install

    paths = settings.paths
    check_aklite(paths)
    if force:
        # The previous registration stays until a new answer is verified (``_install``).
        state.abandon("--force")
    else:
        # Again, under the lock: another run may just have ended.
        guard.check_not_registered(paths.sota, str(paths.sota_device))
    state.sweep()

    journal = state.load_journal()
    if journal is not None and settings.uuid not in (None, journal.uuid):
        state.abandon(f"--uuid {settings.uuid}")
    elif journal is not None:
        _set_uuid(result, settings, journal.uuid)
        LOG.warning("an earlier run was interrupted while installing the answer for %s: "
                    "completing it", journal.uuid)
        try:
            if settings.hsm is not None and settings.backend == "native":
                plan = _verify_hsm_answer(settings, journal.files, journal.uuid)
            else:
                pem = journal.key_pem
                plan = install.verify_answer(
                    journal.files, uuid=journal.uuid,
                    key=identity.DeviceKey.from_pem(pem) if pem else None,
                )
        except (BadAnswer, ValueError) as e:  # ValueError: an unreadable key
            LOG.warning("the interrupted install cannot be completed: %s", e)
            state.abandon("asking the server again", keep_identity=True)
        else:
            return _install(settings, state, result, journal.files, plan)

    if settings.backend == "lmp-device-register":
        return _register_with_tool(settings, state, result, deadline, force=force)
    key: DeviceKey | None = None
    token_key: EllipticCurvePublicKey | None = None
    if settings.hsm is not None:
        ident, csr, token_key = _take_hsm_identity(settings, state, force=force)
    else:
        ident, key = _take_identity(settings, state)
        csr = identity.make_csr(key.key, ident.uuid, settings.factory, settings.production)
    uuid = ident.uuid
    _set_uuid(result, settings, uuid)
    LOG.info("registering %s as %s with factory %s", settings.hardware_id, uuid, settings.factory)
    preflight.warn(token_file=settings.token_place, production=settings.production)
    body = client.request_body(
        settings, uuid=uuid, csr=csr, reset_apps_dir=paths.reset_apps.is_dir()
    )
    testhook.pause("before-request")

    http = client.RegistrationClient(settings)

    def attempt(budget: float) -> tuple[dict[str, str], list[PlannedFile]]:
        files = http.post(body, timeout=budget)
        LOG.info("the server answered with %s; verifying", ", ".join(sorted(files)))
        if settings.hsm is not None:
            from .hsm import p11_section

            return files, install.verify_answer(files, uuid=uuid, key=None, token_key=token_key,
                                                p11=p11_section(settings.hsm))
        return files, install.verify_answer(files, uuid=uuid, key=key)

    what = f"sending the registration request to {settings.device_api}"
    LOG.info("%s", what)
    try:
        files, plan = retry(attempt, deadline, what=what)
    except ServerRefused as e:
        _drop_unused_token_key(settings, force=force)
        if e.status == 409 and ident.reused:
            raise ServerRefused(
                f"{e} (uuid {uuid} is the identity of an interrupted attempt, which the "
                "server may have registered then: delete that device on the server and run "
                "again, or run with --force to register with a new identity)",
                e.status,
            ) from e
        raise
    except AutoregError:
        _drop_unused_token_key(settings, force=force)
        raise
    finally:
        http.close()
    state.save_journal(uuid, key.pem if key is not None else None, files)
    return _install(settings, state, result, files, plan)


def _register_with_tool(
    settings: Settings, state: State, result: Result, deadline: Deadline, *, force: bool
) -> Result:
    """The lmp-device-register backend: the tool keeps the key, the agent keeps the uuid."""
    from . import backend_ldr

    ident = state.take_identity(settings.uuid, None)
    _set_uuid(result, settings, ident.uuid)
    preflight.warn(token_file=settings.token_place, production=settings.production)
    if force:  # the tool refuses to overwrite a registration: the old one goes first
        _remove_previous(settings.paths, frozenset())
    backend_ldr.register(settings, result, deadline=deadline)
    state.finish()
    return result


def _take_identity(settings: Settings, state: State) -> "tuple[Identity, DeviceKey]":
    """The pending identity, or a new one, with its key; an unreadable pending key is
    replaced. A new key is used as generated, never parsed back from its PEM."""
    from . import identity

    generated: list[identity.DeviceKey] = []

    def new_key() -> bytes:
        generated.append(identity.DeviceKey.generate())
        return generated[-1].pem

    ident = state.take_identity(settings.uuid, new_key)
    if generated:
        return ident, generated[-1]
    try:
        return ident, identity.DeviceKey.from_pem(ident.key_pem or b"")
    except ValueError as e:
        LOG.warning("the key of the pending identity %s cannot be read: %s", ident.uuid, e)
        state.abandon("an unreadable key")
        ident = state.take_identity(settings.uuid, new_key)
        return ident, generated[-1]


def _take_hsm_identity(
    settings: Settings, state: State, *, force: bool
) -> "tuple[Identity, str, EllipticCurvePublicKey]":
    """HSM mode: the identity, its key on the token (reused or generated there) and the
    CSR the token signed, with the key's public half.

    The key of the pending identity is reused while it is on the token: a retry, a kill
    after the key was made, or the next boot never makes a second ``tls`` key. A ``tls``
    key that no pending attempt made belongs to a registration (whose files may be gone):
    only ``--force`` replaces it, and only once the new certificate is verified (the new
    key is ``tls-next`` until then, ``hsm.TokenKey.promote``). Without ``--uuid`` and a
    pending identity, a uuid that a slot's description carries is the device's, as the C++
    tool takes it.
    """
    from . import hsm

    assert settings.hsm is not None
    pending = state.peek_identity()
    requested = settings.uuid
    if requested is None and pending is None:
        requested = hsm.slot_uuid(settings.hsm)
        if requested is not None:
            LOG.info("the PKCS#11 slot names the uuid %s: registering under it", requested)
    ours = pending is not None and pending.on_token
    same = ours and pending is not None and requested in (None, pending.uuid)
    with hsm.open_token(settings.hsm) as token:
        reused = token.pending_label() if same else None
        new = reused is None
        label = reused or hsm.KEY_LABEL
        if new:
            if token.has_key(hsm.KEY_LABEL) and not ours:
                if not force:
                    raise LocalFailure(
                        f"the token {hsm.TOKEN_LABEL} already holds a {hsm.KEY_LABEL!r} key "
                        "that no interrupted attempt made (an earlier registration's?): "
                        "run with --force to replace it and its certificate"
                    )
                label = hsm.NEXT_LABEL
        ident = state.take_identity(requested, None, on_token=True)
        if new:
            if label == hsm.KEY_LABEL:
                token.remove_key(hsm.NEXT_LABEL)
            token.generate(label)
        else:
            LOG.info("reusing the key %r on the token %s", label, hsm.TOKEN_LABEL)
        csr = token.make_csr(label, ident.uuid, settings.factory, settings.production)
        return ident, csr, token.public_key(label)


def _drop_unused_token_key(settings: Settings, *, force: bool) -> None:
    """A failed ``--force`` leaves the token as it found it: its new key goes (a next
    ``--force`` starts afresh anyway), the old key and certificate stay."""
    if settings.hsm is None or not force or settings.backend != "native":
        return
    from . import hsm

    try:
        with hsm.open_token(settings.hsm) as token:
            token.remove_key(hsm.NEXT_LABEL)
    except AutoregError as e:
        LOG.warning("cannot remove the unused key %r from the token: %s", hsm.NEXT_LABEL, e)


def _verify_hsm_answer(settings: Settings, files: dict[str, str], uuid: str) -> list[PlannedFile]:
    """Verify a journaled answer against the key on the token."""
    from . import hsm, install

    assert settings.hsm is not None
    with hsm.open_token(settings.hsm) as token:
        label = token.pending_label()
        if label is None:
            raise BadAnswer(f"the token {hsm.TOKEN_LABEL} holds no key for it")
        public = token.public_key(label)
    return install.verify_answer(files, uuid=uuid, key=None, token_key=public,
                                 p11=hsm.p11_section(settings.hsm))


def _store_on_token(settings: Settings, cert_pem: str) -> None:
    """HSM mode, the answer verified: the new key becomes ``tls`` (``--force``), and the
    certificate is stored on the token, before any file is written."""
    from . import hsm, identity

    assert settings.hsm is not None
    cert = identity.load_certificate(cert_pem)
    with hsm.open_token(settings.hsm) as token:
        token.promote()
        token.store_certificate(identity.certificate_der(cert), cert.subject.public_bytes())


def _remove_previous(paths: DevicePaths, keep: frozenset[str]) -> None:
    removed = remove_registration(paths.sota, keep)
    if removed:
        LOG.warning("removed the previous registration's %s", ", ".join(removed))


def _install(
    settings: Settings, state: State, result: Result, files: dict[str, str], plan: list[PlannedFile]
) -> Result:
    """Install a verified answer (the journal is saved), then drop the state."""
    from . import identity, install

    paths = settings.paths
    names = [item.name for item in plan]
    # What the new answer does not replace of an old registration (--force, or an install
    # completed from the journal) goes first: sota.toml, written last, must not appear
    # beside the old sql.db.
    _remove_previous(paths, frozenset(names))
    if settings.hsm is not None and settings.backend == "native":
        _store_on_token(settings, files["client.pem"])
    try:
        install.install(paths.sota, plan)
    except LocalFailure:
        LOG.warning("the server's answer is kept in %s: the next run installs it without "
                    "asking the server again", state.dir)
        raise
    state.finish()
    result.files = install.file_modes(paths.sota, names)
    result.certificate = identity.summary(identity.load_certificate(files["client.pem"]))
    result.result = "registered"
    LOG.info("registered: installed %s into %s", ", ".join(names), paths.sota)
    return result
