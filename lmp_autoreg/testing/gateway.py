"""A loopback device gateway for tests: the ``/config`` endpoint fioconfig checks in with.

It serves HTTPS and requires a client certificate issued by the factory's device CA (the
kit's :class:`~lmp_autoreg.testing.ca.ThrowawayCA`); a device is known by its
certificate's CN (its uuid). As the Foundries device gateway does for fioconfig:

- ``GET /config`` answers 200 with a JSON object of file name ->
  ``{"Value", "OnChanged", "Unencrypted"}``, each value encrypted (ECIES,
  :mod:`lmp_autoreg.testing.ecies`, base64) to the public key of the certificate the
  device presented, unless the file is marked plain; 204 when the device has no
  configuration; 304 when the request's ``If-Modified-Since`` is not older than the
  configuration. A 200 carries ``Date``, which fioconfig gives its ``config.encrypted``.
- ``PATCH /config`` (fioconfig built with ``vpn`` sends its initial device data) is
  recorded and answered 201.

Fault knobs: :meth:`DeviceGateway.enqueue` takes the registration server's
:class:`~lmp_autoreg.testing.server.Reply` objects (a status such as 503, ``delay`` for a
hang, ``close`` to hang up without an answer, ``body``), one per request; a device whose
certificate another CA issued (``device_ca``: accept only that CA's devices) fails the TLS
handshake. ``listening=False`` binds the port
without listening, so connections are refused (a fully detached factory has no gateway).
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lmp_autoreg.testing._realdisk import real_disk
from lmp_autoreg.testing.ca import ThrowawayCA, subject_value
from lmp_autoreg.testing.ecies import encrypt
from lmp_autoreg.testing.server import (
    _WILDCARDS,
    RecordedRequest,
    Reply,
    _Handler,
    _HTTPServer,
    _Loopback,
    url_host,
)

LOG = logging.getLogger(__name__)

CONFIG_PATH = "/config"


@dataclass(frozen=True)
class ConfigFile:
    """One file of a device's configuration: its content, the command fioconfig runs when
    it changes (``on_changed``: argv), and whether it is sent in clear."""

    value: str
    on_changed: tuple[str, ...] = ()
    unencrypted: bool = False


@dataclass(frozen=True)
class GatewayRequest:
    """A request as the gateway received it, with the CN of the device's certificate."""

    request: RecordedRequest
    device: str | None


def config_answer(
    files: Mapping[str, ConfigFile], public_key: ec.EllipticCurvePublicKey
) -> dict[str, dict[str, object]]:
    """The JSON object of a 200: each value encrypted to ``public_key`` unless plain."""
    answer: dict[str, dict[str, object]] = {}
    for name, file in files.items():
        raw = file.value.encode("utf-8")
        value = raw if file.unencrypted else base64.b64encode(encrypt(public_key, raw))
        answer[name] = {
            "Value": value.decode("utf-8"),
            "OnChanged": list(file.on_changed),
            "Unencrypted": file.unencrypted,
        }
    return answer


def not_modified(if_modified_since: str | None, modified: float) -> bool:
    """Whether ``If-Modified-Since`` is not older than ``modified`` (whole seconds)."""
    if not if_modified_since:
        return False
    try:
        since = email.utils.parsedate_to_datetime(if_modified_since.replace("UTC", "GMT"))
    except (TypeError, ValueError):
        return False
    return since.timestamp() >= int(modified)


Config = tuple[dict[str, ConfigFile], float]


def _config(files: Mapping[str, ConfigFile | str]) -> dict[str, ConfigFile]:
    return {name: file if isinstance(file, ConfigFile) else ConfigFile(file)
            for name, file in files.items()}


def _merged(*layers: Config | None) -> Config | None:
    """The layers' files, a later layer's file winning where names collide, as of the
    latest layer; None where there is no layer. Foundries merges a device's configuration
    this way: the fleet's files, its group's, then its own."""
    present = [layer for layer in layers if layer is not None]
    if not present:
        return None
    files: dict[str, ConfigFile] = {}
    for layer in present:
        files.update(layer[0])
    return files, max(layer[1] for layer in present)


class _GatewayHandler(_Handler):
    def do_PATCH(self) -> None:
        self.server.kit._handle(self)


