"""Registering by hand without an API token: the OAuth 2.0 device authorization grant
(RFC 8628) that lmp-device-register and fioup start when they have no token (docs/spec.md
section 9).

The device asks ``<oauth>/authorization/device/`` for a code (form fields ``client_id``
= the device's uuid, ``scope`` = ``<factory>:devices:create``), shows a person the user
code and the URL to open, and polls ``<oauth>/token/`` (``grant_type`` = the device-code
grant, ``device_code``, ``client_id``, ``scope``) until the person approves; the
registration then carries ``Authorization: Bearer <base64 of the access token>``.

Beyond what the two tools do, the whole of RFC 8628 section 3.5: ``slow_down`` adds 5 s
to the interval for good; ``expired_token``, and the code's own ``expires_in``, end the
flow (exit 5); ``access_denied`` ends it as a refusal (exit 4); any other failure (no
connection, 5xx, 429, an answer that is not what the RFC says) is retried with the
agent's backoff (``retry.next_wait``) until the deadline, never faster than the
interval. The interval has a floor (``MIN_INTERVAL``), whatever the server says.

The pure functions decide (``read_authorization``, ``read_token_answer``,
``poll_wait``, ``prompt``); ``FormClient`` is the one HTTP wrapper; ``obtain_token`` runs
the flow. The device code and the access token are secrets: never logged, never in an
error message, never in the JSON (``Result.oauth`` holds the flow's state without them).
"""

import base64
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from . import __version__
from .errors import BadAnswer, NoAnswer, ServerRefused, Unreachable
from .progress import PROMPT, status
from .retry import Deadline, next_wait, retry

if TYPE_CHECKING:
    import requests

    from .result import Result
    from .settings import Settings

LOG = logging.getLogger(__name__)

DEFAULT_URL = "https://app.foundries.io/oauth"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
HEADER = "Authorization"  # the registration request's header: ``bearer(token)``
DEFAULT_INTERVAL = 5.0  # RFC 8628 section 3.2: when the server sends no interval
SLOW_DOWN_STEP = 5.0  # RFC 8628 section 3.5: slow_down adds this to the interval, for good
# Never poll faster than this, whatever the server says (an interval of 0 would be a busy
# loop against the server): the RFC's grain is the second.
MIN_INTERVAL = 1.0
# Longest value taken from a server for what a person reads or the device sends back.
MAX_CODE = 4096
MAX_SHOWN = 512
MESSAGE_LIMIT = 200
USER_AGENT = f"lmp-device-auto-register/{__version__}"
_URL = re.compile(r"https?://[^\s\x00-\x1f\x7f-\x9f]+")


