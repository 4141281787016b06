"""The fault-injection suite (issue 4, point 8): the real agent against the kit's server.

One row per fault. Each row asserts the exit code, the files left in the sota dir, the
number of requests, and that every request carried the same uuid (one device, never two).
A fault "once" is followed by good answers: the agent must retry and register. A fault
"always" lasts until the deadline: the agent must give up with nothing installed.
"""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmp_autoreg import identity
from lmp_autoreg.testing.server import RegistrationServer, Reply

from conftest import device_args, run_cli
from pausing import Paused
from softhsm import SoftHsm

REGISTERED = ["client.chained", "client.pem", "pkey.pem", "root.crt", "sota.toml"]
APPS = ["compose-apps"]
FAST = {"Retry-After": "0.1"}


@dataclass
class Row:
    replies: list[Reply] = field(default_factory=list)  # scripted, then `default`
    default: Reply = field(default_factory=Reply)
    exit: int = 0
    requests: tuple[int, int] = (1, 1)  # inclusive range
    timeout: str = "3"
    message: str = ""  # in stderr
    server: dict = field(default_factory=dict)  # RegistrationServer arguments


ROWS = {
    "ok": Row(),
    "down-then-up": Row(server={"listen_delay": 1.0}, timeout="5", message="Connection refused"),
    "503 x3": Row(replies=[Reply(status=503, headers=FAST)] * 3, requests=(4, 4),
                  message="HTTP 503"),
    # A last attempt starts only with retry.MIN_ATTEMPT (1 s) left: 2.5 s leaves 1.5 s of
    # attempts 0.1 s apart.
    "503 always": Row(default=Reply(status=503, headers=FAST), exit=5, requests=(4, 30),
                      timeout="2.5", message="HTTP 503"),
    "429 once": Row(replies=[Reply(status=429, headers=FAST)], requests=(2, 2),
                    message="HTTP 429"),
    "hang past the timeout": Row(default=Reply.hang(10), exit=5, timeout="1.5",
                                 message="no answer"),
    "closed without an answer once": Row(replies=[Reply(close=True)], requests=(2, 2)),
    "409": Row(default=Reply.error(409, "Device already exists"), exit=4,
               message="Device already exists"),
    "400": Row(default=Reply.error(400, "Invalid factory(acme) must be other"), exit=4,
               message="Invalid factory(acme) must be other"),
    "500 HTML page once": Row(replies=[Reply.html_500()], requests=(2, 2),
                              message="Internal Server Error"),
    "500 HTML page always": Row(default=Reply.html_500(), exit=5, requests=(2, 3),
                                timeout="1.5", message="HTTP 500"),
    "201 non-JSON once": Row(replies=[Reply.not_json()], requests=(2, 2), message="not JSON"),
    "201 non-JSON always": Row(default=Reply.not_json(), exit=5, requests=(2, 3),
                               timeout="1.5", message="not JSON"),
    "201 without client.pem": Row(default=Reply.without("client.pem"), exit=5,
                                  requests=(2, 3), timeout="1.5", message="lacks client.pem"),
    "201 with a bad file name": Row(default=Reply.bad_name("../evil"), exit=5,
                                    requests=(2, 3), timeout="1.5",
                                    message="may not be written"),
    "201 with a certificate for another key": Row(default=Reply.other_key(), exit=5,
                                                  requests=(2, 3), timeout="1.5",
                                                  message="another key"),
    "201 truncated once": Row(replies=[Reply.truncated(100)], requests=(2, 2),
                              message="broken answer"),
    "201 truncated always": Row(default=Reply.truncated(100), exit=5, requests=(2, 3),
                                timeout="1.5", message="broken answer"),
}


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
        run = run_cli(*device_args(device_root, server, "--timeout", row.timeout, "--json"))
        requests = server.requests
    assert run.returncode == row.exit, run.stderr
    assert run.json["exit_code"] == row.exit
    assert row.message in run.stderr
    low, high = row.requests
    assert low <= len(requests) <= high, len(requests)
    uuids = {r.json["uuid"] for r in requests}
    assert uuids == {run.json["uuid"]}, "every request carries the same uuid"
    [uuid] = uuids
    assert len({r.json["csr"] for r in requests}) == 1  # the same key, too
    assert not (sota.parent / "evil").exists()
    if row.exit == 0:
        assert left_in(sota) == sorted(APPS + REGISTERED)
        assert state_files(sota) == ["lock"]  # the pending identity is gone
        cert = identity.load_certificate((sota / "client.pem").read_bytes())
        assert identity.common_name(cert) == uuid
        key = identity.key_from_pem((sota / "pkey.pem").read_bytes())
        assert identity.same_public_key(cert, key)
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
