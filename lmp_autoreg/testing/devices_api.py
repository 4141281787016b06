"""The test kit's stand-in for the Foundries devices API (``/ota/devices/``).

A partially detached factory's registration server creates each device it signs in this
API before it answers the device (docs/spec.md section 8). ``RegistrationServer(
devices_api=True)`` serves it under ``/ota/devices/`` beside ``/sign``:

- every request needs the ``OSF-TOKEN`` header: 401 without it, 403 with another token;
- ``PUT /ota/devices/`` with a JSON object ``client.pem`` (a device certificate that the
  factory's device CA issued; the device's uuid is its CN), and optionally ``name`` and
  ``group`` (strings or null), creates the device: 201; a uuid it holds already: 409;
- ``GET /ota/devices/`` lists the devices, ``GET /ota/devices/<uuid>/`` shows one (404 for
  another uuid);
- any other request gets a 4xx; every answer is a JSON object, an error's text under
  ``message``, as the Foundries API words its errors.

The devices are kept in memory and, with a ``store`` file (``devices.json`` in the
server's state directory), written there atomically after each change and read back when
the API is made again, so a server restarted from its state directory keeps them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from lmp_autoreg.testing.ca import ThrowawayCA, subject_value

LOG = logging.getLogger(__name__)

PREFIX = "/ota/devices/"
TOKEN_HEADER = "OSF-TOKEN"
STORE = "devices.json"
#: The Foundries API's answer to a device it holds already (passed to the device as is).
CONFLICT = "Device already exists"


@dataclass(frozen=True)
class Device:
    """A device the API holds: its uuid (the certificate's CN), name, device group (None:
    none) and certificate serial (lowercase hex)."""

    uuid: str
    name: str
    group: str | None
    serial: str

    def as_json(self) -> dict[str, Any]:
        """The device as the API shows it (``device-group`` as the Foundries list names it,
        ``group`` as its single view does)."""
        return {"uuid": self.uuid, "name": self.name, "device-group": self.group,
                "group": None if self.group is None else {"name": self.group},
                "serial": self.serial}


class _Answer(Exception):
    """Stop here and answer ``status`` with ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"message": message}).encode("utf-8")