class Authorization(NamedTuple):
    """The server's answer to the device authorization request (RFC 8628 section 3.2).

    ``device_code`` is a secret; ``repr`` hides it."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float  # as the server sent it (or the RFC's default), before the floor

    def __repr__(self) -> str:
        return (f"Authorization(user_code={self.user_code!r}, "
                f"verification_uri={self.verification_uri!r}, expires_in={self.expires_in}, "
                f"interval={self.interval})")


class Poll(NamedTuple):
    """What one answer of the token endpoint means (RFC 8628 section 3.5).

    ``kind``: ``granted`` (``token`` holds the access token), ``pending``, ``slow_down``,
    ``denied``, ``expired``, or ``retry`` (anything else: ``detail`` says what; it is
    retried with the agent's backoff, ``unreachable`` when no connection was made)."""

    kind: str
    token: str | None = None
    detail: str = ""
    retry_after: float | None = None
    unreachable: bool = False

    def __repr__(self) -> str:
        return f"Poll(kind={self.kind!r}, detail={self.detail!r})"


def bearer(token: str) -> str:
    """The ``Authorization`` header's value for an access token, as lmp-device-register
    and fioup send it: ``Bearer`` and the token in standard base64."""
    return "Bearer " + base64.b64encode(token.encode("utf-8")).decode("ascii")


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: object) -> float | None:
    """A JSON number that is finite, else None (``true`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _showable(value: object, limit: int = MAX_SHOWN) -> str | None:
    # What a person is shown must not steer the terminal (no control characters) nor
    # hide what it says (no format characters such as a bidi override): printable only.
    if isinstance(value, str) and 0 < len(value) <= limit and value.isprintable():
        return value
    return None


def _code(value: object) -> str | None:
    """A device code or an access token: 1*VSCHAR, printable ASCII (RFC 8628 appendix A,
    RFC 6749 appendix A.17), what a form and a header carry as it is."""
    code = _showable(value, MAX_CODE)
    return code if code is not None and code.isascii() else None


def _link(value: object) -> str | None:
    """An http(s) URL fit to show a person, else None."""
    shown = _showable(value)
    return shown if shown is not None and _URL.fullmatch(shown) else None


def said(data: Mapping[str, Any] | None, body: bytes, *, hide: tuple[str, ...] = ()) -> str:
    """What a server said in a failed answer, one short line: the RFC's ``error`` and
    ``error_description``, else the start of the body; never one of ``hide``."""
    if data is not None and isinstance(data.get("error"), str):
        text = data["error"]
        if isinstance(data.get("error_description"), str):
            text += f": {data['error_description']}"
    else:
        text = body.decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    for secret in hide:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text[:MESSAGE_LIMIT] or "no message"


def read_authorization(
    status_code: int, body: bytes, retry_after: float | None = None
) -> Authorization:
    """The device authorization answer, checked; else the error to raise: ``ServerRefused``
    for a 4xx (the server will not hand this device a code), ``NoAnswer`` for a 5xx or
    429, ``BadAnswer`` for an answer without what RFC 8628 section 3.2 requires."""
    data = _object(body)
    if status_code == 429 or status_code >= 500:
        raise NoAnswer(f"the device authorization endpoint is busy or failing "
                       f"(HTTP {status_code}): {said(data, body)}", retry_after)
    if 400 <= status_code < 500:
        raise ServerRefused(f"the device authorization request was refused "
                            f"(HTTP {status_code}): {said(data, body)}", status_code)
    if status_code != 200:
        raise BadAnswer(f"unexpected answer HTTP {status_code} to the device authorization "
                        f"request (expected 200): {said(data, body)}")
    if data is None:
        raise BadAnswer("the device authorization answer is not a JSON object")
    problems = []
    device_code = _code(data.get("device_code"))
    if device_code is None:
        problems.append("device_code")
    user_code = _showable(data.get("user_code"), 64)
    if user_code is None:
        problems.append("user_code")
    uri = _link(data.get("verification_uri"))
    if uri is None:
        problems.append("verification_uri")
    expires_in = _number(data.get("expires_in"))
    if expires_in is None or expires_in <= 0:
        problems.append("expires_in")
    interval = DEFAULT_INTERVAL if "interval" not in data else _number(data["interval"])
    if interval is None or interval < 0:
        problems.append("interval")
    if problems:
        raise BadAnswer("the device authorization answer has no usable "
                        + ", ".join(problems) + " (RFC 8628 section 3.2)")
    complete = _link(data.get("verification_uri_complete"))  # optional: dropped if unusable
    assert isinstance(device_code, str) and user_code and uri
    assert expires_in is not None and interval is not None
    return Authorization(device_code, user_code, uri, complete, expires_in, interval)


def read_token_answer(
    status_code: int, body: bytes, retry_after: float | None = None, *, device_code: str = ""
) -> Poll:
    """What one answer of the token endpoint means (RFC 8628 section 3.5)."""
    data = _object(body)
    if status_code == 200:
        token = _code(data.get("access_token")) if data is not None else None
        if token is not None:
            return Poll("granted", token=token)
        return Poll("retry", detail="the token endpoint said 200 without a usable access_token")
    error = data.get("error") if data is not None else None
    if 400 <= status_code < 500 and status_code != 429:
        kind = {"authorization_pending": "pending", "slow_down": "slow_down",
                "access_denied": "denied", "expired_token": "expired"}.get(str(error))
        if isinstance(error, str) and kind is not None:
            return Poll(kind, detail=said(data, body, hide=(device_code,)))
    return Poll("retry", retry_after=retry_after,
                detail=f"HTTP {status_code} from the token endpoint: "
                       f"{said(data, body, hide=(device_code,))}")


def poll_wait(interval: float) -> float:
    """Seconds between two polls: the server's interval, never under ``MIN_INTERVAL``."""
    return max(interval, MIN_INTERVAL)


