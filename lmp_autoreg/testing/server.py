"""A loopback device registration server for tests: a faithful factory-registration-ref.

It speaks the ``/sign`` protocol of the factory's registration service (docs/spec.md sections 2
and 8) the way the reference server does: a JSON POST with the device's CSR, answered by
HTTP 201 and a JSON object mapping file names to contents, signed by a two-level factory
PKI; ``HEAD`` answers 405, a request that is not JSON 415, and its refusals are plain text
in the reference server's words. Each of those behaviours has a knob for a test that needs
the other answer (a Foundries API that accepts ``group``, say). Tests steer it with
scripted :class:`Reply` objects to produce the faults an agent must survive: error codes,
slow answers, broken bodies, bad files.

Everything it serves is built in memory; the only disk files (the CA certificate and,
for HTTPS, the server's certificate and key) are written to a real temporary directory
when the server is created and removed when it stops, so a test may switch pyfakefs on
while the server runs. With ``state_dir`` the CA lives in that directory instead and
outlives the server (``python -m lmp_autoreg.testing serve``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lmp_autoreg.testing._realdisk import real_disk
from lmp_autoreg.testing.ca import ROOT_CERT, ThrowawayCA, subject_value
from lmp_autoreg.testing.devices_api import PREFIX as API_PREFIX
from lmp_autoreg.testing.devices_api import STORE, DevicesAPI
from lmp_autoreg.testing.oauth import PREFIX as OAUTH_PREFIX
from lmp_autoreg.testing.oauth import OAuthAuthority
from lmp_autoreg.testing.upstream import create_device

LOG = logging.getLogger(__name__)

# Where the sota.toml sends aktualizr-lite: a factory's device gateway and OSTree server.
GATEWAY_SERVER = "https://ota-lite.foundries.io:8443"
OSTREE_SERVER = "https://ostree.foundries.io:8443"
GROUP_REFUSAL = "Registration-reference does not support 'group' field"
# Longest time stop() waits for handler threads that are still writing an answer.
_JOIN_TIMEOUT = 5.0
# A client that connects but sends nothing is dropped after this many seconds.
_HANDLER_SOCKET_TIMEOUT = 10.0
# Hosts that listen on every address: not a name a certificate or URL can carry.
_WILDCARDS = ("0.0.0.0", "::")

FilesEdit = Callable[[dict[str, str]], dict[str, str]]
# Answers the requests under a path prefix: (method, path, headers, body) -> status, JSON.
Mount = Callable[[str, str, "Headers", bytes], tuple[int, bytes]]


class Gateway(Protocol):
    """What the server needs of a device gateway (``lmp_autoreg.testing.gateway``)."""

    @property
    def url(self) -> str: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...


class Headers(Mapping[str, str]):
    """Request headers with case-insensitive lookup; iteration keeps the sent spelling."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        for name, value in items:
            self._items[name.lower()] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({dict(self._items.values())!r})"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it.

    ``time`` is ``time.monotonic()`` at arrival, so differences between requests measure
    an agent's retry delays. ``json`` is the parsed body when it is a JSON object.
    """

    method: str
    path: str
    headers: Headers
    body: bytes
    json: dict[str, Any] | None
    time: float


@dataclass
class Reply:
    """How the server answers one request.

    - ``status``: the HTTP status. With ``body=None`` and a 2xx status the server does its
      normal work (the reference server's checks, the token check, signing) and sends the
      file dict; its own check failures (4xx, 500) win over ``status``. With
      ``body=None`` and any other status it sends the status's reason phrase as plain text.
    - ``delay``: seconds to wait before answering (to outlast a client timeout). Stopping
      the server ends the wait and closes the connection without an answer.
    - ``body``: send these bytes (str is UTF-8 encoded) instead of the normal answer,
      as ``text/plain`` unless ``headers`` sets a Content-Type.
    - ``files``: a function given the normal answer's dict (file name -> content) that
      returns the dict to send, e.g. ``lambda f: {**f, "sota.toml": ""}``.
    - ``headers``: extra response headers (e.g. ``{"Retry-After": "1"}``).
    - ``truncate``: announce the full Content-Length but send only this many body bytes,
      then close the connection.
    - ``close``: read the request, then close the connection without any answer.
    - ``pace``: send the status line and headers at once, then the body one byte every
      ``pace`` seconds (a server or link that trickles: each read gets a byte in time, the
      whole answer takes for ever). Stopping the server ends the trickle.
    - ``wrong_key``: replace ``client.pem`` (and ``client.chained``) with a certificate of
      the same subject signed by the same CA, but for a key the device does not hold.
    - ``wrong_cn``: replace ``client.pem`` (and ``client.chained``) with a certificate for
      the device's own key, signed by the same CA, whose CN is another (random) uuid.
    - ``lost``: do the normal work (sign, and create the device in a partially detached
      factory), then close the connection without the answer: a lost answer.
    """

    status: int = 201
    delay: float = 0.0
    body: bytes | str | None = None
    files: FilesEdit | None = None
    headers: dict[str, str] = field(default_factory=dict)
    truncate: int | None = None
    close: bool = False
    pace: float = 0.0
    wrong_key: bool = False
    wrong_cn: bool = False
    lost: bool = False

    @classmethod
    def error(cls, status: int, message: str) -> Reply:
        """An error answer whose body is ``message`` as plain text (no JSON)."""
        return cls(status=status, body=message)

    @classmethod
    def html_500(cls) -> Reply:
        """A 500 with an HTML page, as a broken proxy or web server would send."""
        page = (
            "<!DOCTYPE html>\n<html><head><title>500 Internal Server Error</title></head>\n"
            "<body><h1>Internal Server Error</h1></body></html>\n"
        )
        return cls(status=500, body=page, headers={"Content-Type": "text/html; charset=utf-8"})

    @classmethod
    def give_up(cls) -> Reply:
        """A 503 whose ``Retry-After`` (an hour) reaches past any deadline: the agent gives
        up at once. It ends a fault "always" at a point the test decides, not at a
        deadline that races the agent's start-up."""
        return cls(status=503, body="maintenance", headers={"Retry-After": "3600"})

    @classmethod
    def not_json(cls) -> Reply:
        """A 201 whose body claims to be JSON but is not."""
        return cls(
            status=201,
            body="registered, but this is not JSON",
            headers={"Content-Type": "application/json"},
        )

    @classmethod
    def without(cls, *names: str) -> Reply:
        """The normal 201 answer with the named files left out."""
        dropped = frozenset(names)
        return cls(files=lambda files: {k: v for k, v in files.items() if k not in dropped})

    @classmethod
    def bad_name(cls, name: str = "../evil", content: str = "x\n") -> Reply:
        """The normal 201 answer plus a file whose name an agent must refuse."""
        return cls(files=lambda files: {**files, name: content})

    @classmethod
    def other_key(cls) -> Reply:
        """The normal 201 answer with a ``client.pem`` for a key the device does not hold."""
        return cls(wrong_key=True)

    @classmethod
    def other_cn(cls) -> Reply:
        """The normal 201 answer with a ``client.pem`` for the device's key but another CN."""
        return cls(wrong_cn=True)

    @classmethod
    def truncated(cls, nbytes: int = 64) -> Reply:
        """The normal 201 answer cut off after ``nbytes`` bytes of body."""
        return cls(truncate=nbytes)

    @classmethod
    def hang(cls, seconds: float) -> Reply:
        """The normal answer, sent only after ``seconds`` (longer than a client timeout)."""
        return cls(delay=seconds)


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (fine for the paths and URLs the server writes)."""
    return json.dumps(value, ensure_ascii=False)


def sota_toml(
    hardware_id: str,
    overrides: Mapping[str, Mapping[str, str]] | None = None,
    sota_dir: str = "/var/sota",
    gateway: str = GATEWAY_SERVER,
) -> str:
    """The ``sota.toml`` the reference server writes for a device.

    Its base configuration (the sections ``tls``, ``provision``, ``uptane``, ``pacman``,
    ``storage`` and ``import``, in that order) takes the request's overrides: a value is a
    TOML literal pasted in as it is, a key the section lacks is appended to it, a section
    the base lacks is appended to the file. An empty value means "not set" and becomes a
    comment, so the file is valid TOML whatever the overrides. ``gateway`` is the device
    gateway's URL (``tls.server``).
    """
    q = toml_string
    ostree = OSTREE_SERVER
    sections: dict[str, dict[str, str]] = {
        "tls": {
            "server": q(gateway),
            "ca_source": q("file"),
            "pkey_source": q("file"),
            "cert_source": q("file"),
        },
        "provision": {"server": q(gateway), "primary_ecu_hardware_id": q(hardware_id)},
        "uptane": {"repo_server": q(f"{gateway}/repo"), "key_source": q("file")},
        "pacman": {"type": q("ostree+compose_apps"), "ostree_server": q(f"{ostree}/ostree")},
        "storage": {"type": q("sqlite"), "path": q(f"{sota_dir}/")},
        "import": {
            "tls_cacert_path": q(f"{sota_dir}/root.crt"),
            "tls_pkey_path": q(f"{sota_dir}/pkey.pem"),
            "tls_clientcert_path": q(f"{sota_dir}/client.pem"),
        },
    }
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    blocks = []
    for section, values in sections.items():
        lines = [f"[{section}]"]
        for key, value in values.items():
            lines.append(f"{key} = {value}" if value else f"# {key} is not set")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


class _Refusal(Exception):
    """A check failed: answer ``status`` with ``message`` as plain text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _overrides(value: object) -> dict[str, dict[str, str]]:
    """The request's overrides; anything but sections of string values is a 500.

    The reference server does not check them: it fails on the first value it cannot
    paste, an uncaught error (HTTP 500).
    """
    if not value:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(section, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in section.items())
        for section in value.values()
    ):
        raise _Refusal(500, "Internal Server Error")
    return value