class DeviceGateway(_Loopback):
    """The device gateway on a loopback port, served from a background thread; see the
    module documentation. Use it as a context manager or :meth:`start` / :meth:`stop`."""

    _what = "gateway"
    _handler_class = _GatewayHandler

    def __init__(
        self,
        ca: ThrowawayCA,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_names: Iterable[str] = (),
        listening: bool = True,
        device_ca: ThrowawayCA | None = None,
        group_of: Callable[[str | None], str | None] | None = None,
    ) -> None:
        self.ca = ca
        self.host = host
        self.listening = listening
        self._port = port
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._configs: dict[str | None, Config] = {}
        self._groups: dict[str, Config] = {}
        #: The device group of a uuid (the registration server's devices API), for the
        #: files of :meth:`set_group_config`.
        self.group_of = group_of
        self._queue: deque[Reply] = deque()
        self._requests: list[GatewayRequest] = []
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        names = list(tls_names)
        #: The host ``url`` names: ``host``, or for a wildcard the first of ``tls_names``.
        self.public_host = host if host not in _WILDCARDS else (names or [host])[0]
        with real_disk():
            self._tmpdir = Path(tempfile.mkdtemp(prefix="lmp-autoreg-gateway-"))
            self._ssl = self._tls_context(ca, host, names, "gateway")
        self._ssl.verify_mode = ssl.CERT_REQUIRED  # only devices of this factory
        devices = device_ca or ca
        self._ssl.load_verify_locations(cadata=devices.cert_pem + devices.intermediate_pem)

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Self:
        httpd = self._bind(self.host, self._port, self._ssl)
        if self.listening:
            httpd.server_activate()
            self._thread = threading.Thread(
                target=lambda: httpd.serve_forever(poll_interval=0.05),
                name="lmp-autoreg-gateway",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._close(self._thread is not None, [self._thread] if self._thread else [])
        self._remove_files()

    # -- what tests read and steer ----------------------------------------------------

    @property
    def url(self) -> str:
        """The gateway's base URL, as ``tls.server`` in ``sota.toml`` names it."""
        return f"https://{url_host(self.public_host)}:{self.port}"

    def set_config(
        self, device: str | None, files: Mapping[str, ConfigFile | str]
    ) -> None:
        """Give ``device`` (a uuid; None: every device) these files, as of now; a device
        gets every device's files, its group's, then its own, a later one winning where
        names collide. A ``str`` is an encrypted file without a handler. No file: 204."""
        with self._lock:
            self._configs[device] = (_config(files), time.time())

    def set_group_config(self, group: str, files: Mapping[str, ConfigFile | str]) -> None:
        """Give the devices of ``group`` (as ``group_of`` has them) these files on top of
        those of every device (``set_config(None, ...)``), under a device's own, as of
        now."""
        with self._lock:
            self._groups[group] = (_config(files), time.time())

    def enqueue(self, *replies: Reply) -> None:
        """Script the next requests' replies (faults), one per request."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def requests(self) -> list[GatewayRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def patches(self) -> list[GatewayRequest]:
        """The ``PATCH /config`` requests: a device's initial data."""
        return [r for r in self.requests if r.request.method == "PATCH"]

    def wait_for(self, count: int, *, timeout: float = 30.0) -> list[GatewayRequest]:
        """Wait until ``count`` requests have arrived (a bound, not a window)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self._requests) >= count, timeout):
                raise TimeoutError(f"{len(self._requests)} gateway requests, not {count}")
            return list(self._requests)

    # -- serving ----------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        record = handler.record()
        der = handler.request.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der)
        device = subject_value(cert.subject, NameOID.COMMON_NAME)
        group = self.group_of(device) if self.group_of is not None else None
        with self._lock:
            self._requests.append(GatewayRequest(record, device))
            self._arrived.notify_all()
            reply = self._queue.popleft() if self._queue else None
            config = _merged(self._configs.get(None),
                             self._groups.get(group) if group else None,
                             self._configs.get(device) if device is not None else None)
        if reply is not None:
            if self._hang_up(handler, reply):
                return
            if reply.body is not None or not 200 <= reply.status < 300:
                raw = reply.body if reply.body is not None else b"gateway fault"
                raw = raw.encode("utf-8") if isinstance(raw, str) else raw
                handler.send_bytes(reply.status, raw, "text/plain; charset=utf-8", reply.headers)
                return
        status, payload = self._answer(record, config, cert.public_key())
        LOG.info("gateway: %s %s from %s -> %d", record.method, record.path, device, status)
        kind = "application/json" if status == 200 else "text/plain; charset=utf-8"
        handler.send_bytes(status, payload, kind, {})

    @staticmethod
    def _answer(
        record: RecordedRequest,
        config: Config | None,
        public_key: object,
    ) -> tuple[int, bytes]:
        if record.path.split("?", 1)[0] != CONFIG_PATH:
            return 404, b"Not Found"
        if record.method == "PATCH":
            return 201, b""
        if record.method != "GET":
            return 405, b"Method Not Allowed"
        if config is None or not config[0]:
            return 204, b""
        files, modified = config
        if not_modified(record.headers.get("If-Modified-Since"), modified):
            return 304, b""
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            return 400, b"the device's key is not an EC key"
        return 200, json.dumps(config_answer(files, public_key)).encode("utf-8")
