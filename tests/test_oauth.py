"""Registering by hand through the OAuth device authorization flow (RFC 8628; docs/spec.md
section 9; lmp_autoreg/oauth.py, handoff.py and the kit's testing/oauth.py).

The agent runs as a real process against the kit's loopback server with its /oauth
endpoints. Every decision of the kit (approve, deny, expire, slow_down) is taken at the
N-th poll of a code, an event on the server, so no test depends on how fast the agent
starts; the polls are the agent's own (1 s, the floor: ``oauth.MIN_INTERVAL``). The
timing rules (intervals, slow_down, backoff, the code's lifetime, the deadline) run the
agent's flow in-process on a clock the test drives (``Clock``), against the same real
endpoints: exact, and nothing spent waiting.
"""

import base64
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmp_autoreg import oauth
from lmp_autoreg.errors import BadAnswer, NoAnswer, ServerRefused
from lmp_autoreg.result import KEYS
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.oauth import OAuthAuthority
from lmp_autoreg.testing.server import RegistrationServer

from conftest import TIMEOUT, any_text, clean_env, device_args, require_module, run_cli
from fakebin import FakeBin


@pytest.fixture
def serve():
    """``serve(**knobs)``: a started kit server with OAuth endpoints (interval 1 s)."""
    servers = []

    def start(**knobs):
        authority = OAuthAuthority(**{"interval": 1, **knobs})
        server = RegistrationServer(oauth=authority).start()
        servers.append(server)
        return server, authority

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def device(tmp_path) -> FakeDevice:
    """A development device without an API token."""
    return FakeDevice(tmp_path / "device", token=None).build()


def oauth_url(server: RegistrationServer) -> str:
    return server.url[: -len(server.path)] + "/oauth"


def by_hand(device, server, *extra: str) -> list[str]:
    return device_args(device, server, "--oauth", "--oauth-url", oauth_url(server), "--json",
                       *extra)


def polls(server: RegistrationServer):
    return [r for r in server.posts if r.path == "/oauth/token/"]


def registrations(server: RegistrationServer):
    return [r for r in server.posts if r.path == server.path]


def secrets_of(authority: OAuthAuthority) -> list[str]:
    return [c.device_code for c in authority.codes] + sorted(authority.tokens)


def assert_no_secret(authority: OAuthAuthority, *texts: str) -> None:
    for secret in secrets_of(authority):
        for text in texts:
            assert secret not in text
            assert base64.b64encode(secret.encode()).decode() not in text


def test_approved_after_polls_registers_with_the_bearer_token(serve, device):
    server, authority = serve(approve_after=3)
    run = run_cli(*by_hand(device, server))
    assert run.returncode == 0, run.stderr
    (token,) = authority.tokens
    (post,) = registrations(server)
    assert post.headers["Authorization"] == "Bearer " + base64.b64encode(token.encode()).decode()
    assert "OSF-TOKEN" not in post.headers
    assert len(polls(server)) == 3
    (code,) = authority.codes
    auth_request = [r for r in server.posts if r.path == "/oauth/authorization/device/"]
    assert auth_request[0].body.decode().count("scope=acme%3Adevices%3Acreate") == 1
    assert f"client_id={run.json['uuid']}" in auth_request[0].body.decode()
    data = run.json
    assert list(data) == [*KEYS[:-1], "oauth", "exit_code", "error"] or set(data) == {
        *KEYS, "oauth", "exit_code", "error"}
    assert data["oauth"] == {
        "url": oauth_url(server), "state": "approved", "user_code": code.user_code,
        "verification_uri": oauth_url(server) + "/activate",
        "verification_uri_complete": f"{oauth_url(server)}/activate?user_code={code.user_code}",
        "expires_in": 900.0, "interval": 1.0, "polls": 3,
    }
    assert (device.sota / "client.pem").exists()
    # The person is shown the code and both URLs, on stderr only.
    assert code.user_code in run.stderr and "?user_code=" in run.stderr
    assert_no_secret(authority, run.stdout, run.stderr)


@pytest.mark.parametrize("quiet", [(), ("-q",)], ids=["normal", "quiet"])
def test_the_prompt_is_an_instruction_even_with_quiet(serve, device, quiet):
    """A person reads what to do, with -q too, and it is not labelled a warning."""
    server, authority = serve(approve_after=1)
    run = run_cli(*by_hand(device, server, *quiet))
    assert run.returncode == 0, run.stderr
    code = authority.codes[0].user_code
    assert f"lmp-device-auto-register: to register this device, enter the code {code} at " \
        in run.stderr
    assert "warning" not in run.stderr
    assert ("registering intel-corei7-64 as" in run.stderr) == (not quiet)