def _is_json_type(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON (``application/json`` or ``.../something+json``)."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


class _HTTPServer(ThreadingHTTPServer):
    """Serves with one daemon thread per connection; the threads are tracked for stop()."""

    daemon_threads = True
    kit: _Loopback

    def __init__(self, address: tuple[str, int], kit: _Loopback) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.kit = kit
        self.handler_threads: list[threading.Thread] = []
        self.threads_lock = threading.Lock()
        super().__init__(address, _Handler, bind_and_activate=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="lmp-autoreg-kit-handler",
            daemon=True,
        )
        with self.threads_lock:
            self.handler_threads = [t for t in self.handler_threads if t.is_alive()]
            self.handler_threads.append(thread)
        thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out, hang up, or refuse our certificate are expected in fault
        # tests; anything else is a bug in the kit and is logged with its traceback.
        if isinstance(sys.exc_info()[1], OSError):
            LOG.debug("connection from %s ended with an error", client_address, exc_info=True)
        else:
            LOG.error("test server failed on a request from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = _HANDLER_SOCKET_TIMEOUT
    server_version = "lmp-autoreg-testing"

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            # The listening socket does not handshake on accept (that would block the
            # accept loop); each connection does it in its own thread.
            self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Stay quiet: tests read ``RegistrationServer.requests`` instead."""

    def do_POST(self) -> None:
        self.server.kit._handle(self)

    def do_GET(self) -> None:
        self.server.kit._handle(self)

    def do_PUT(self) -> None:
        self.server.kit._handle(self)

    def do_HEAD(self) -> None:
        self.server.kit._handle(self)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def record(self) -> RecordedRequest:
        """Read the request's body: the request as it arrived."""
        body = self.read_body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        return RecordedRequest(
            method=self.command,
            path=self.path,
            headers=Headers(self.headers.items()),
            body=body,
            json=parsed if isinstance(parsed, dict) else None,
            time=time.monotonic(),
        )

    def send_bytes(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: Mapping[str, str],
        truncate: int | None = None,
        pace: float = 0.0,
        stopping: threading.Event | None = None,
    ) -> None:
        self.close_connection = True
        self.send_response(status)
        extra = {k.lower(): (k, v) for k, v in headers.items()}
        if "content-type" not in extra:
            self.send_header("Content-Type", content_type)
        for name, value in extra.values():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            pass
        elif pace > 0 and stopping is not None:
            self.wfile.flush()
            for byte in body if truncate is None else body[:truncate]:
                if stopping.wait(pace):
                    return
                self.wfile.write(bytes((byte,)))
                self.wfile.flush()
        else:
            self.wfile.write(body if truncate is None else body[:truncate])
        self.wfile.flush()


def url_host(host: str) -> str:
    """``host`` as a URL names it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


class _Loopback(ABC):
    """What the registration server and the device gateway share: a port served by
    :class:`_HTTPServer`, TLS files in a real temporary directory, and the life cycle
    (:meth:`start` / :meth:`stop` or a context manager)."""

    #: How :attr:`port` names the service when it is asked before :meth:`start`.
    _what = "server"
    _handler_class: type[_Handler] = _Handler
    _httpd: _HTTPServer | None
    _tmpdir: Path
    _stopping: threading.Event

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def _handle(self, handler: _Handler) -> None: ...

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError(f"the {self._what} is not started")
        return int(self._httpd.server_address[1])

    def _tls_context(
        self, ca: ThrowawayCA, host: str, tls_names: Iterable[str], stem: str
    ) -> ssl.SSLContext:
        """A server context for a certificate of ``ca`` that names ``host`` (unless a
        wildcard), the loopback names and ``tls_names``; its certificate and key (0600) are
        written to the temporary directory as ``stem``.crt and .key (call under
        ``real_disk()``)."""
        hosts = ["127.0.0.1", "localhost", "::1", *tls_names]
        if host not in _WILDCARDS:
            hosts.insert(0, host)
        cert_pem, key_pem = ca.server_cert(hosts)
        cert_file = self._tmpdir / f"{stem}.crt"
        key_file = self._tmpdir / f"{stem}.key"
        cert_file.write_text(cert_pem, encoding="ascii")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
        return context

    def _bind(self, host: str, port: int, context: ssl.SSLContext | None) -> _HTTPServer:
        """Bind the port (not listening yet), wrapped in ``context`` when there is one."""
        httpd = _HTTPServer((host, port), self)
        httpd.RequestHandlerClass = self._handler_class
        try:
            httpd.server_bind()
        except BaseException:
            httpd.server_close()
            raise
        if context is not None:
            httpd.socket = context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._httpd = httpd
        return httpd

    def _close(self, serving: bool, threads: Iterable[threading.Thread]) -> None:
        """Stop serving, close the port, and wait (at most ``_JOIN_TIMEOUT`` in all) for
        ``threads`` and the handler threads still writing an answer."""
        httpd = self._httpd
        if httpd is not None:
            if serving:
                httpd.shutdown()
            httpd.server_close()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        handlers = list(httpd.handler_threads) if httpd is not None else []
        for thread in [*threads, *handlers]:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _remove_files(self) -> None:
        with real_disk():
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _hang_up(self, handler: _Handler, reply: Reply) -> bool:
        """Wait out ``reply.delay``; whether the connection is to close without an answer
        (``reply.close``, or the server stopped during the wait)."""
        if (reply.delay > 0 and self._stopping.wait(reply.delay)) or reply.close:
            handler.close_connection = True
            return True
        return False


class RegistrationServer(_Loopback):
    """A registration server on a loopback port, served from a background thread.

    Use it as a context manager or call :meth:`start` and :meth:`stop`. See the module
    documentation and :class:`Reply` for the behaviour and the fault knobs. The knobs that
    turn a reference behaviour off: ``factory=None`` (any OU), ``accept_group=True`` (as
    the Foundries API does), ``check_content_type=False`` (a body is read as JSON whatever
    its Content-Type) and ``head_status`` (the answer to ``HEAD``, 405 by default).

    A partially detached factory (docs/testing.md): ``devices_api=True`` also serves the
    Foundries devices API under ``/ota/devices/`` (:attr:`devices_api`, requiring
    ``api_token``, random when None); ``partially_detached=True`` makes ``/sign`` create
    each device in that API (or in the one at ``upstream_api``, with ``api_token``) in
    ``device_group`` before it answers.
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        factory: str | None = "acme",
        token: str | None = None,
        token_header: str = "OSF-TOKEN",
        accept_group: bool = False,
        check_content_type: bool = True,
        head_status: int = 405,
        host: str = "127.0.0.1",
        port: int = 0,
        listen_delay: float | None = 0.0,
        path: str = "/sign",
        state_dir: str | Path | None = None,
        tls_names: Iterable[str] = (),
        oauth: OAuthAuthority | None = None,
        gateway: Callable[..., Gateway] | None = None,
        gateway_port: int = 0,
        devices_api: bool = False,
        api_token: str | None = None,
        partially_detached: bool = False,
        device_group: str | None = None,
        upstream_api: str | None = None,
    ) -> None:
        if partially_detached and upstream_api is not None and not api_token:
            raise ValueError("a partially detached server needs the upstream API's token")
        self.tls = tls
        #: The OAuth device authorization endpoints under /oauth (testing/oauth.py); with
        #: them, a registration needs the token or a bearer token they issued.
        self.oauth = oauth
        self.factory = factory
        self.token = token
        self.token_header = token_header
        self.accept_group = accept_group
        self.check_content_type = check_content_type
        self.head_status = head_status
        self.host = host
        self.listen_delay = listen_delay
        self.path = path
        self._port = port
        #: Answer 409 "Device already exists" to a uuid this server already registered.
        self.reject_duplicates = False
        #: The reply used once the queue of scripted replies is empty.
        self.default = Reply()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._registered: dict[str, str] = {}
        self._stopping = threading.Event()
        self._serving = False
        #: ``time.monotonic()`` when the port started listening (None until then).
        self.listening_since: float | None = None
        #: Set once the port listens: ``server.listening.wait()`` instead of polling.
        self.listening = threading.Event()
        self._started = False
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._ssl: ssl.SSLContext | None = None
        with real_disk():
            self._tmpdir = Path(tempfile.mkdtemp(prefix="lmp-autoreg-kit-"))
        try:  # a server never made leaves no files behind
            with real_disk():
                if state_dir is None:
                    self.ca = ThrowawayCA(factory)
                    #: The root certificate, for the agent's ``--cacert``.
                    self.ca_file = self.ca.write_ca(self._tmpdir / "ca.crt")
                else:
                    self.ca = ThrowawayCA.load_or_create(state_dir, factory)
                    self.ca_file = Path(state_dir) / ROOT_CERT
                if tls:
                    self._ssl = self._tls_context(self.ca, host, tls_names, "server")
            #: The devices API under /ota/devices/ (``lmp_autoreg.testing.devices_api``), served
            #: with ``devices_api=True`` or by a partially detached server without an upstream
            #: API; its devices are kept in the state directory's ``devices.json``.
            self.devices_api: DevicesAPI | None = None
            if devices_api or (partially_detached and upstream_api is None):
                store = Path(state_dir) / STORE if state_dir is not None else None
                self.devices_api = DevicesAPI(self.ca, api_token or secrets.token_hex(16), store)
            self.partially_detached = partially_detached
            self.device_group = device_group
            self.upstream_api = upstream_api
            self.api_token = api_token or (self.devices_api.token if self.devices_api else None)
            self._mounts: list[tuple[str, Mount]] = []
            if oauth is not None:
                self._mounts.append((OAUTH_PREFIX + "/", oauth.answer))
            if self.devices_api is not None:
                self._mounts.append((API_PREFIX, self.devices_api.answer))
            #: With ``gateway=DeviceGateway`` (``lmp_autoreg.testing.gateway``): the device
            #: gateway that the ``sota.toml`` it sends names in ``tls.server``, made with the
            #: same CA, host and names and the devices API's groups (``group_of``), started
            #: and stopped with the server.
            self.gateway: Gateway | None = None
            if gateway is not None:
                self.gateway = gateway(self.ca, host=host, port=gateway_port, tls_names=tls_names,
                                       group_of=self._group_of)
        except BaseException:
            self._remove_files()
            raise

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Bind the port; listen now, after ``listen_delay`` seconds in a thread, or, when
        ``listen_delay`` is None, once :meth:`listen` is called."""
        if self._started:
            raise RuntimeError("a RegistrationServer can be started only once")
        self._started = True
        if self.gateway is not None:
            self.gateway.start()
        self._bind(self.host, self._port, self._ssl)
        if self.listen_delay is None:
            pass
        elif self.listen_delay <= 0:
            self._activate()
        else:
            self._spawn(self._activate_later, "lmp-autoreg-kit-listen")
        return self

    def listen(self) -> None:
        """Start listening now (a port bound with ``listen_delay=None`` refuses until then)."""
        if self._httpd is None:
            raise RuntimeError("the server is not started")
        self._activate()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _activate_later(self) -> None:
        assert self.listen_delay is not None
        if not self._stopping.wait(self.listen_delay):
            self._activate()

    def _activate(self) -> None:
        httpd = self._httpd
        assert httpd is not None
        with self._lock:
            if self._stopping.is_set() or self._serving:
                return
            httpd.server_activate()
            self.listening_since = time.monotonic()
            self._serving = True
            self.listening.set()
            self._spawn(lambda: httpd.serve_forever(poll_interval=0.05), "lmp-autoreg-kit")

    def stop(self) -> None:
        """Stop serving, wake delayed handlers, close the port, remove the temp files.

        A ``state_dir`` and the CA in it are kept.
        """
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            serving = self._serving
        self._close(serving, self._threads)
        if self.gateway is not None:
            self.gateway.stop()
        self._remove_files()

    # -- what tests read and steer ----------------------------------------------------

    @property
    def url(self) -> str:
        """The registration URL, e.g. ``http://127.0.0.1:PORT/sign``."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{url_host(self.host)}:{self.port}{self.path}"

    @property
    def api_url(self) -> str:
        """The devices API's URL, e.g. ``http://127.0.0.1:PORT/ota/devices/``."""
        return self.url[: -len(self.path)] + API_PREFIX

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far (``HEAD`` included), oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def posts(self) -> list[RecordedRequest]:
        """The ``POST`` requests among :attr:`requests`: the registration attempts."""
        return [r for r in self.requests if r.method == "POST"]

    def wait_for(
        self, count: int, *, method: str = "POST", timeout: float = 30.0
    ) -> list[RecordedRequest]:
        """Wait until ``count`` requests of ``method`` have arrived; return them all.

        Raises TimeoutError after ``timeout`` seconds: a bound for a test that would
        otherwise hang, never a window the test depends on.
        """

        def arrived() -> list[RecordedRequest]:
            return [r for r in self._requests if r.method == method]

        with self._arrived:
            if not self._arrived.wait_for(lambda: len(arrived()) >= count, timeout):
                raise TimeoutError(f"{len(arrived())} {method} requests, not {count}")
            return arrived()

    @property
    def registered(self) -> dict[str, str]:
        """uuid -> client certificate PEM of every device this server answered 201."""
        with self._lock:
            return dict(self._registered)

    def enqueue(self, *replies: Reply) -> None:
        """Script the next requests' replies, one per request, before the default applies.

        ``HEAD`` requests take no scripted reply: they get ``head_status``.
        """
        with self._lock:
            self._queue.extend(replies)

    # -- serving ----------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        record = handler.record()
        with self._lock:
            self._requests.append(record)
            self._arrived.notify_all()
        for prefix, mount in self._mounts:
            if record.path.startswith(prefix):
                status, payload = mount(record.method, record.path, record.headers,
                                        record.body)
                LOG.info("%s %s -> %d", record.method, record.path.split("?", 1)[0], status)
                handler.send_bytes(status, payload, "application/json", {})
                return
        with self._lock:
            reply = None if record.method == "HEAD" else self._next_reply()
        if reply is None:
            status = self.head_status if self._on_path(record) else 404
            LOG.info("%s %s -> %d", record.method, record.path, status)
            allow = {"Allow": "POST"} if status == 405 else {}
            handler.send_bytes(status, b"", "text/plain; charset=utf-8", allow)
            return
        if self._hang_up(handler, reply):
            return
        status, payload, content_type = self._answer(record, reply)
        if reply.lost:
            LOG.info("%s %s -> %d, lost: hung up before the answer", record.method,
                     record.path, status)
            handler.close_connection = True
            return
        LOG.info("%s %s -> %d", record.method, record.path, status)
        handler.send_bytes(status, payload, content_type, reply.headers, reply.truncate,
                           reply.pace, self._stopping)

    def _next_reply(self) -> Reply:
        return self._queue.popleft() if self._queue else self.default

    def _on_path(self, record: RecordedRequest) -> bool:
        return record.path.split("?", 1)[0] == self.path

    def _answer(self, record: RecordedRequest, reply: Reply) -> tuple[int, bytes, str]:
        if reply.body is not None:
            raw = reply.body.encode("utf-8") if isinstance(reply.body, str) else reply.body
            return reply.status, raw, "text/plain; charset=utf-8"
        if not 200 <= reply.status < 300:
            try:
                phrase = HTTPStatus(reply.status).phrase
            except ValueError:
                phrase = "Error"
            return reply.status, phrase.encode("utf-8"), "text/plain; charset=utf-8"
        try:
            files = self._register(record, reply)
        except _Refusal as refusal:
            LOG.info("refused: %s", refusal.message)
            return refusal.status, refusal.message.encode("utf-8"), "text/plain; charset=utf-8"
        return reply.status, json.dumps(files).encode("utf-8"), "application/json"

    def _register(self, record: RecordedRequest, reply: Reply) -> dict[str, str]:
        """Check a registration request as the reference server does and build the files."""
        if not self._on_path(record):
            raise _Refusal(404, "Not Found")
        if record.method != "POST":
            raise _Refusal(405, "Method Not Allowed")
        if not self._authorized(record.headers):
            raise _Refusal(401, f"Missing or invalid {self.token_header} header"
                           if self.oauth is None else "Missing or invalid credentials: "
                           f"{self.token_header} or Authorization: Bearer")
        if self.check_content_type and not _is_json_type(record.headers.get("Content-Type")):
            raise _Refusal(415, "Unsupported Media Type: the request is not application/json")
        data = self._body(record)
        csr_pem = data.get("csr")
        if not csr_pem:
            raise _Refusal(400, "Missing required field 'csr'")
        if not isinstance(csr_pem, str):
            raise _Refusal(400, "Invalid data type for 'csr'")
        hardware_id = data.get("hardware-id")
        if not hardware_id:
            raise _Refusal(400, "Missing required field 'hardware-id'")
        overrides = _overrides(data.get("overrides"))
        sota_dir = data.get("sota-config-dir") or "/var/sota"
        if data.get("group") and not self.accept_group:
            raise _Refusal(400, GROUP_REFUSAL)
        csr, uuid = self._check_csr(csr_pem)
        try:
            client_pem = self.ca.sign_csr(csr_pem)
        except ValueError as error:
            raise _Refusal(400, str(error)) from error
        with self._lock:
            if self.reject_duplicates and uuid in self._registered:
                raise _Refusal(409, "Device already exists")
        if self.partially_detached:
            self._create_device(client_pem, data.get("name"))
        with self._lock:
            self._registered[uuid] = client_pem
        if reply.wrong_key:
            client_pem = self.ca.cert_for_subject_with_other_key(csr.subject)
        if reply.wrong_cn:
            public = csr.public_key()
            assert isinstance(public, ec.EllipticCurvePublicKey)  # sign_csr checked it
            client_pem = self.ca.cert_for_key_with_other_cn(public, str(uuidlib.uuid4()))
        files = {
            "root.crt": self.ca.cert_pem,
            "sota.toml": sota_toml(
                str(hardware_id),
                overrides,
                str(sota_dir),
                self.gateway.url if self.gateway is not None else GATEWAY_SERVER,
            ),
            "client.pem": client_pem,
            "client.chained": client_pem + "\n" + self.ca.intermediate_pem,
        }
        return reply.files(files) if reply.files is not None else files

    def _create_device(self, client_pem: str, name: object) -> None:
        """Create the device in the devices API as the reference server does
        (``lmp_autoreg.testing.upstream``); its refusal is the device's answer."""
        assert self.api_token is not None  # __init__ made sure
        loopback = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        own = f"{self.url.split(':', 1)[0]}://{url_host(loopback)}:{self.port}{API_PREFIX}"
        refused = create_device(
            self.upstream_api or own, self.api_token, client_pem,
            name=name if isinstance(name, str) else None, group=self.device_group,
            verify=str(self.ca_file) if self.tls and self.upstream_api is None else True,
            stopping=self._stopping,
        )
        if refused is not None:
            raise _Refusal(refused.status, refused.text)

    def _group_of(self, uuid: str | None) -> str | None:
        """The device group the kit's devices API holds ``uuid`` in (None: none)."""
        return self.devices_api.group_of(uuid) if self.devices_api is not None else None

    def _authorized(self, headers: Headers) -> bool:
        """The token, when there is one; with OAuth, a bearer token it issued (any other
        bearer is refused), or the token."""
        if self.oauth is not None and headers.get("Authorization") is not None:
            return self.oauth.accepts(headers.get("Authorization"))
        if self.token is not None:
            return headers.get(self.token_header) == self.token
        return self.oauth is None

    @staticmethod
    def _body(record: RecordedRequest) -> dict[str, Any]:
        """The request's JSON object; the reference server's answer when there is none."""
        try:
            data = json.loads(record.body) if record.body else None
        except ValueError as error:
            raise _Refusal(400, "Bad Request: the body is not valid JSON") from error
        if not data:
            raise _Refusal(400, "Missing request body")
        if not isinstance(data, dict):
            raise _Refusal(500, "Internal Server Error")
        return data

    def _check_csr(self, csr_pem: str) -> tuple[x509.CertificateSigningRequest, str]:
        """The parsed CSR and its uuid (CN), refused as the reference server refuses it."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
        except ValueError as error:
            raise _Refusal(400, str(error)) from error
        ou = subject_value(csr.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        uuid = subject_value(csr.subject, NameOID.COMMON_NAME)
        if ou is None or uuid is None:
            raise _Refusal(500, "Internal Server Error")  # the reference server crashes here
        if self.factory is not None and ou != self.factory:
            raise _Refusal(400, f"Invalid factory({ou}) must be {self.factory}")
        return csr, uuid
