"""The registration request (docs/spec.md section 2): what goes on the wire, and one attempt at it.

``request_body`` is a pure function of the settings; ``RegistrationClient.post`` makes one
attempt and classifies its outcome as an answer (a dict of files), ``ServerRefused``
(final) or ``NoAnswer`` (worth retrying, with the server's ``Retry-After`` when it sent
one). Retrying is the caller's policy, not this module's.
"""

import json
import logging
import time
from typing import Any

import requests

from . import __version__
from .errors import BadAnswer, NoAnswer, ServerRefused, Unreachable
from .settings import Settings

LOG = logging.getLogger(__name__)
USER_AGENT = f"lmp-device-auto-register/{__version__}"
# How much of a refusal's body to show: enough for the reference server's messages.
MESSAGE_LIMIT = 500
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
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if settings.token is not None:
        headers[settings.token_header] = "<redacted>" if redact else settings.token
    return headers


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date or garbage: fall back to our own backoff


def _server_message(response: requests.Response, content: bytes, token: str | None) -> str:
    try:
        text = content.decode(response.encoding or "utf-8", "replace").strip()
    except LookupError:  # a charset Python does not know
        text = content.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("message", "detail", "error"):
            if isinstance(data.get(key), str):
                text = data[key]
                break
    text = " ".join(text.split())
    if token:  # a server that echoes the request must not make us show the token
        text = text.replace(token, "<redacted>")
    return text[:MESSAGE_LIMIT] or response.reason or "no message"


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
        exception saying what happened (``Unreachable`` when no connection was made)."""
        end = time.monotonic() + timeout
        try:
            response = self.session.post(
                self.url,
                data=json.dumps(body).encode(),
                headers=self.headers,
                timeout=(min(timeout, CONNECT_TIMEOUT), timeout),
                verify=self.verify,
                allow_redirects=False,
                stream=True,
            )
            # Read the whole body here, so a connection cut mid-answer is a NoAnswer, and
            # bound the whole of it: a read timeout alone bounds each read, not their sum.
            chunks = []
            for chunk in response.iter_content(16384):
                chunks.append(chunk)
                if time.monotonic() > end:
                    raise NoAnswer(f"no complete answer from {self.url} within {timeout:.1f} s")
            content = b"".join(chunks)
        except requests.exceptions.SSLError as e:
            hint = "" if self.verify is not True else " (for a private CA, pass --cacert)"
            raise NoAnswer(f"TLS certificate check of {self.url} failed: {_reason(e)}{hint}") from e
        except requests.exceptions.ConnectTimeout as e:
            raise Unreachable(f"cannot reach {self.url} within {timeout:.1f} s") from e
        except requests.exceptions.Timeout as e:
            raise NoAnswer(f"no answer from {self.url} within {timeout:.1f} s") from e
        except requests.exceptions.ConnectionError as e:
            raise Unreachable(f"cannot reach {self.url}: {_reason(e)}") from e
        except requests.exceptions.RequestException as e:
            raise NoAnswer(f"broken answer from {self.url}: {_reason(e)}") from e
        return _classify(response, content, self.token)


def _classify(response: requests.Response, content: bytes, token: str | None) -> dict[str, str]:
    status = response.status_code
    if status == 201:
        try:
            files = json.loads(content)
        except ValueError as e:
            raise BadAnswer(f"the server said 201 but its answer is not JSON: {e}") from e
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise BadAnswer("the server said 201 but its answer is not a map of file names to text")
        return files
    message = _server_message(response, content, token)
    if status == 429 or status >= 500:
        raise NoAnswer(f"server busy or failing (HTTP {status}): {message}", _retry_after(response))
    if 400 <= status < 500:
        raise ServerRefused(f"server refused the registration (HTTP {status}): {message}", status)
    raise BadAnswer(f"unexpected answer HTTP {status} (expected 201): {message}")


def _reason(error: Exception) -> str:
    """The innermost useful reason of a requests/urllib3 error, on one line."""
    reason: BaseException = error
    while reason.args and isinstance(reason.args[0], BaseException):
        reason = reason.args[0]
    inner = getattr(reason, "reason", None)
    if isinstance(inner, BaseException):
        reason = inner
    return " ".join(str(reason).split()) or type(reason).__name__