@pytest.mark.parametrize(
    ("knob", "code", "state", "kind"),
    [("expire_after", 5, "expired", "no-answer"), ("deny_after", 4, "denied", "refused")],
    ids=["expired-token-is-no-answer", "denied-is-a-refusal"],
)
def test_the_servers_verdict_ends_the_flow(serve, device, knob, code, state, kind):
    """expired_token or access_denied at the second poll ends the flow there, unregistered."""
    server, _ = serve(**{knob: 2})
    run = run_cli(*by_hand(device, server))
    assert run.returncode == code, run.stderr
    assert run.json["oauth"]["state"] == state
    assert run.json["error"]["kind"] == kind
    assert state in run.json["error"]["message"]
    assert len(polls(server)) == 2
    assert registrations(server) == []




def with_timeout(args: list[str], seconds: str) -> list[str]:
    return [a if a != TIMEOUT else seconds for a in args]






@pytest.mark.parametrize("where", ["stderr", "journal"])
def test_a_device_code_the_server_repeats_in_an_error_is_never_shown(serve, device, tmp_path,
                                                                    where):
    """The token endpoint's failed answers repeat the device code, in a body that is not
    JSON and in error_description; what the agent reports of them (stderr, or the journal
    and STATUS= under systemd, and the JSON's error) says what failed without the code."""
    from test_journal import DatagramSink, journal_entries, require_namespaces, statuses

    server, authority = serve()  # nobody approves: the last failure ends in the message
    authority.script_token(
        (500, "<html>no such code {device_code}</html>"),
        (400, json.dumps({"error": "invalid_request",
                          "error_description": "bad device_code {device_code}"})))
    args = with_timeout(by_hand(device, server), "5")
    if where == "stderr":
        run, shown = run_cli(*args), []
    else:
        require_module("systemd.journal")
        require_namespaces()
        sink = DatagramSink(str(tmp_path / "notify.sock"))
        try:
            run, entries = journal_entries(tmp_path, args,
                                           {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        finally:
            lines = statuses(sink.close())
        shown = [json.dumps(e) for e in entries] + lines
        assert run.stderr == "" and any("token poll 2 failed" in t for t in shown)
    assert run.returncode == 5, run.stderr
    (code,) = authority.codes
    assert len(polls(server)) >= 2
    message = run.json["error"]["message"]
    assert "the last poll failed: HTTP 400" in message and "<redacted>" in message
    shown += [run.stdout, run.stderr]
    assert "no such code <redacted>" in "".join(shown)
    assert not any(code.device_code in text for text in shown)


def test_a_refused_device_authorization_is_exit_4(serve, device):
    server, _ = serve(factory="other")  # the scope names acme
    run = run_cli(*by_hand(device, server))
    assert run.returncode == 4, run.stderr
    assert "invalid_scope" in run.json["error"]["message"]
    assert run.json["oauth"]["state"] == "failed"


def test_dry_run_starts_no_flow(serve, device):
    server, _ = serve(approve_after=1)
    run = run_cli(*by_hand(device, server, "--dry-run"))
    assert run.returncode == 0, run.stderr
    assert server.requests == []
    assert run.json["oauth"] == {"url": oauth_url(server), "state": "would-start"}
    assert run.json["request"]["headers"]["Authorization"] == "<redacted>"
    assert "would start an OAuth device authorization" in run.stderr


def test_under_the_unit_no_token_no_terminal_is_exit_2_naming_both_ways(serve, device):
    server, _ = serve(approve_after=1)
    run = run_cli(*device_args(device, server, "--oauth-url", oauth_url(server), "--json"))
    assert run.returncode == 2, run.stderr
    message = run.json["error"]["message"]
    assert "/etc/lmp-device-register-token" in message and "--token-file" in message
    assert "--oauth" in message
    assert server.requests == []


def test_oauth_is_not_for_production_nor_with_a_token_file(serve, device, tmp_path):
    server, _ = serve()
    run = run_cli(*by_hand(device, server, "--production"))
    assert run.returncode == 2 and "production" in run.json["error"]["message"]
    token = tmp_path / "token"
    token.write_text("t\n")
    run = run_cli(*by_hand(device, server, "--token-file", str(token)))
    assert run.returncode == 2 and "--token-file" in run.json["error"]["message"]
    assert server.requests == []


def test_plain_http_to_another_host_is_refused(device):
    run = run_cli("--sysroot", str(device.root), "--oauth", "--oauth-url",
                  "http://192.0.2.1/oauth", "--device-api", "https://192.0.2.1/sign", "--json")
    assert run.returncode == 2
    assert "plain http" in run.json["error"]["message"]


def test_a_terminal_starts_the_flow_and_stdout_stays_one_object(serve, device):
    """No --oauth: stdin and stderr on a terminal (a pty) are a person who can approve."""
    server, authority = serve(approve_after=1)
    primary, secondary = os.openpty()
    args = device_args(device, server, "--oauth-url", oauth_url(server), "--json")
    proc = subprocess.Popen([sys.executable, "-m", "lmp_autoreg", *args], stdin=secondary,
                            stdout=subprocess.PIPE, stderr=secondary, env=clean_env())
    os.close(secondary)
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the last holder of the terminal is gone
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=60)
    finally:
        reader.join(10)
        os.close(primary)
    assert proc.returncode == 0
    data = json.loads(stdout)
    assert data["oauth"]["state"] == "approved"
    terminal = b"".join(seen).decode()
    assert authority.codes[0].user_code in terminal
    assert "to register this device" not in stdout.decode()
    assert "to register this device" in terminal and "warning" not in terminal
    assert_no_secret(authority, stdout.decode(), terminal)


def test_under_systemd_the_prompt_is_the_status_line(serve, device, tmp_path):
    from test_journal import notify_run

    server, authority = serve(approve_after=1)
    run, lines = notify_run(device, server, tmp_path, {}, "--oauth", "--oauth-url",
                            oauth_url(server), "--json")
    assert run.returncode == 0, run.stderr
    code = authority.codes[0].user_code
    shown = [line for line in lines if code in line]
    assert shown and shown[0].startswith(f"to register this device, enter the code {code} at ")
    for secret in secrets_of(authority):
        assert not any(secret in line for line in lines)


def resolve(device, *argv: str, terminal: bool, **env: str):
    from lmp_autoreg.cli import build_parser
    from lmp_autoreg.settings import resolve as resolve_settings

    args = build_parser().parse_args(["register", "--sysroot", str(device.root), *argv])
    return resolve_settings(vars(args), env, terminal=terminal)


def test_settings_when_the_flow_runs(device, tmp_path):
    from lmp_autoreg.errors import ConfigError

    assert resolve(device, terminal=True).oauth
    assert resolve(device, "--oauth", terminal=False).oauth
    assert not resolve(device, "--production", terminal=True).oauth
    with pytest.raises(ConfigError, match="--oauth"):
        resolve(device, terminal=False)
    token = tmp_path / "token"
    token.write_text("t\n")
    found = resolve(device, "--token-file", str(token), terminal=True)
    assert not found.oauth and found.token == "t"
    given = resolve(device, "--oauth", terminal=False, OAUTH_BASE="https://example.com/o/")
    assert given.oauth_url == "https://example.com/o"
    assert resolve(device, "--oauth", "--timeout", "5", terminal=False).timeout_given
    assert not resolve(device, "--oauth", terminal=False).timeout_given


# -- the lmp-device-register backend ---------------------------------------------------


def tool_args(device, server, *extra: str) -> list[str]:
    return ["--sota-dir", str(device.sota), "--device-api", server.url, "--factory", "acme",
            "--hwid", "intel-corei7-64", "--tag", "main", "--apps", "app1,app2",
            "--no-production", "--timeout", TIMEOUT, "--fioconfig", "off", "--no-start",
            "--backend", "lmp-device-register", "--oauth", "--oauth-url", oauth_url(server),
            "--json", *extra]


@pytest.fixture
def fakes(tmp_path) -> FakeBin:
    bin_ = FakeBin(tmp_path / "bin")
    bin_.add("lmp-device-register")
    return bin_


def test_tool_backend_gets_the_token_over_loopback_never_argv(serve, device, fakes, live_root):
    server, authority = serve(approve_after=2)
    run = run_cli(*tool_args(device, server), env=fakes.environ())
    assert run.returncode == 0, run.stderr
    assert run.json["oauth"]["state"] == "approved" and run.json["oauth"]["polls"] == 2
    (token,) = authority.tokens
    (post,) = registrations(server)
    assert post.headers["Authorization"] == "Bearer " + base64.b64encode(token.encode()).decode()
    (call,) = fakes.calls("lmp-device-register")
    assert "-T" not in call.argv
    (proc,) = fakes.calls("lmp-device-register/proc")
    assert proc.argv[2:] == call.argv  # /proc/<pid>/cmdline: interpreter, script, argv
    base = proc.env["OAUTH_BASE"]
    assert base.startswith("http://127.0.0.1:") and base != oauth_url(server)
    # While the tool ran, the kernel had the hand-off listening on 127.0.0.1 alone: no
    # other interface of the device could reach the token (0100007F: 127.0.0.1).
    (listen,) = fakes.calls("lmp-device-register/listen")
    assert listen.argv == ["0100007F"]
    # Only the person's flow reached the kit's endpoints: the tool's went to the hand-off.
    assert len([r for r in server.posts if r.path == "/oauth/authorization/device/"]) == 1
    for secret in secrets_of(authority):
        assert not any(secret in arg for arg in proc.argv)
        assert not any(secret in value for value in proc.env.values())
    assert_no_secret(authority, run.stdout, run.stderr)
    assert (device.sota / "client.pem").exists()


def test_tool_backend_dry_run_shows_no_token_option(serve, device, fakes, live_root):
    server, _ = serve()
    run = run_cli(*tool_args(device, server, "--dry-run"), env=fakes.environ())
    assert run.returncode == 0, run.stderr
    assert "-T" not in run.json["request"]["command"]
    assert "hand-off" in run.json["request"]["environment"]["OAUTH_BASE"]
    assert server.requests == [] and fakes.calls() == []


def test_tool_backend_denied_is_exit_4_and_the_tool_never_runs(serve, device, fakes,
                                                                live_root):
    server, _ = serve(deny_after=1)
    run = run_cli(*tool_args(device, server), env=fakes.environ())
    assert run.returncode == 4, run.stderr
    assert fakes.calls("lmp-device-register") == []


# -- the kit ---------------------------------------------------------------------------


def post(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"text": body.decode()}


def test_kit_registration_accepts_only_a_bearer_token_it_issued(serve):
    server, authority = serve()
    base = oauth_url(server)
    status, auth = post(base + "/authorization/device/", b"client_id=u&scope=acme:devices:create")
    assert status == 200
    token_form = ("grant_type=urn:ietf:params:oauth:grant-type:device_code&client_id=u&"
                  f"device_code={auth['device_code']}").encode()
    assert post(base + "/token/", token_form) == (400, {"error": "authorization_pending"})
    assert post(base + "/activate", f"user_code={auth['user_code']}".encode())[0] == 200
    status, grant = post(base + "/token/", token_form)
    assert status == 200
    assert post(base + "/token/", token_form) == (400, {"error": "invalid_grant"})  # once
    good = "Bearer " + base64.b64encode(grant["access_token"].encode()).decode()
    other = "Bearer " + base64.b64encode(b"forged").decode()
    assert authority.accepts(good)
    for header in (other, "Bearer " + grant["access_token"], "Basic x", None):
        assert not authority.accepts(header)
        headers = {"Content-Type": "application/json"} | ({"Authorization": header}
                                                          if header else {})
        assert post(server.url, b"{}", headers)[0] == 401


def test_kit_serve_prints_the_code_and_activate_approves(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmp_autoreg.testing", "serve", "--port", "0", "--oauth",
         "--oauth-interval", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=clean_env())
    try:
        assert proc.stdout is not None
        lines = {}
        while "oauth" not in lines:
            key, _, value = proc.stdout.readline().strip().partition(": ")
            lines[key] = value
        status, auth = post(lines["oauth"] + "/authorization/device/",
                            b"client_id=dev&scope=acme:devices:create")
        assert status == 200
        # Whole numbers as JSON integers: the real lmp-device-register aborts on 1.0.
        assert type(auth["interval"]) is int and type(auth["expires_in"]) is int
        shown = proc.stdout.readline()
        assert shown.startswith(f"user code: {auth['user_code']} ")
        assert post(lines["oauth"] + "/activate", b"user_code=NOPE-NOPE")[0] == 404
        status, done = post(lines["oauth"] + "/activate", f"user_code={auth['user_code']}".encode())
        assert (status, done["state"]) == (200, "approved")
    finally:
        proc.terminate()
        proc.wait(10)


# -- bad answers (properties) ----------------------------------------------------------

JSON_TEXT = any_text(max_size=20)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6,
)
FIELDS = ("device_code", "user_code", "verification_uri", "verification_uri_complete",
          "expires_in", "interval", "access_token", "error", "error_description")