def prompt(uuid: str, factory: str, auth: Authorization) -> str:
    """What a person reads, on stderr (and its first line as the unit's ``STATUS=``)."""
    minutes = max(1, round(auth.expires_in / 60))
    lines = [
        # The code before the URL: a long URL wraps on a narrow terminal, the code stays whole.
        f"to register this device, enter the code {auth.user_code} at "
        f"{auth.verification_uri} (it expires in {minutes} min)",
    ]
    if auth.verification_uri_complete:
        lines.append(f"  or open {auth.verification_uri_complete} (the code filled in)")
    lines.append(f"  device {uuid}, factory {factory}: waiting for approval")
    return "\n".join(lines)


class FormClient:
    """Posts form-encoded requests to the OAuth endpoints; one ``requests`` session."""

    def __init__(self, base: str, cacert: str | None) -> None:
        import requests

        self.base = base.rstrip("/")
        self.verify: str | bool = cacert or True
        self.session: requests.Session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def post(self, path: str, fields: Mapping[str, str],
             timeout: float) -> tuple[int, bytes, float | None]:
        """One request of at most ``timeout`` s: (status, body, Retry-After), or
        ``Unreachable``/``NoAnswer`` when no answer came."""
        import requests

        from .client import request_failure

        url = self.base + path
        try:
            response = self.session.post(
                url, data=dict(fields), timeout=(min(timeout, 10.0), timeout),
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
                verify=self.verify, allow_redirects=False,
            )
        except requests.exceptions.RequestException as e:
            raise request_failure(e, url, timeout, self.verify) from e
        return response.status_code, response.content, _retry_after(response)


def _retry_after(response: "requests.Response") -> float | None:
    number = _number_text(response.headers.get("Retry-After", ""))
    return None if number is None else max(0.0, number)


