"""The registration request (docs/spec.md section 2): what goes on the wire, and one attempt at it.

``request_body`` is a pure function of the settings; ``RegistrationClient.post`` makes one
attempt and classifies its outcome as an answer (a dict of files), ``ServerRefused``
(final) or ``NoAnswer`` (worth retrying, with the server's ``Retry-After`` when it sent
one). Retrying is the caller's policy, not this module's.
"""

import contextlib
import http.client
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import requests
import urllib3
from urllib3.exceptions import ProtocolError

from . import __version__, checked
from .errors import BadAnswer, NoAnswer, ServerRefused, Unreachable
from .settings import Settings

LOG = logging.getLogger(__name__)
USER_AGENT = f"lmp-device-auto-register/{__version__}"
# The most read from the socket at once (never more than the answer's bound allows).
READ_SIZE = 16384
# A connection not made in this time is given up, and retried: the network may be coming up.
CONNECT_TIMEOUT = 10.0


def toml_string(value: str) -> str:
    """A TOML basic-string literal: the server pastes override values into sota.toml."""
    return json.dumps(value, ensure_ascii=False)


def request_body(settings: Settings, *, uuid: str, csr: str) -> dict[str, Any]:
    """The JSON body lmp-device-register would send for this device, every value a string."""
    sota = str(settings.paths.sota_device)
    pacman = {
        "type": toml_string("ostree+compose_apps"),
        "compose_apps_root": toml_string(f"{sota}/compose-apps"),
    }
    if settings.apps is not None:
        pacman["compose_apps"] = toml_string(",".join(settings.apps))
    pacman["reset_apps_root"] = toml_string(f"{sota}/reset-apps")
    if settings.restorable_apps:  # "" is off: aktualizr-lite reads the key's presence
        pacman["reset_apps"] = toml_string(settings.restorable_apps)
    pacman["tags"] = toml_string(settings.tag)
    overrides: dict[str, dict[str, str]] = {"pacman": pacman}
    if settings.hsm is not None:
        overrides["tls"] = {
            "pkey_source": toml_string("pkcs11"),
            "cert_source": toml_string("pkcs11"),
        }
        for section in ("storage", "import"):
            overrides[section] = {"tls_pkey_path": "", "tls_clientcert_path": ""}
    body: dict[str, Any] = {
        "use-ostree-server": "true",
        "sota-config-dir": sota,
        "hardware-id": settings.hardware_id,
        "name": settings.name or uuid,
        "uuid": uuid,
        "csr": csr,
    }
    if settings.device_group:
        body["group"] = settings.device_group
    body["overrides"] = overrides
    return body


def request_headers(settings: Settings, *, redact: bool = False) -> dict[str, str]:
    """Headers of the request; with ``redact`` the token is replaced, for showing."""
    # identity: an answer is read as sent, never inflated past its bound (curl, which the
    # C++ tool uses, asks for no encoding either).
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               "Accept-Encoding": "identity"}
    if settings.token is not None:
        headers[settings.token_header] = "<redacted>" if redact else settings.token
    return headers