ANSWER_OBJECTS = st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=7)
BODIES = st.one_of(
    ANSWER_OBJECTS.map(lambda d: json.dumps(d, allow_nan=True).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"[]", b"null", b"{", b'{"error": "slow_down"}',
                     b'{"error": "authorization_pending"}', b'{"error": "access_denied"}',
                     b'{"error": "expired_token"}', b'{"expires_in": 1e999}']),
)
STATUSES = st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 429, 500, 503])


@pytest.mark.props
@given(status=STATUSES, body=BODIES)
def test_any_device_authorization_answer_is_a_code_or_a_documented_error(status, body):
    try:
        auth = oauth.read_authorization(status, body)
    except ServerRefused:
        assert 400 <= status < 500
        return
    except NoAnswer as e:  # BadAnswer included: retried until the deadline (exit 5)
        assert isinstance(e, BadAnswer) or status == 429 or status >= 500
        return
    assert status == 200
    assert auth.expires_in > 0 and auth.interval >= 0
    assert oauth.poll_wait(auth.interval) >= oauth.MIN_INTERVAL
    for shown in (auth.user_code, auth.verification_uri, auth.verification_uri_complete or ""):
        assert shown.isprintable()
    assert auth.device_code.isascii() and auth.device_code.isprintable()  # a form carries it