def _number_text(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class Grant(NamedTuple):
    """The flow's outcome: the access token (a secret), and the deadline of the
    registration that follows."""

    token: str
    deadline: Deadline

    def __repr__(self) -> str:
        return f"Grant(token=<redacted>, deadline={self.deadline.remaining():.1f} s)"


def state(settings: "Settings", value: str, **more: Any) -> dict[str, Any]:
    """``Result.oauth``: the flow's state for the JSON, never a secret."""
    return {"url": settings.oauth_url, "state": value, **more}


def obtain_token(
    settings: "Settings",
    uuid: str,
    result: "Result",
    deadline: Deadline,
    *,
    client: FormClient | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Grant:
    """Run the device authorization flow for ``uuid``; return the access token.

    ``deadline`` bounds it when ``--timeout`` was given; otherwise the code's own lifetime
    does, and the registration afterwards gets a deadline of its own (``Grant``). The
    flow's clock is the deadline's, and ``sleep`` its every wait: a test drives both.
    ``result.oauth`` follows the flow's state. Raises ``ServerRefused`` (the request
    refused, the approval denied) or ``NoAnswer`` (the code expired, the deadline passed).
    """
    http = client or FormClient(settings.oauth_url, settings.cacert)
    scope = f"{settings.factory}:devices:create"
    result.oauth = state(settings, "starting")
    try:
        what = f"asking {settings.oauth_url} for a device authorization code"
        LOG.info("no API token: registering by hand through OAuth; %s", what)

        def authorize(budget: float) -> Authorization:
            code, body, after = http.post("/authorization/device/",
                                          {"client_id": uuid, "scope": scope}, budget)
            return read_authorization(code, body, after)

        try:
            auth = retry(authorize, deadline, what=what, sleep=sleep)
        except (NoAnswer, ServerRefused):
            result.oauth = state(settings, "failed")
            raise
        return _poll(settings, uuid, scope, auth, result, deadline, http, sleep)
    finally:
        if client is None:
            http.close()


def _poll(settings: "Settings", uuid: str, scope: str, auth: Authorization, result: "Result",
          deadline: Deadline, http: FormClient, sleep: Callable[[float], None]) -> Grant:
    code_ends = Deadline(auth.expires_in, deadline.clock)
    ends = deadline if settings.timeout_given and deadline.end < code_ends.end else code_ends
    interval = poll_wait(auth.interval)
    shown = {"user_code": auth.user_code, "verification_uri": auth.verification_uri,
             "verification_uri_complete": auth.verification_uri_complete,
             "expires_in": auth.expires_in}
    polls = 0

    def show(value: str) -> None:
        result.oauth = state(settings, value, **shown, interval=interval, polls=polls)

    show("waiting")
    # A person must see this even with -q, as an instruction, not a warning; its first line
    # is the unit's STATUS= line.
    status(prompt(uuid, settings.factory, auth), PROMPT)
    fields = {"grant_type": GRANT_TYPE, "device_code": auth.device_code,
              "client_id": uuid, "scope": scope}
    wait = interval
    failures = 0
    last: Poll | None = None
    while True:
        left = ends.remaining()
        if wait >= left:
            show("expired" if ends is code_ends else "timed-out")
            raise NoAnswer(_gave_up(ends is code_ends, auth, deadline, polls, last))
        sleep(wait)
        polls += 1
        try:
            answer = read_token_answer(
                *http.post("/token/", fields, min(max(ends.remaining(), 0.01), 30.0)),
                device_code=auth.device_code)
        except NoAnswer as e:
            answer = Poll("retry", detail=str(e), unreachable=isinstance(e, Unreachable))
        LOG.debug("token poll %d: %s", polls, answer.kind)
        if answer.kind == "granted":
            assert answer.token is not None
            show("approved")
            LOG.info("the device was approved after %d poll%s", polls, "" if polls == 1 else "s")
            after = deadline if settings.timeout_given else Deadline(settings.timeout)
            return Grant(answer.token, after)
        if answer.kind == "denied":
            show("denied")
            raise ServerRefused(f"the device authorization was denied ({answer.detail}): "
                                "nobody approved this device", 400)
        if answer.kind == "expired":
            show("expired")
            raise NoAnswer(f"the code {auth.user_code} expired before it was approved "
                           f"({answer.detail}): run again for a new code")
        if answer.kind == "slow_down":
            interval += SLOW_DOWN_STEP
            LOG.info("the server asked to slow down: polling every %g s", interval)
        failures = failures + 1 if answer.kind == "retry" else 0
        last = answer if answer.kind == "retry" else last
        wait = interval
        if answer.kind == "retry":
            backoff = next_wait(failures, unreachable=answer.unreachable,
                                retry_after=answer.retry_after, remaining=ends.remaining(),
                                rand=0.0)
            wait = max(interval, backoff if backoff is not None else ends.remaining())
            status(f"token poll {polls} failed: {answer.detail}; polling again in "
                   f"{wait:.1f} s", logging.WARNING)
        show("waiting")


def _gave_up(expired: bool, auth: Authorization, deadline: Deadline, polls: int,
             last: Poll | None) -> str:
    why = f"; the last poll failed: {last.detail}" if last is not None else ""
    if expired:
        return (f"the code {auth.user_code} expired ({auth.expires_in:g} s) before it was "
                f"approved, after {polls} poll{'' if polls == 1 else 's'}{why}: run again for "
                "a new code")
    return (f"the device was not approved before the deadline (--timeout "
            f"{deadline.seconds:g}), after {polls} poll{'' if polls == 1 else 's'}{why}")
