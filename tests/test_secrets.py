"""Secrets (docs/reliability.md section 6): the token, PINs and keys never show; where a token
may go."""

import os

import pytest

from lmp_autoreg.errors import ConfigError
from lmp_autoreg.preflight import check_token_transport, is_loopback, token_file_warnings
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.server import RegistrationServer, Reply

import softhsm
from conftest import device_args, run_cli

TOKEN = "not-a-real-token"
PIN, SO_PIN = "73915-user-pin", "48620-so-pin"
GIVE_UP = Reply.give_up()


def shown(run) -> str:
    return run.stdout + run.stderr


def assert_no_secret(run) -> None:
    text = shown(run)
    for secret in (TOKEN, PIN, SO_PIN, "PRIVATE KEY"):
        assert secret not in text, secret


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--dry-run"],
        ["--json"],
        ["--dry-run", "--json"],
    ],
)
def test_token_and_key_never_show_on_success(device_root, registration_server, sota, extra):
    run = run_cli(*device_args(device_root, registration_server, "-vv", *extra))
    assert run.returncode == 0, run.stderr
    assert_no_secret(run)
    if "--dry-run" not in extra:
        assert registration_server.requests[0].headers["OSF-TOKEN"] == TOKEN  # it was sent


@pytest.mark.parametrize(
    ("reply", "code"),
    [(Reply.html_500(), 5), (Reply.error(401, f"invalid token {TOKEN}"), 4),
     (Reply.not_json(), 5), (Reply.other_key(), 5)],
    ids=["500", "401-echoing-the-token", "not-json", "other-key"],
)
def test_token_and_key_never_show_on_failure(device_root, registration_server, reply, code):
    # A refusal (4) ends the run at once; a fault worth retrying (5) is answered once,
    # then the server asks to be retried past the deadline: the agent gives up, whatever
    # the time its start-up took.
    registration_server.enqueue(reply)
    registration_server.default = reply if code == 4 else GIVE_UP
    run = run_cli(*device_args(device_root, registration_server, "-vv", "--json",
                               "--timeout", "60"))
    assert run.returncode == code, run.stderr
    assert run.json["exit_code"] == code
    assert_no_secret(run)


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--backend", "native"],
                                   ["--hsm-so-pin", SO_PIN]])
def test_hsm_pins_never_show(device_root, registration_server, extra):
    # Given on the command line, with a PIN missing, or complete but for a module with no
    # aktualizr token on this machine: every one of these is an error, none shows a PIN.
    args = ["--hsm-module", "/usr/lib/softhsm/libsofthsm2.so", "--hsm-pin", PIN]
    run = run_cli(*device_args(device_root, registration_server, "-vv", "--json", *args,
                               *extra))
    assert run.returncode == 2, run.stderr
    assert_no_secret(run)
    assert registration_server.requests == []


def test_hsm_pins_from_the_device_file_never_show(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "dev", hsm={"HSM_MODULE": "/m.so", "HSM_PIN": PIN,
                                                "HSM_SOPIN": SO_PIN}).build()
    run = run_cli(*device_args(device, registration_server, "-vv", "--json"))
    assert run.returncode == 2 and "HSM" in run.json["error"]["message"]
    assert_no_secret(run)


def test_a_token_refusing_the_pin_does_not_show_it(tmp_path, registration_server):
    """A real token, a wrong PIN: the error says the login was refused, without the PIN."""
    token = softhsm.SoftHsm(tmp_path / "softhsm")
    token.init_token()
    device = FakeDevice(tmp_path / "dev", hsm=softhsm.SoftHsm.settings(pin=PIN)).build()
    run = run_cli(*device_args(device, registration_server, "-vv", "--json"), env=token.env)
    assert run.returncode == 2, run.stderr
    assert "refused the login" in run.json["error"]["message"]
    assert_no_secret(run)
    assert softhsm.SO_PIN not in shown(run)
    assert registration_server.requests == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("LOCALHOST.", True), ("127.0.0.1", True), ("127.9.8.7", True),
     ("::1", True), ("10.0.0.1", False), ("0.0.0.0", False), ("::", False),
     ("api.foundries.io", False), ("127.0.0.1.example.com", False), ("", False)],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


def test_token_transport_rules():
    check_token_transport("https://api.foundries.io/ota/devices/", has_token=True,
                          allow_insecure=False)
    check_token_transport("http://[::1]:8080/sign", has_token=True, allow_insecure=False)
    check_token_transport("http://10.0.0.1/sign", has_token=False, allow_insecure=False)
    check_token_transport("http://10.0.0.1/sign", has_token=True, allow_insecure=True)
    with pytest.raises(ConfigError, match="plain http to 10.0.0.1"):
        check_token_transport("http://10.0.0.1/sign", has_token=True, allow_insecure=False)


def test_no_token_over_plain_http_to_another_host(device_root):
    # The server listens on every address; the agent is pointed at 0.0.0.0, which is not
    # a loopback address, yet reaches it: the refusal must come before any connection.
    with RegistrationServer(host="0.0.0.0") as server:
        run = run_cli(*device_args(device_root, server, "--json"))
        assert run.returncode == 2 and run.json["error"]["kind"] == "config"
        assert "--allow-insecure-token" in run.json["error"]["message"]
        assert server.requests == []
        assert not (device_root.sota / ".lmp-autoreg").exists()

        run = run_cli(*device_args(device_root, server, "--allow-insecure-token"))
        assert run.returncode == 0, run.stderr
        assert "sending the API token over plain http to 0.0.0.0" in run.stderr
        assert server.requests[0].headers["OSF-TOKEN"] == TOKEN


def test_plain_http_to_another_host_without_a_token(tmp_path):
    device = FakeDevice(tmp_path / "dev", token=None).build()
    with RegistrationServer(host="0.0.0.0") as server:
        run = run_cli(*device_args(device, server, "--production"))
        assert run.returncode == 0, run.stderr
        assert "OSF-TOKEN" not in server.requests[0].headers


def test_token_file_warnings(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    assert token_file_warnings(str(token), production=False) == []
    assert token_file_warnings(None, production=True) == []
    [warning] = token_file_warnings(str(token), production=True)
    assert "production" in warning and str(token) in warning
    token.chmod(0o644)
    [warning] = token_file_warnings(str(token), production=False)
    assert "readable by every user (mode 0644)" in warning


def test_token_file_warnings_from_the_agent(device_root, registration_server):
    token = device_root.path("/etc/lmp-device-register-token")
    os.chmod(token, 0o600)
    run = run_cli(*device_args(device_root, registration_server, "--dry-run"))
    assert run.returncode == 0 and "warning" not in run.stderr
    os.chmod(token, 0o644)
    run = run_cli(*device_args(device_root, registration_server, "--dry-run"))
    assert f"the API token file {token} is readable by every user" in run.stderr
    run = run_cli(*device_args(device_root, registration_server, "--dry-run", "--production"))
    assert f"an API token file ({token}) is used for a production registration" in run.stderr
    assert_no_secret(run)
