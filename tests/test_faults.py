"""The fault-injection suite (docs/reliability.md section 8): the real agent against the
kit's server.

One row per fault. Each row asserts the exit code, the files left in the sota dir, the
number of requests, and that every request carried the same uuid (one device, never two).
A fault "once" is followed by good answers: the agent must retry and register. A fault
"always" is answered to every attempt until the agent gives up: to end it at a point the
server decides, not at a deadline that races the agent's start-up, its last answer is a
503 whose Retry-After reaches past the deadline (the agent gives up at once, exit 5).
So no count depends on how fast the agent starts or how loaded the machine is: the
deadline itself is the subject only of the rows that say so, with room for any start-up.
"""

import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmp_autoreg import identity
from lmp_autoreg.testing.server import RegistrationServer, Reply

from conftest import Run, clean_env, device_args, run_cli
from pausing import Paused
from softhsm import SoftHsm

REGISTERED = ["client.chained", "client.pem", "pkey.pem", "root.crt", "sota.toml"]
APPS = ["compose-apps"]
FAST = {"Retry-After": "0.1"}
# The server's last word to a fault "always": come back in an hour, past any deadline here.
GIVE_UP = Reply.give_up()
TIMEOUT = "60"  # the agent's deadline where it is not the subject: never reached


@dataclass
class Row:
    replies: list[Reply] = field(default_factory=list)  # scripted, then `default`
    default: Reply = field(default_factory=Reply)
    exit: int = 0
    requests: int = 1
    timeout: str = TIMEOUT
    message: str = ""  # in stderr
    server: dict = field(default_factory=dict)  # RegistrationServer arguments
    listen_after: str | None = None  # with listen_delay=None: listen once stderr says this


def always(fault: Reply, times: int = 2, **row) -> Row:
    """``fault`` to ``times`` attempts, then the server's GIVE_UP."""
    return Row(replies=[fault] * times, default=GIVE_UP, exit=5, requests=times + 1, **row)


ROWS = {
    "ok": Row(),
    # The port refuses connections until the agent has seen it refuse one, then listens.
    "down-then-up": Row(server={"listen_delay": None}, listen_after="Connection refused",
                        message="Connection refused"),
    "503 x3": Row(replies=[Reply(status=503, headers=FAST)] * 3, requests=4,
                  message="HTTP 503"),
    "503 always": always(Reply(status=503, headers=FAST), message="HTTP 503"),
    "503 with a Retry-After past the deadline": Row(default=GIVE_UP, exit=5,
                                                    message="gave up after 1 attempt "),
    "429 once": Row(replies=[Reply(status=429, headers=FAST)], requests=2,
                    message="HTTP 429"),
    # The deadline is the subject: an answer held until the server stops outlasts it. The
    # agent's start-up must take less than the timeout for its one request to be sent.
    "hang past the timeout": Row(default=Reply.hang(600), exit=5, timeout="5",
                                 message="no answer"),
    "closed without an answer once": Row(replies=[Reply(close=True)], requests=2),
    "409": Row(default=Reply.error(409, "Device already exists"), exit=4,
               message="Device already exists"),
    "400": Row(default=Reply.error(400, "Invalid factory(acme) must be other"), exit=4,
               message="Invalid factory(acme) must be other"),
    "500 HTML page once": Row(replies=[Reply.html_500()], requests=2,
                              message="Internal Server Error"),
    "500 HTML page always": always(Reply.html_500(), message="HTTP 500"),
    "201 non-JSON once": Row(replies=[Reply.not_json()], requests=2, message="not JSON"),
    "201 non-JSON always": always(Reply.not_json(), message="not JSON"),
    "201 without client.pem": always(Reply.without("client.pem"), message="lacks client.pem"),
    "201 with a bad file name": always(Reply.bad_name("../evil"), message="may not be written"),
    "201 with a certificate for another key": always(Reply.other_key(), message="another key"),
    "201 with a certificate for another uuid": always(Reply.other_cn(),
                                                      message="not this device"),
    "201 truncated once": Row(replies=[Reply.truncated(100)], requests=2,
                              message="broken answer"),
    "201 truncated always": always(Reply.truncated(100), message="broken answer"),
}


