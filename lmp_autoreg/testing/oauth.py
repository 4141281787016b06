"""The test kit's OAuth 2.0 device authorization server (RFC 8628), as the Foundries
endpoints that lmp-device-register and fioup use (docs/spec.md section 9).

``RegistrationServer(oauth=OAuthAuthority(...))`` serves it under ``/oauth``:

- ``POST /oauth/authorization/device/`` (form ``client_id``, ``scope``
  ``<factory>:devices:create``): 200 with ``device_code``, ``user_code``,
  ``verification_uri`` (this server's ``/oauth/activate``), ``verification_uri_complete``,
  ``expires_in`` and ``interval``;
- ``POST /oauth/token/`` (form ``grant_type`` the device-code grant, ``device_code``,
  ``client_id``, ``scope``): 400 ``authorization_pending`` until the code is approved,
  then 200 with ``access_token`` once; ``slow_down``, ``access_denied``,
  ``expired_token``, ``invalid_grant``, ``invalid_client``, ``unsupported_grant_type`` as
  RFC 8628 section 3.5 and RFC 6749 section 5.2 have them;
- ``POST /oauth/activate`` (form or JSON ``user_code``, and ``action=deny`` to deny): what
  a person does in the browser; 200, or 404 for a code that is not pending.

The registration endpoint then accepts ``Authorization: Bearer <base64 of a token this
authority issued>`` and refuses any other.

A test steers it without racing the agent: ``approve_after``/``deny_after``/
``expire_after`` decide at the N-th poll of a code (an event on the server, not a time),
``slow_down_at`` answers ``slow_down`` to the polls it names, ``approve``/``deny``/
``expire``/``slow_down`` act on the pending codes now, and ``script_device``/
``script_token`` queue raw answers (any status, any bytes) for the next requests
(``{device_code}`` in a token answer repeats the polled code).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

PREFIX = "/oauth"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 section 6.1: letters a person cannot mistake for one another, no vowels.
_USER_CODE_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"


@dataclass
class DeviceCode:
    """One device authorization: its codes, who asked, and where it stands."""

    device_code: str
    user_code: str
    client_id: str
    scope: str
    issued: float  # time.monotonic()
    expires_in: float
    polls: int = 0
    state: str = "pending"  # pending, approved, denied, expired, used


class OAuthAuthority:
    """The OAuth side of the kit's server; see the module documentation."""

    def __init__(
        self,
        *,
        factory: str | None = "acme",
        interval: float | None = 1,
        expires_in: float = 900,
        approve_after: int | None = None,
        deny_after: int | None = None,
        expire_after: int | None = None,
        slow_down_at: Iterable[int] = (),
        complete_uri: bool = True,
        on_code: Callable[[DeviceCode, str], None] | None = None,
    ) -> None:
        self.factory = factory
        self.interval = interval  # None: the answer has no interval (the RFC's 5 s apply)
        self.expires_in = expires_in
        self.approve_after = approve_after
        self.deny_after = deny_after
        self.expire_after = expire_after
        self.slow_down_at = set(slow_down_at)
        self.complete_uri = complete_uri
        #: Called with each new code and its activation URL (``serve --oauth`` prints it).
        self.on_code = on_code
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._codes: dict[str, DeviceCode] = {}
        self._tokens: set[str] = set()
        self._slow_down_next = False
        self._device_script: deque[tuple[int, bytes]] = deque()
        self._token_script: deque[tuple[int, bytes]] = deque()

    # -- what tests read and steer ----------------------------------------------------

    @property
    def codes(self) -> list[DeviceCode]:
        """Every device authorization so far, oldest first (copies)."""
        with self._lock:
            return [DeviceCode(**vars(c)) for c in self._codes.values()]

    @property
    def tokens(self) -> set[str]:
        """The access tokens issued so far."""
        with self._lock:
            return set(self._tokens)

    def wait_for_code(self, timeout: float = 30.0) -> DeviceCode:
        """Wait until a device authorization has been asked for; return the latest.
        ``timeout`` bounds a test that would hang, never a window it depends on."""
        with self._changed:
            if not self._changed.wait_for(lambda: bool(self._codes), timeout):
                raise TimeoutError("no device authorization was asked for")
            return DeviceCode(**vars(list(self._codes.values())[-1]))

    def approve(self, user_code: str | None = None) -> bool:
        """Approve one pending code (``None``: every one), as a person would."""
        return self._settle(user_code, "approved")

    def deny(self, user_code: str | None = None) -> bool:
        return self._settle(user_code, "denied")

    def expire(self, user_code: str | None = None) -> bool:
        return self._settle(user_code, "expired")

    def slow_down(self) -> None:
        """Answer the next poll (of any code) ``slow_down``."""
        with self._lock:
            self._slow_down_next = True

    def script_device(self, *answers: tuple[int, bytes | str]) -> None:
        """Answer the next device authorization requests with these (status, body)."""
        with self._lock:
            self._device_script.extend((s, _bytes(b)) for s, b in answers)

    def script_token(self, *answers: tuple[int, bytes | str]) -> None:
        """Answer the next token polls with these (status, body), before any logic.
        ``{device_code}`` in a body is the polled device code: a server repeating it."""
        with self._lock:
            self._token_script.extend((s, _bytes(b)) for s, b in answers)

    def accepts(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries a token this authority issued."""
        scheme, _, value = (authorization or "").partition(" ")
        if scheme != "Bearer":
            return False
        try:
            token = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        with self._lock:
            return token in self._tokens

    # -- serving ----------------------------------------------------------------------

    def answer(self, method: str, path: str, headers: Mapping[str, str],
               body: bytes) -> tuple[int, bytes]:
        """The answer to a request under ``/oauth``: (status, JSON body)."""
        route = path.split("?", 1)[0]
        if method != "POST":
            return _json(405, {"error": "invalid_request", "error_description": "POST only"})
        form = _form(headers, body)
        if route == f"{PREFIX}/authorization/device/":
            return self._authorize(form, headers)
        if route == f"{PREFIX}/token/":
            return self._token(form)
        if route in (f"{PREFIX}/activate", f"{PREFIX}/activate/"):
            code = form.get("user_code", "").strip().upper()
            done = self._settle(code, "denied" if form.get("action") == "deny" else "approved")
            if not code or not done:
                return _json(404, {"error": "not_found",
                                   "error_description": "no pending code " + repr(code)})
            return _json(200, {"user_code": code, "state": self._state_of(code)})
        return _json(404, {"error": "not_found"})

    def _authorize(self, form: Mapping[str, str], headers: Mapping[str, str]) -> tuple[int, bytes]:
        with self._lock:
            scripted = self._device_script.popleft() if self._device_script else None
        if scripted is not None:
            return scripted
        client_id = form.get("client_id", "")
        scope = form.get("scope", "")
        if not client_id:
            return _json(400, {"error": "invalid_client",
                               "error_description": "client_id is required"})
        wanted = f"{self.factory}:devices:create"
        if self.factory is not None and scope != wanted:
            return _json(400, {"error": "invalid_scope",
                               "error_description": f"scope must be {wanted}"})
        code = DeviceCode(secrets.token_urlsafe(32), _user_code(), client_id, scope,
                          time.monotonic(), self.expires_in)
        with self._changed:
            self._codes[code.device_code] = code
            self._changed.notify_all()
        activate = f"http://{headers.get('Host', '127.0.0.1')}{PREFIX}/activate"
        data: dict[str, Any] = {"device_code": code.device_code, "user_code": code.user_code,
                                "verification_uri": activate,
                                "expires_in": _number(self.expires_in)}
        if self.complete_uri:
            data["verification_uri_complete"] = f"{activate}?user_code={code.user_code}"
        if self.interval is not None:
            data["interval"] = _number(self.interval)
        if self.on_code is not None:
            self.on_code(DeviceCode(**vars(code)), activate)
        return _json(200, data)

    def _token(self, form: Mapping[str, str]) -> tuple[int, bytes]:
        with self._lock:
            if self._token_script:
                status, body = self._token_script.popleft()
                polled = form.get("device_code", "").encode("utf-8")
                return status, body.replace(b"{device_code}", polled)
            if form.get("grant_type") != GRANT_TYPE:
                return _error("unsupported_grant_type")
            code = self._codes.get(form.get("device_code", ""))
            if code is None or code.state == "used":
                return _error("invalid_grant")
            if form.get("client_id") != code.client_id:
                return _error("invalid_client", 401)
            code.polls += 1
            if time.monotonic() > code.issued + code.expires_in or (
                    self.expire_after is not None and code.polls >= self.expire_after):
                code.state = "expired" if code.state == "pending" else code.state
            if self.approve_after is not None and code.polls >= self.approve_after:
                code.state = "approved" if code.state == "pending" else code.state
            if self.deny_after is not None and code.polls >= self.deny_after:
                code.state = "denied" if code.state == "pending" else code.state
            if code.state == "expired":
                return _error("expired_token")
            if code.state == "denied":
                return _error("access_denied")
            if self._slow_down_next or code.polls in self.slow_down_at:
                self._slow_down_next = False
                return _error("slow_down")
            if code.state == "pending":
                return _error("authorization_pending")
            code.state = "used"
            token = secrets.token_urlsafe(32)
            self._tokens.add(token)
            self._changed.notify_all()
        return _json(200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600,
                           "scope": code.scope})

    def _settle(self, user_code: str | None, state: str) -> bool:
        with self._changed:
            found = [c for c in self._codes.values() if c.state == "pending"
                     and (user_code is None or c.user_code == user_code)]
            for code in found:
                code.state = state
            self._changed.notify_all()
        return bool(found)

    def _state_of(self, user_code: str) -> str:
        with self._lock:
            return next(c.state for c in self._codes.values() if c.user_code == user_code)


def _user_code() -> str:
    letters = "".join(secrets.choice(_USER_CODE_LETTERS) for _ in range(8))
    return f"{letters[:4]}-{letters[4:]}"


def _number(value: float) -> float | int:
    """A whole number as a JSON integer: the real endpoints send integers, and
    lmp-device-register reads ``interval`` and ``expires_in`` as ``int`` (it aborts on
    ``2.0``)."""
    return int(value) if float(value).is_integer() else value


def _bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else body


def _json(status: int, data: Mapping[str, Any]) -> tuple[int, bytes]:
    return status, json.dumps(data).encode("utf-8")


def _error(error: str, status: int = 400) -> tuple[int, bytes]:
    return _json(status, {"error": error})


def _form(headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    """The request's fields: form-encoded (as the tools send them) or a JSON object."""
    text = body.decode("utf-8", "replace")
    if "json" in headers.get("Content-Type", "").lower():
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