class RegistrationClient:
    """Posts registration requests to one URL with one TLS configuration."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.device_api
        self.headers = request_headers(settings)
        self.token = settings.token
        self.verify: str | bool = settings.cacert or True
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def post(self, body: dict[str, Any], timeout: float) -> dict[str, str]:
        """One attempt of at most ``timeout`` seconds: the files of a 201 answer, or an
        exception saying what happened (``Unreachable`` when no connection was made).

        ``timeout`` bounds the whole exchange, every byte of it: the name lookup, the
        connection, TLS, the request, the headers and the body. Socket timeouts bound each
        read only (a server sending a byte every half second never meets them), so the
        exchange runs in a thread of its own, and at ``timeout`` the attempt is over: its
        connection is shut down and the thread, left behind, ends on its own.
        """
        exchange = _Exchange(self.session, self.url, json.dumps(body).encode(), self.headers,
                             self.verify, timeout)
        worker = threading.Thread(target=exchange.run, name="lmp-autoreg-request", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            exchange.abandon()
            self.session = requests.Session()  # the old one is the thread's until it ends
            raise NoAnswer(f"no answer from {self.url} within {timeout:.1f} s")
        if exchange.error is not None:
            raise exchange.error
        assert exchange.response is not None
        return _classify(exchange.response, exchange.content, self.token)


class _Exchange:
    """One request and the reading of its answer, run by a thread of ``post``: the response,
    its body (at most ``checked.ANSWER_BYTES + 1`` bytes), or the error it ended with."""

    def __init__(self, session: requests.Session, url: str, data: bytes,
                 headers: dict[str, str], verify: str | bool, timeout: float) -> None:
        self.session = session
        self.url = url
        self.data = data
        self.headers = headers
        self.verify = verify
        self.timeout = timeout
        self.response: requests.Response | None = None
        self.content = b""
        self.error: BaseException | None = None
        self.abandoned = False

    def run(self) -> None:
        try:
            self._exchange()
        except BaseException as e:  # handed to ``post``, which raises it in its thread
            self.error = e

    def _exchange(self) -> None:
        url, timeout = self.url, self.timeout
        try:
            response = self.session.post(
                url,
                data=self.data,
                headers=self.headers,
                timeout=(min(timeout, CONNECT_TIMEOUT), timeout),
                verify=self.verify,
                allow_redirects=False,
                stream=True,
            )
            self.response = response
            self.content = _read_body(response, lambda: self.abandoned)
        except requests.exceptions.RequestException as e:
            raise request_failure(e, url, timeout, self.verify) from e
        # Reading the body from ``response.raw`` goes past requests, to urllib3.
        except urllib3.exceptions.ReadTimeoutError as e:
            raise NoAnswer(f"no answer from {url} within {timeout:.1f} s") from e
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
            raise NoAnswer(f"broken answer from {url}: {_reason(e)}") from e
        finally:
            if self.response is not None:
                self.response.close()

    def abandon(self) -> None:
        """The deadline has passed: stop reading, and shut the connection down if it is
        known (once the headers are in), so a read in progress ends now."""
        self.abandoned = True
        connection = getattr(self.response.raw, "connection", None) if self.response else None
        sock = getattr(connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _read_body(response: requests.Response, abandoned: Callable[[], bool]) -> bytes:
    """The body as sent (``Accept-Encoding: identity``: never inflated), at most
    ``checked.ANSWER_BYTES + 1`` bytes of it: one byte more says that there was more. A
    201 that announces more is not read at all."""
    limit = checked.ANSWER_BYTES
    length = response.headers.get("Content-Length", "")
    if response.status_code == 201 and length.isdigit() and int(length) > limit:
        raise BadAnswer(f"the server said 201 but its answer is {int(length)} bytes, more "
                        f"than {limit}")
    chunks: list[bytes] = []
    size = 0
    while size <= limit and not abandoned():
        chunk = response.raw.read(min(READ_SIZE, limit + 1 - size), decode_content=False)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _classify(response: requests.Response, content: bytes, token: str | None) -> dict[str, str]:
    status = response.status_code
    if status == 201:
        return checked.answer_files(content)
    message = (checked.server_message(content, response.encoding, token)
               or response.reason or "no message")
    if status == 429 or status >= 500:
        retry_after = checked.retry_after(response.headers.get("Retry-After"))
        raise NoAnswer(f"server busy or failing (HTTP {status}): {message}", retry_after)
    if 400 <= status < 500:
        raise ServerRefused(f"server refused the registration (HTTP {status}): {message}", status)
    raise BadAnswer(f"unexpected answer HTTP {status} (expected 201): {message}")


def request_failure(
    error: requests.exceptions.RequestException, url: str, timeout: float, verify: str | bool
) -> NoAnswer | Unreachable:
    """What a request to ``url`` of at most ``timeout`` s that requests ended with ``error``
    means: the server was not reached (``Unreachable``) or gave no usable answer."""
    if isinstance(error, requests.exceptions.SSLError):
        hint = "" if verify is not True else " (for a private CA, pass --cacert)"
        return NoAnswer(f"TLS certificate check of {url} failed: {_reason(error)}{hint}")
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return Unreachable(f"cannot reach {url} within {timeout:.1f} s")
    if isinstance(error, requests.exceptions.Timeout):
        return NoAnswer(f"no answer from {url} within {timeout:.1f} s")
    if isinstance(error, requests.exceptions.ConnectionError):
        aborted = error.args[0] if error.args else None
        if isinstance(aborted, ProtocolError):
            # "Connection aborted.": connected, sent, then hung up on: the server may have
            # acted on the request (a lost answer), so it is not "never arrived".
            why = next((a for a in aborted.args if isinstance(a, Exception)), aborted)
            return NoAnswer(f"{url} hung up without an answer: {_reason(why)}")
        return Unreachable(f"cannot reach {url}: {_reason(error)}")
    return NoAnswer(f"broken answer from {url}: {_reason(error)}")


def _reason(error: Exception) -> str:
    """The innermost useful reason of a requests/urllib3 error, on one line."""
    reason: BaseException = error
    while reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    inner = getattr(reason, "reason", None)
    if isinstance(inner, BaseException):
        reason = inner
    return " ".join(str(reason).split()) or type(reason).__name__