def run_agent(args: list[str], server: RegistrationServer, listen_after: str | None) -> Run:
    """The agent as a subprocess; with ``listen_after``, the server starts listening as soon
    as a line of the agent's stderr contains that text (an event, not a delay)."""
    proc = subprocess.Popen([sys.executable, "-m", "lmp_autoreg", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=clean_env())
    lines: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if listen_after is not None and listen_after in line:
                server.listen()

    reader = threading.Thread(target=read_stderr)
    reader.start()
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    reader.join(120)
    return Run(proc.wait(120), stdout, "".join(lines))


def left_in(sota: Path) -> list[str]:
    return sorted(p.name for p in sota.iterdir() if p.name != ".lmp-autoreg")


def state_files(sota: Path) -> list[str]:
    state = sota / ".lmp-autoreg"
    return sorted(p.name for p in state.iterdir()) if state.is_dir() else []


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_fault(device_root, sota, row: Row):
    with RegistrationServer(**row.server) as server:
        server.enqueue(*row.replies)
        server.default = row.default
        args = device_args(device_root, server, "--timeout", row.timeout, "--json")
        run = run_agent(args, server, row.listen_after)
        requests = server.requests
    assert run.returncode == row.exit, run.stderr
    assert run.json["exit_code"] == row.exit
    assert row.message in run.stderr
    assert len(requests) == row.requests, run.stderr
    uuids = {r.json["uuid"] for r in requests}
    assert uuids == {run.json["uuid"]}, "every request carries the same uuid"
    [uuid] = uuids
    assert len({r.json["csr"] for r in requests}) == 1  # the same key, too
    assert not (sota.parent / "evil").exists()
    if row.exit == 0:
        assert left_in(sota) == sorted(APPS + REGISTERED)
        assert state_files(sota) == ["lock"]  # the pending identity is gone
        key = identity.key_from_pem((sota / "pkey.pem").read_bytes())
        identity.check_client_certificate((sota / "client.pem").read_bytes(), uuid=uuid,
                                          public_key=key.public_key())
    else:
        assert left_in(sota) == APPS  # nothing installed
        assert state_files(sota) == ["identity.json", "lock"]  # kept for the next run
        assert run.json["error"]["kind"] in ("no-answer", "bad-answer", "refused")


@dataclass
class HsmRow:
    kill_at: str | None = None  # a testhook step: kill -9 there, then run again
    hsm: dict = field(default_factory=SoftHsm.settings)
    exit: int = 0
    message: str = ""


HSM_ROWS = {
    "hsm: killed after key generation": HsmRow(kill_at="before-request"),
    "hsm: killed after the certificate is stored, before sota.toml":
        HsmRow(kill_at="before-sota-toml"),
    "hsm: the token refuses the login": HsmRow(hsm=SoftHsm.settings(pin="wrong-pin"), exit=2,
                                               message="refused the login"),
    "hsm: the module does not load": HsmRow(hsm=SoftHsm.settings(module="/nonexistent.so"),
                                            exit=2, message="does not load"),
}


@pytest.mark.parametrize("row", HSM_ROWS.values(), ids=HSM_ROWS.keys())
def test_hsm_fault(tmp_path, row: HsmRow):
    """HSM mode: the same uuid and the same key on the token to the end, one request."""
    from lmp_autoreg.testing.device import FakeDevice

    token = SoftHsm(tmp_path / "softhsm")
    token.init_token()
    device = FakeDevice(tmp_path / "device", hsm=row.hsm).build()
    with RegistrationServer() as server:
        server.reject_duplicates = True  # a second request for the uuid would fail
        args = device_args(device, server, "--json")
        point = None
        if row.kill_at is not None:
            with Paused(row.kill_at, tmp_path / "marker", args, env=token.env) as paused:
                objects = token.objects()
                paused.kill()
            point = objects["public_key:tls"][0]["point"]
            stored = "certificate:client" in objects
            assert stored is (row.kill_at == "before-sota-toml")
            assert "sota.toml" not in left_in(device.sota)  # not registered
        run = run_cli(*args, env=token.env)
        posts = [r for r in server.requests if r.method == "POST"]
    assert run.returncode == row.exit, run.stderr
    assert row.message in run.stderr
    if row.exit:
        assert posts == [] and left_in(device.sota) == APPS
        assert token.counts() == {}  # nothing made on the token
        return
    assert len(posts) == 1 and posts[0].json["uuid"] == run.json["uuid"]
    assert left_in(device.sota) == sorted(
        [*APPS, *(n for n in REGISTERED if n != "pkey.pem")])
    assert token.counts() == {"private_key:tls": 1, "public_key:tls": 1,
                              "certificate:client": 1}
    if point is not None:  # the key made before the kill, never a second one
        assert token.objects()["public_key:tls"][0]["point"] == point