class DevicesAPI:
    """The devices API of one factory; see the module documentation.

    ``ca`` is the factory's PKI whose intermediate (the device CA) must have issued each
    certificate; ``token`` is the ``OSF-TOKEN`` it requires; ``store`` the file it keeps
    the devices in (None: memory only).
    """

    def __init__(self, ca: ThrowawayCA, token: str, store: str | Path | None = None) -> None:
        if not token:
            raise ValueError("the devices API needs a token")
        self.ca = ca
        self.token = token
        self.store = Path(store) if store is not None else None
        self._lock = threading.Lock()
        self._devices: dict[str, Device] = self._load()
        self._script: deque[tuple[int, bytes]] = deque()

    # -- what tests read and steer ----------------------------------------------------

    def devices(self) -> list[Device]:
        """Every device the API holds, in the order they were created."""
        with self._lock:
            return list(self._devices.values())

    def device(self, uuid: str) -> Device | None:
        with self._lock:
            return self._devices.get(uuid)

    def group_of(self, uuid: str | None) -> str | None:
        """The device group the API holds ``uuid`` in (None: none, or an unknown device)."""
        device = self.device(uuid) if uuid is not None else None
        return device.group if device is not None else None

    def script(self, *answers: tuple[int, str | bytes]) -> None:
        """Answer the next requests with these (status, body) pairs instead (faults: a
        503 for an API that is down, say), one per request, whatever the request."""
        with self._lock:
            self._script.extend(
                (status, body.encode("utf-8") if isinstance(body, str) else body)
                for status, body in answers
            )

    # -- serving ------------------------------------------------------------------------

    def answer(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, bytes]:
        """The status and JSON body for one request under :data:`PREFIX`."""
        with self._lock:
            if self._script:
                return self._script.popleft()
        try:
            return self._answer(method, path.split("?", 1)[0], headers, body)
        except _Answer as answer:
            return _error(answer.status, answer.message)

    def _answer(self, method: str, path: str, headers: Mapping[str, str],
                body: bytes) -> tuple[int, bytes]:
        sent = headers.get(TOKEN_HEADER)
        if not sent:
            raise _Answer(401, f"Missing {TOKEN_HEADER} header")
        if sent != self.token:
            raise _Answer(403, "Invalid token: it may not create or read devices")
        rest = path[len(PREFIX):]
        if rest and method == "GET":
            uuid, slash, tail = rest.partition("/")
            device = self.device(uuid) if slash and not tail else None
            if device is None:
                raise _Answer(404, "Not found")
            return 200, json.dumps(device.as_json()).encode("utf-8")
        if rest:
            raise _Answer(405, "Method not allowed")
        if method == "GET":
            listed = [d.as_json() for d in self.devices()]
            return 200, json.dumps({"devices": listed, "total": len(listed),
                                    "next": None}).encode("utf-8")
        if method != "PUT":
            raise _Answer(405, "Method not allowed")
        device = self._device_of(body)
        with self._lock:
            if device.uuid in self._devices:
                raise _Answer(409, CONFLICT)
            self._devices[device.uuid] = device
            self._save()
        LOG.info("devices API: created %s in group %s", device.uuid, device.group)
        return 201, json.dumps(device.as_json()).encode("utf-8")

    def _device_of(self, body: bytes) -> Device:
        """The device a PUT's body describes; an :class:`_Answer` 400 when it describes none."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise _Answer(400, "The body is not JSON") from error
        if not isinstance(data, dict):
            raise _Answer(400, "The body is not a JSON object")
        pem = data.get("client.pem")
        if not isinstance(pem, str) or not pem:
            raise _Answer(400, "Missing required field 'client.pem' (a string)")
        for key in ("name", "group"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise _Answer(400, f"Invalid data type for '{key}': not a string")
        cert = self._certificate(pem)
        uuid = subject_value(cert.subject, NameOID.COMMON_NAME)
        if not uuid:
            raise _Answer(400, "The certificate has no common name (the device's uuid)")
        return Device(uuid=uuid, name=data.get("name") or uuid, group=data.get("group") or None,
                      serial=format(cert.serial_number, "x"))

    def _certificate(self, pem: str) -> x509.Certificate:
        """``pem`` parsed, when the factory's device CA issued it."""
        try:
            cert = x509.load_pem_x509_certificate(pem.encode("utf-8", "surrogatepass"))
        except ValueError as error:
            raise _Answer(400, f"Invalid client.pem: {error}") from error
        try:
            cert.verify_directly_issued_by(self.ca.intermediate)
        except (ValueError, TypeError, InvalidSignature) as error:
            raise _Answer(400, "Invalid client.pem: not issued by the factory's device CA"
                          ) from error
        return cert

    # -- keeping the devices --------------------------------------------------------------

    def _load(self) -> dict[str, Device]:
        """The devices of the store; ValueError when it holds something else (it is
        never overwritten then)."""
        if self.store is None or not self.store.exists():
            return {}
        try:
            saved = json.loads(self.store.read_text(encoding="utf-8"))
            return {d["uuid"]: Device(**d) for d in saved["devices"]}
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{self.store} does not hold a list of devices: {error!r}"
                             ) from error

    def _save(self) -> None:
        """Write the devices to the store atomically (a temporary file, fsync, rename);
        the caller holds the lock."""
        if self.store is None:
            return
        tmp = self.store.with_name(f".{self.store.name}.tmp-{os.getpid()}")
        text = json.dumps({"devices": [asdict(d) for d in self._devices.values()]}, indent=1)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.store)
        fd = os.open(self.store.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
