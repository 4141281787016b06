"""The kit's registration server and device gateway in a process of their own, for a
rehearsed factory line.

Its own process, so that the line can stop it as a factory's server stops (a restart
starts another from the same state directory, on the same ports) and can tell its CPU
time from the agents'. :class:`KitProcess` starts it (``multiprocessing``'s spawn: the line
has threads) and steers it over a pipe: :meth:`KitProcess.fault` scripts the chaos's
answers, :meth:`KitProcess.stop` ends it and returns what it did: the certificates it
issued (:class:`~lmp_autoreg.testing.report.Issued`), the devices its devices API holds,
and its CPU seconds.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import resource
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from lmp_autoreg.testing.report import Issued

LOG = logging.getLogger(__name__)
# Files every device of the line gets at its check-in when no --config-dir is given.
LINE_CONFIG = {"line.conf": "station=rehearsal\n", "motd": "Configured on the line.\n"}
# The longest the line waits for the kit process to start or to stop.
_STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class KitOptions:
    """How the kit's server runs: its factory and state directory, its ports (0: any),
    partially detached with a device group, the configuration directory, and the start
    of the line (``time.time()``) the issue times count from."""

    factory: str
    state_dir: Path
    started: float
    port: int = 0
    gateway_port: int = 0
    partially_detached: bool = False
    group: str | None = None
    config_dir: Path | None = None


@dataclass
class KitRun:
    """What one kit process did."""

    issued: list[Issued] = field(default_factory=list)
    api_devices: list[dict[str, Any]] = field(default_factory=list)
    cpu_seconds: float = 0.0


def fingerprint(pem: str) -> str:
    """A certificate's identity in the record: the SHA-256 of its PEM text."""
    return hashlib.sha256(pem.strip().encode("ascii")).hexdigest()


def _serve(conn: Connection, options: KitOptions) -> None:
    """The kit process: serve until the line says stop."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from lmp_autoreg.testing.ca import subject_value
    from lmp_autoreg.testing.configdir import serve_config
    from lmp_autoreg.testing.gateway import DeviceGateway
    from lmp_autoreg.testing.server import RegistrationServer, Reply

    issued: list[Issued] = []

    def recorder(lost: bool) -> Any:
        def record(files: dict[str, str]) -> dict[str, str]:
            pem = files["client.pem"]
            cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
            uuid = subject_value(cert.subject, NameOID.COMMON_NAME) or ""
            issued.append(Issued(uuid, fingerprint(pem), time.time() - options.started, lost))
            return files

        return record

    server = RegistrationServer(
        tls=True, factory=options.factory, port=options.port, state_dir=options.state_dir,
        gateway=DeviceGateway, gateway_port=options.gateway_port,
        partially_detached=options.partially_detached, device_group=options.group,
    )
    server.default = Reply(files=recorder(False))
    server.start()
    gateway = server.gateway
    assert isinstance(gateway, DeviceGateway)
    if options.config_dir is not None:
        serve_config(gateway, options.config_dir)
    else:
        gateway.set_config(None, LINE_CONFIG)
    conn.send({"url": server.url, "ca": str(server.ca_file), "port": server.port,
               "gateway_port": gateway.port})
    while True:
        command, argument = conn.recv()
        if command == "fault":
            server.enqueue(*(Reply(**spec, files=recorder(bool(spec.get("lost"))))
                             for spec in argument))
            conn.send(None)
        elif command == "stop":
            server.stop()
            devices = server.devices_api.devices() if server.devices_api is not None else []
            usage = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(KitRun(issued, [d.as_json() for d in devices],
                             usage.ru_utime + usage.ru_stime))
            return


class KitProcess:
    """The kit's server in its own process; see the module documentation."""

    def __init__(self, options: KitOptions) -> None:
        self.options = options
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, options),
                                        name="lmp-autoreg-line-kit", daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(_STARTUP_TIMEOUT):
            self._process.kill()
            raise RuntimeError("the kit's server did not start")
        ready = self._conn.recv()
        self.url: str = ready["url"]
        self.ca_file = Path(ready["ca"])
        self.port: int = ready["port"]
        self.gateway_port: int = ready["gateway_port"]

    def fault(self, *replies: dict[str, Any]) -> None:
        """Script the next registration answers: each a dict of
        :class:`~lmp_autoreg.testing.server.Reply` fields."""
        self._conn.send(("fault", list(replies)))
        self._conn.recv()

    def stop(self) -> KitRun:
        """Stop the server and its process; what it did."""
        self._conn.send(("stop", None))
        if not self._conn.poll(_STARTUP_TIMEOUT):
            self._process.kill()
            raise RuntimeError("the kit's server did not stop")
        run: KitRun = self._conn.recv()
        self._process.join(_STARTUP_TIMEOUT)
        return run
