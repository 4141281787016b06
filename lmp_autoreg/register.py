"""The registration itself, end to end, as one library function: ``register``.

The CLI is a thin layer over ``check_not_registered`` and ``register``. Heavy modules
(``cryptography``, ``requests``) are imported only once a registration really starts, so
the already-registered path stays cheap on a small board.
"""

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from . import guard, log
from .errors import AutoregError, ConfigError
from .install import remove_registration
from .paths import DevicePaths
from .settings import Settings
from .util import random_uuid

LOG = logging.getLogger(__name__)


@dataclass
class Result:
    """What happened, in the shape of SPEC section 6's JSON object."""

    result: str
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
    request: dict[str, Any] | None = field(default=None)  # dry-run only

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["request"] is None:
            del data["request"]
        return data


def check_not_registered(paths: DevicePaths) -> None:
    """Raise ``AlreadyRegistered`` (exit 3) when the device is registered: SPEC section 1."""
    guard.check_not_registered(paths.sota)


def _describe(settings: Settings, uuid: str) -> Result:
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
    and nothing is written.
    """
    paths = settings.paths
    if not force:
        check_not_registered(paths)
    if settings.hsm is not None and settings.backend == "native":
        raise ConfigError(
            f"an HSM is configured ({settings.hsm.module}): the native backend makes file "
            "keys only; use --backend lmp-device-register"
        )

    uuid = settings.uuid or random_uuid()
    log.add_fields(LMP_UUID=uuid, LMP_FACTORY=settings.factory)
    result = _describe(settings, uuid)
    try:
        _register(settings, result, dry_run=dry_run, force=force)
        if result.result == "registered":
            from .poststeps import run_post_steps

            run_post_steps(settings, result)
        return result
    except AutoregError as e:
        e.result = result
        raise


def _register(settings: Settings, result: Result, *, dry_run: bool, force: bool) -> Result:
    if settings.backend == "lmp-device-register":
        from . import backend_ldr

        return backend_ldr.register(settings, result, dry_run=dry_run, force=force)
    from . import client, identity, install

    paths = settings.paths
    uuid = result.uuid
    assert uuid is not None
    LOG.info("registering %s as %s with factory %s", settings.hardware_id, uuid, settings.factory)
    key = identity.new_key()
    csr = identity.make_csr(key, uuid, settings.factory, settings.production)
    body = client.request_body(
        settings, uuid=uuid, csr=csr, reset_apps_dir=paths.reset_apps.is_dir()
    )
    if dry_run:
        result.result = "dry-run"
        result.request = {
            "method": "POST",
            "url": settings.device_api,
            "headers": client.request_headers(settings, redact=True),
            "body": body,
        }
        return result

    if force:
        removed = remove_registration(paths.sota)
        if removed:
            LOG.warning("--force: removed the previous registration (%s)", ", ".join(removed))

    LOG.info("sending the registration request to %s", settings.device_api)
    http = client.RegistrationClient(settings)
    try:
        files = http.post(body, timeout=settings.timeout)
    finally:
        http.close()
    LOG.info("the server answered with %s; verifying", ", ".join(sorted(files)))
    key_pem = identity.key_to_pem(key)
    plan = install.verify_answer(files, uuid=uuid, key_pem=key_pem)
    install.install(paths.sota, plan)
    names = [item.name for item in plan]
    result.files = install.file_modes(paths.sota, names)
    result.certificate = identity.summary(identity.load_certificate(files["client.pem"]))
    result.result = "registered"
    LOG.info("registered: installed %s into %s", ", ".join(names), paths.sota)
    return result