@pytest.mark.props
@given(status=STATUSES, body=BODIES)
def test_any_token_answer_is_one_of_the_rfcs_outcomes(status, body):
    poll = oauth.read_token_answer(status, body, device_code="secret-device-code")
    assert poll.kind in ("granted", "pending", "slow_down", "denied", "expired", "retry")
    assert (poll.kind == "granted") == (poll.token is not None)
    assert poll.token is None or (poll.token.isascii() and poll.token.isprintable())
    assert poll.kind in ("granted", "retry") or 400 <= status < 500
    assert "secret-device-code" not in poll.detail


@pytest.mark.props
@given(value=JSON_TEXT)
def test_a_code_or_token_is_taken_only_as_printable_ascii(value):
    usable = value != "" and all(" " <= c <= "~" for c in value)
    poll = oauth.read_token_answer(200, json.dumps({"access_token": value}).encode())
    assert (poll.kind == "granted") == usable
    code = {"device_code": value, "user_code": "ABCD-EFGH", "expires_in": 900,
            "verification_uri": "https://app.example/activate"}
    try:
        assert oauth.read_authorization(200, json.dumps(code).encode()).device_code == value
        assert usable
    except BadAnswer:
        assert not usable


@pytest.mark.props
@settings(max_examples=max(4, settings().max_examples // 6))
@given(device=st.tuples(STATUSES, BODIES), token=st.tuples(STATUSES, BODIES))
def test_a_run_against_bad_answers_ends_with_a_documented_code_in_time(tmp_path_factory, device,
                                                                        token):
    """Whatever the endpoints say, the agent ends with 0, 4 or 5, never 1, by its deadline."""
    root = tmp_path_factory.mktemp("device")
    dev = FakeDevice(root, token=None).build()
    authority = OAuthAuthority(interval=1, approve_after=1)
    authority.script_device(device)
    authority.script_token(token)
    with RegistrationServer(oauth=authority) as server:
        run = run_cli(*with_timeout(by_hand(dev, server), "3"), timeout=30)
        requests = server.requests
    assert run.returncode in (0, 4, 5), run.stderr
    assert run.json["exit_code"] == run.returncode
    assert requests[-1].time - requests[0].time < 3.0
    assert_no_secret(authority, run.stdout, run.stderr)
    assert Path(dev.sota / "client.pem").exists() == (run.returncode == 0)




def test_the_hand_off_gives_the_token_once_to_the_one_client_that_knows_the_path():
    from lmp_autoreg.handoff import TokenHandOff

    with TokenHandOff("the-token", "dev-uuid") as handoff:
        base = handoff.url
        assert base.startswith("http://127.0.0.1:") and len(handoff.prefix) > 30
        grant = "grant_type=urn:ietf:params:oauth:grant-type:device_code&client_id=dev-uuid"
        wrong_path = base.rsplit("/", 1)[0] + "/guess"
        assert post(wrong_path + "/authorization/device/", b"client_id=dev-uuid")[0] == 404
        assert post(base + "/authorization/device/", b"client_id=other")[0] == 400
        status, auth = post(base + "/authorization/device/", b"client_id=dev-uuid")
        assert status == 200 and "the-token" not in json.dumps(auth)
        assert type(auth["interval"]) is int and type(auth["expires_in"]) is int
        assert post(base + "/token/", f"{grant}&device_code=forged".encode())[0] == 400
        other = f"grant_type={oauth.GRANT_TYPE}&client_id=x&device_code={auth['device_code']}"
        assert post(base + "/token/", other.encode())[0] == 400  # and the code is spent
        status, auth = post(base + "/authorization/device/", b"client_id=dev-uuid")
        form = f"{grant}&device_code={auth['device_code']}".encode()
        assert post(base + "/token/", form) == (200, {"access_token": "the-token",
                                                      "token_type": "Bearer"})
        assert post(base + "/token/", form)[0] == 400
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(base + "/token/", data=form, timeout=5)




ODD_NUMBERS = st.one_of(
    st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.none(), st.text(max_size=5), st.sampled_from([0, 0.05, 0.5, 1, 5, 1e308, -1]),
)


@pytest.mark.props
@given(interval=ODD_NUMBERS | st.just("absent"), expires_in=ODD_NUMBERS | st.just("absent"))
def test_odd_intervals_and_lifetimes_are_refused_or_floored(interval, expires_in):
    answer = {"device_code": "d", "user_code": "ABCD-EFGH",
              "verification_uri": "https://app.foundries.io/activate"}
    for name, value in (("interval", interval), ("expires_in", expires_in)):
        if value != "absent":
            answer[name] = value
    try:
        auth = oauth.read_authorization(200, json.dumps(answer).encode())
    except BadAnswer:
        return
    assert 0 < auth.expires_in < float("inf")
    assert oauth.poll_wait(auth.interval) >= oauth.MIN_INTERVAL
    assert auth.interval == (5.0 if interval == "absent" else interval)  # RFC 8628 3.2


@pytest.mark.props
@given(user_code=st.text(max_size=70), path=st.text(max_size=30), complete=st.text(max_size=30))
def test_what_a_person_is_shown_never_steers_the_terminal(user_code, path, complete):
    answer = {"device_code": "d", "user_code": user_code, "expires_in": 600,
              "verification_uri": "https://app.foundries.io/" + path,
              "verification_uri_complete": "https://app.foundries.io/" + complete}
    try:
        auth = oauth.read_authorization(200, json.dumps(answer).encode())
    except BadAnswer:
        assert not (user_code.isprintable() and user_code and len(user_code) <= 64
                    and (path.isprintable() and " " not in path))
        return
    shown = oauth.prompt("u", "acme", auth)
    assert all(line.isprintable() for line in shown.splitlines())
    assert "\x1b" not in shown


# -- the flow on a clock the test drives -----------------------------------------------
# The agent's own code (oauth.obtain_token) against the kit's real endpoints, with the
# flow's clock and sleep driven here: every wait is recorded, none is spent. What a real
# process shows of the same (the prompt, the exit codes, the JSON) is tested above in
# real time.


class Clock:
    """A monotonic clock that moves only when the flow sleeps; ``sleeps``, every wait."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


def flow(device, server, clock: Clock, *argv: str, timeout: str | None = "40"):
    """Run the flow for ``device`` on ``clock``: (the Grant or the exception, Result)."""
    from lmp_autoreg.result import Result
    from lmp_autoreg.retry import Deadline

    extra = ("--timeout", timeout) if timeout is not None else ()
    settings = resolve(device, "--oauth", "--oauth-url", oauth_url(server), *extra, *argv,
                       terminal=False)
    result = Result()
    deadline = Deadline(settings.timeout, clock.monotonic)
    try:
        outcome = oauth.obtain_token(settings, "dev-uuid", result, deadline, sleep=clock.sleep)
    except (NoAnswer, ServerRefused) as e:
        outcome = e
    return outcome, result


def test_slow_down_adds_five_seconds_for_good(serve, device):
    server, _ = serve(slow_down_at={1}, approve_after=3)
    clock = Clock()
    grant, result = flow(device, server, clock)
    assert isinstance(grant, oauth.Grant)
    # 1 s, then 1 s + 5 s after slow_down, for every poll after it.
    assert clock.sleeps == [1.0, 6.0, 6.0]
    assert len(polls(server)) == 3
    assert result.oauth["interval"] == 6.0 and result.oauth["state"] == "approved"


def test_the_codes_lifetime_ends_the_flow(serve, device):
    server, _ = serve(expires_in=2.5)
    clock = Clock()
    error, result = flow(device, server, clock, timeout=None)
    assert isinstance(error, NoAnswer) and "expired (2.5 s)" in str(error)
    assert result.oauth["state"] == "expired"
    # Polls at 1 s and 2 s; the next, at 3 s, would come after the code's end: not sent.
    assert clock.sleeps == [1.0, 1.0] and len(polls(server)) == 2


def test_the_deadline_bounds_the_flow(serve, device):
    server, _ = serve()  # nobody ever approves; the code lives 15 minutes
    clock = Clock()
    error, result = flow(device, server, clock, timeout="3")
    assert isinstance(error, NoAnswer) and "--timeout 3" in str(error)
    assert result.oauth["state"] == "timed-out"
    # Polls at 1 and 2 s; none at 3 s, the deadline.
    assert clock.sleeps == [1.0, 1.0] and len(polls(server)) == 2


def test_other_errors_are_retried_with_backoff(serve, device, caplog):
    server, authority = serve(approve_after=1)
    authority.script_token((500, "<html>oops</html>"), (200, "not json"))
    clock = Clock()
    with caplog.at_level("WARNING", logger="lmp_autoreg"):
        grant, _ = flow(device, server, clock)
    assert isinstance(grant, oauth.Grant)
    # The interval, then the agent's backoff: 1 s after the first failure, 2 s after the
    # second in a row (never the 1 s interval again).
    assert clock.sleeps == [1.0, 1.0, 2.0] and len(polls(server)) == 3
    assert "token poll 1 failed: HTTP 500" in caplog.text


def test_never_polls_faster_than_once_a_second(serve, device):
    """The floor: an interval of 0 from the server is not a busy loop."""
    server, _ = serve(interval=0, approve_after=3)
    clock = Clock()
    grant, result = flow(device, server, clock)
    assert isinstance(grant, oauth.Grant)
    assert clock.sleeps == [oauth.MIN_INTERVAL] * 3
    assert result.oauth["interval"] == oauth.MIN_INTERVAL


# RFC 8628 appendix A and RFC 6749 appendix A.17: a device code and an access token are
# 1*VSCHAR (printable ASCII). JSON can carry anything else, a lone surrogate included.
CANNOT_CARRY = ["\ud800", "t\u00f6ken", "tab\tx", ""]


@pytest.mark.parametrize("value", CANNOT_CARRY)
def test_a_device_code_http_cannot_carry_is_a_bad_answer(tmp_path_factory, value):
    """Every device authorization answer bad, to the deadline: a real process, exit 5."""
    root = tmp_path_factory.mktemp("device")
    dev = FakeDevice(root, token=None).build()
    authority = OAuthAuthority(interval=1, approve_after=1)
    code = {"device_code": value, "user_code": "ABCD-EFGH", "expires_in": 900, "interval": 1,
            "verification_uri": "https://app.example/activate"}
    authority.script_device(*[(200, json.dumps(code))] * 20)
    with RegistrationServer(oauth=authority) as server:
        run = run_cli(*with_timeout(by_hand(dev, server), "3"), timeout=30)
    assert run.returncode == 5, run.stderr
    assert run.json["exit_code"] == 5 and "Traceback" not in run.stderr
    assert "device_code" in run.json["error"]["message"]
    assert not Path(dev.sota / "client.pem").exists()


@pytest.mark.parametrize("value", CANNOT_CARRY)
def test_an_access_token_http_cannot_carry_is_a_bad_answer(serve, device, value):
    server, authority = serve(approve_after=1)
    authority.script_token(*[(200, json.dumps({"access_token": value}))] * 20)
    clock = Clock()
    error, result = flow(device, server, clock, timeout="3")
    assert isinstance(error, NoAnswer) and "access_token" in str(error)
    assert result.oauth["state"] == "timed-out" and sum(clock.sleeps) < 3.0
