"""Handing an OAuth access token to ``lmp-device-register`` without its command line.

The C++ tool takes a token only as ``-T`` on its command line (visible to every process
in ``/proc/<pid>/cmdline``), or, without ``-T``, from its own OAuth device flow against
``$OAUTH_BASE``, which knows none of RFC 8628's errors and has no deadline. So the agent
runs the flow itself (``oauth.obtain_token``), then starts the tool with ``OAUTH_BASE``
pointing here: a one-request-at-a-time server on 127.0.0.1 under a random path, which
answers the tool's device authorization request with a code of its own and its first
token poll with the access token, at once (docs/spec.md section 9).

The access token travels only over loopback, to the process the agent started, and only
to a client that knows the random path (in the tool's environment, which only its owner
can read) and the device code this server handed out (once: a code is good for one
token). Everything else gets 404 or ``invalid_grant``.
"""

import json
import logging
import secrets
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from .oauth import GRANT_TYPE

LOG = logging.getLogger(__name__)

# What the tool prints as its "user code" and "browser URL": nothing for a person to do.
USER_CODE = "approved-already"
VERIFICATION_URI = "(approved through lmp-device-auto-register)"
LIFETIME = 600  # seconds: how long a code handed out here may be exchanged
MAX_BODY = 16384


class TokenHandOff:
    """``with TokenHandOff(token, client_id) as handoff:`` run the tool with
    ``OAUTH_BASE=handoff.url``."""

    def __init__(self, token: str, client_id: str) -> None:
        self._token = token
        self.client_id = client_id
        self.prefix = "/" + secrets.token_urlsafe(24)
        self._codes: set[str] = set()
        self._lock = threading.Lock()
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"TokenHandOff(client_id={self.client_id!r})"

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.prefix}"

    def __enter__(self) -> "TokenHandOff":
        handoff = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """Quiet: the paths carry the random prefix."""

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(max(length, 0), MAX_BODY))
                status, answer = handoff.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="lmp-autoreg-handoff", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def answer(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The answer to one request: (status, JSON object)."""
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if path == self.prefix + "/authorization/device/":
            if form.get("client_id") != self.client_id:
                return 400, {"error": "invalid_client"}
            code = secrets.token_urlsafe(32)
            with self._lock:
                self._codes.add(code)
            return 200, {"device_code": code, "user_code": USER_CODE,
                         "verification_uri": VERIFICATION_URI, "expires_in": LIFETIME,
                         "interval": 1}
        if path == self.prefix + "/token/":
            code = form.get("device_code", "")
            with self._lock:
                known = code in self._codes
                self._codes.discard(code)
            if (known and form.get("grant_type") == GRANT_TYPE
                    and form.get("client_id") == self.client_id):
                LOG.debug("handed the access token to lmp-device-register")
                return 200, {"access_token": self._token, "token_type": "Bearer"}
            return 400, {"error": "invalid_grant"}
        return 404, {"error": "not_found"}
