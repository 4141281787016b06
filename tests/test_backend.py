"""The lmp-device-register backend: the pure parts (argv, environment, message mapping),
then the real CLI driving a fake lmp-device-register on PATH that imitates the C++ tool
(it really registers with the test kit's server, or fails with the tool's messages)."""

import json
from pathlib import Path

import pytest

from lmp_autoreg import backend_ldr
from lmp_autoreg.errors import (
    AlreadyRegistered,
    BadAnswer,
    ConfigError,
    LocalFailure,
    NoAnswer,
    ServerRefused,
    Unreachable,
)
from lmp_autoreg.settings import resolve
from lmp_autoreg.testhook import SYSTEMD_RUNTIME_DIR_ENV
from lmp_autoreg.testing.server import Reply

from conftest import live_device_args, run_cli
from fakebin import FakeBin

TOKEN = "not-a-real-token"
UUID = "5b0e2b4c-7d4e-4a57-9a3e-0c1d2e3f4a5b"
PIN, SO_PIN = "87654321", "12345678"
URL = "https://api.example.com/ota/devices/"


# -- pure parts -------------------------------------------------------------------------


def ldr_settings(cli=None, environ=None):
    return resolve({"backend": "lmp-device-register", **(cli or {})}, environ or {})


def test_command_from_the_settings(fake_device):
    settings = ldr_settings({"device_group": "lab", "name": "jig-7"})
    assert backend_ldr.command(settings, "/usr/bin/lmp-device-register", UUID) == [
        "/usr/bin/lmp-device-register", "--start-daemon", "0", "-T", TOKEN, "-n", "jig-7",
        "-u", UUID, "-t", "main", "-f", "acme", "-i", "intel-corei7-64", "-d", "/var/sota",
        "-a", "app1,app2", "-g", "lab",
    ]


def test_command_without_token_apps_or_name(fake_device):
    Path("/etc/lmp-device-register-token").unlink()
    for app in Path("/var/sota/compose-apps").iterdir():
        (app / "docker-compose.yml").unlink()
        app.rmdir()
    argv = backend_ldr.command(ldr_settings({"production": True}), "ldr", UUID)
    assert argv[argv.index("-T") + 1] == "na"  # empty would make the tool start OAuth
    assert argv[argv.index("-n") + 1] == UUID
    assert "-a" not in argv and "-g" not in argv


def test_command_options_only_when_asked(fake_device):
    settings = ldr_settings({"restorable_apps": "app1", "api_token_header": "X-Token"})
    argv = backend_ldr.command(settings, "ldr", UUID)
    assert argv[-4:] == ["-A", "app1", "-H", "X-Token"]


def test_hsm_settings_from_etc_sota_hsm(fake_device):
    Path("/etc/sota/hsm").write_text(
        f"HSM_MODULE=/usr/lib/softhsm/libsofthsm2.so\nHSM_PIN={PIN}\nHSM_SOPIN={SO_PIN}\n")
    argv = backend_ldr.command(ldr_settings(), "ldr", UUID)
    assert argv[-6:] == ["--hsm-module", "/usr/lib/softhsm/libsofthsm2.so",
                         "--hsm-pin", PIN, "--hsm-so-pin", SO_PIN]
    shown = backend_ldr.redact(argv)
    assert PIN not in shown and SO_PIN not in shown and TOKEN not in shown
    assert shown[shown.index("-T") + 1] == "<redacted>"
    assert shown[shown.index("--hsm-module") + 1] == "/usr/lib/softhsm/libsofthsm2.so"


def test_environment(fake_device):
    environ = {"PATH": "/usr/bin", "PRODUCTION": "", "NOTIFY_SOCKET": "/run/x"}
    env = backend_ldr.environment(ldr_settings({"device_api": URL, "production": False}),
                                  environ)
    assert env == {"PATH": "/usr/bin", "DEVICE_API": URL}  # PRODUCTION set means production
    env = backend_ldr.environment(ldr_settings({"production": True}), environ)
    assert env["PRODUCTION"] == "1"


@pytest.mark.parametrize(
    ("stderr", "error", "status"),
    [
        ("Unable to reach the device registration endpoint https://api.foundries.io/ota/devices/"
         "; err: Couldn't resolve host name\n", Unreachable, None),
        ("The device registration endpoint is not healthyhttps://x/; status code: 503\n",
         NoAnswer, None),
        ("Unable to post to https://x/: Timeout was reached\n", NoAnswer, None),
        ("Unable to create device: HTTP_502\n<html>Bad Gateway</html>\n", NoAnswer, None),
        ("Unable to create device: HTTP_429\n", NoAnswer, None),
        ("Unable to create device: HTTP_0\n", NoAnswer, None),
        ("Unable to create device: HTTP_409\nDevice already exists\n", ServerRefused, 409),
        ("Unable to create device: HTTP_400\nInvalid factory(x) must be y\n", ServerRefused, 400),
        ("Unable to create device: HTTP_302\n", BadAnswer, None),
        ("Device already registered\n", AlreadyRegistered, None),
        ("ERROR: Device appears to already be registered in /var/sota/sql.db\n",
         AlreadyRegistered, None),
        ("Unable to write to /var/sota. Please run as root\n", LocalFailure, None),
        ("ERROR: aktualizr-lite daemon appears to be running\n", LocalFailure, None),
        ("HSM incorrectly configured\n", LocalFailure, None),
        ("", LocalFailure, None),
    ],
)
def test_classify(stderr, error, status):
    e = backend_ldr.classify(255, stderr)
    assert type(e) is error
    assert str(e).startswith("lmp-device-register failed (exit status 255): ")
    assert (stderr.strip().splitlines() or ["nothing on stderr"])[0] in str(e)
    if status is not None:
        assert e.status == status


def test_scrub_removes_secrets():
    text = "Unable to run: pkcs11-tool --module m --pin 87654321 --so-pin 12345678 -T tok"
    assert backend_ldr.scrub(text, [PIN, SO_PIN, "tok"]).count("<redacted>") == 3


def test_find_binary(fake_device):
    with pytest.raises(ConfigError) as e:
        backend_ldr.find_binary(ldr_settings(), {"PATH": "/opt/bin"})
    assert "--lmp-device-register, $LMP_DEVICE_REGISTER, PATH (/opt/bin)" in str(e.value)
    assert "/usr/bin/lmp-device-register" in str(e.value)
    Path("/usr/bin").mkdir(parents=True, exist_ok=True)
    Path("/usr/bin/lmp-device-register").write_text("#!/bin/sh\n")
    Path("/usr/bin/lmp-device-register").chmod(0o755)
    assert backend_ldr.find_binary(ldr_settings(), {"PATH": "/opt/bin"}) == \
        "/usr/bin/lmp-device-register"
    Path("/opt/bin").mkdir(parents=True)
    Path("/opt/bin/lmp-device-register").write_text("#!/bin/sh\n")
    Path("/opt/bin/lmp-device-register").chmod(0o755)
    assert backend_ldr.find_binary(ldr_settings(), {"PATH": "/opt/bin"}) == \
        "/opt/bin/lmp-device-register"
    explicit = ldr_settings({"lmp_device_register": "/srv/ldr"})
    with pytest.raises(ConfigError, match="/srv/ldr .* is not an executable file"):
        backend_ldr.find_binary(explicit, {"PATH": "/opt/bin"})


# -- through the CLI --------------------------------------------------------------------


@pytest.fixture
def fakes(tmp_path) -> FakeBin:
    bin_ = FakeBin(tmp_path / "bin")
    bin_.add("lmp-device-register")
    bin_.add("fioconfig")
    bin_.add("systemctl")
    return bin_


@pytest.fixture
def env(fakes, tmp_path) -> dict[str, str]:
    runtime = tmp_path / "run-systemd-system"
    runtime.mkdir()
    return fakes.environ(**{SYSTEMD_RUNTIME_DIR_ENV: str(runtime)})


def ldr_args(device, server, *extra) -> list[str]:
    return live_device_args(device, server, "--backend", "lmp-device-register", "--json", *extra)


def sota_listing(device) -> list[str]:
    """The sota dir without the agent's own state (the pending uuid stays after a failure)."""
    return sorted(p.name for p in device.sota.iterdir() if p.name != ".lmp-autoreg")


def test_registers_through_the_tool(live_root, device_root, registration_server, fakes, env):
    run = run_cli(*ldr_args(device_root, registration_server, "-v"), env=env)
    assert run.returncode == 0, run.stderr
    out = run.json
    uuid = out["uuid"]
    assert out["result"] == "registered" and out["backend"] == "lmp-device-register"
    assert out["files"] == {"client.chained": "0644", "client.pem": "0644", "pkey.pem": "0600",
                            "root.crt": "0644", "sota.toml": "0644"}
    assert f"CN={uuid}" in out["certificate"]["subject"]
    [call] = fakes.calls("lmp-device-register")
    assert call.argv == ["--start-daemon", "0", "-T", TOKEN, "-n", uuid, "-u", uuid,
                         "-t", "main", "-f", "acme", "-i", "intel-corei7-64",
                         "-d", str(device_root.sota), "-a", "app1,app2"]
    assert call.env["DEVICE_API"] == registration_server.url and "PRODUCTION" not in call.env
    assert call.umask == 0o077  # the tool's key is never readable by others, even briefly
    [request] = registration_server.requests
    assert request.json["uuid"] == uuid and request.headers["OSF-TOKEN"] == TOKEN
    # The same post-steps as the native backend, after the tool.
    assert [c.name for c in fakes.calls()] == ["lmp-device-register", "fioconfig", "systemctl",
                                               "systemctl"]
    assert out["fioconfig"] == "ok" and out["services"]["aktualizr-lite"] == "started"
    # The token is on the tool's argv (it takes it nowhere else) but never in what we print.
    shown = f"running {fakes.dir}/lmp-device-register --start-daemon 0 -T <redacted> -n {uuid}"
    assert shown in run.stderr
    assert TOKEN not in run.stdout + run.stderr


def test_binary_from_environment_and_production(live_root, device_root, registration_server,
                                                fakes, env, tmp_path):
    other = FakeBin(tmp_path / "opt")
    binary = other.add("lmp-device-register")
    args = [a if a != "--no-production" else "--production"
            for a in ldr_args(device_root, registration_server)]
    run = run_cli(*args, env={**env, "LMP_DEVICE_REGISTER": str(binary)})
    assert run.returncode == 0, run.stderr
    assert fakes.calls("lmp-device-register") == []
    [call] = other.calls("lmp-device-register")
    assert call.env["PRODUCTION"] == "1"
    assert "businessCategory=production" in run.json["certificate"]["subject"]


def test_hsm_pins_reach_the_tool_only(live_root, device_root, registration_server, fakes, env):
    run = run_cli(*ldr_args(device_root, registration_server, "-v", "--hsm-module",
                            "/usr/lib/softhsm/libsofthsm2.so", "--hsm-pin", PIN,
                            "--hsm-so-pin", SO_PIN), env=env)
    assert run.returncode == 0, run.stderr
    [call] = fakes.calls("lmp-device-register")
    assert call.argv[-6:] == ["--hsm-module", "/usr/lib/softhsm/libsofthsm2.so",
                              "--hsm-pin", PIN, "--hsm-so-pin", SO_PIN]
    assert "pkey.pem" not in run.json["files"]
    assert not (device_root.sota / "pkey.pem").exists()
    for secret in (PIN, SO_PIN, TOKEN):
        assert secret not in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("stderr", "code", "kind"),
    [
        ("Unable to reach the device registration endpoint http://x; err: Couldn't connect\n",
         5, "no-answer"),
        ("Unable to create device: HTTP_503\nService Unavailable\n", 5, "no-answer"),
        ("Unable to create device: HTTP_409\nDevice already exists\n", 4, "refused"),
        ("Device already registered\n", 3, None),
        ("Unable to write to /var/sota. Please run as root\n", 6, "local"),
    ],
)
def test_tool_messages_become_exit_codes(live_root, device_root, registration_server, fakes,
                                         env, stderr, code, kind):
    before = sota_listing(device_root)
    fakes.set("lmp-device-register", stderr=stderr, exit=255)
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == code, run.stderr
    assert run.json["exit_code"] == code
    if kind is not None:
        assert run.json["error"]["kind"] == kind
        assert stderr.splitlines()[0] in run.json["error"]["message"]
    assert sota_listing(device_root) == before
    calls = fakes.calls()
    assert {c.name for c in calls} == {"lmp-device-register"}  # no post-steps
    assert len({c.argv[c.argv.index("-u") + 1] for c in calls}) == 1  # one uuid, retried or not


def test_tool_failures_worth_retrying_are_retried_with_one_uuid(
    live_root, device_root, registration_server, fakes, env
):
    registration_server.enqueue(Reply(status=503), Reply(status=503))
    run = run_cli(*ldr_args(device_root, registration_server, "--timeout", "10"), env=env)
    assert run.returncode == 0, run.stderr
    requests = registration_server.requests
    assert len(requests) == 3
    assert {r.json["uuid"] for r in requests} == {run.json["uuid"]}
    assert "attempt 1 failed" in run.stderr and "HTTP_503" in run.stderr


def test_real_refusal_and_unreachable_server(live_root, device_root, registration_server,
                                             fakes, env):
    registration_server.enqueue(Reply.error(409, "Device already exists"))
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == 4 and "HTTP_409" in run.json["error"]["message"]
    registration_server.stop()
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == 5
    assert "Unable to reach the device registration endpoint" in run.json["error"]["message"]


@pytest.mark.parametrize(
    ("mode", "code", "message"),
    [
        ("wrong-key", 5, "does not certify its pkey.pem"),
        ("no-toml", 5, "left no usable sota.toml"),
        ("crash", 6, "Could not store certificate"),
    ],
)
def test_what_the_tool_wrote_is_undone_on_failure(live_root, device_root, registration_server,
                                                  fakes, env, mode, code, message):
    (device_root.sota / "root.crt").write_text("an older file the tool overwrites\n")
    before = {p.name: p.read_bytes() for p in device_root.sota.iterdir() if p.is_file()}
    fakes.set("lmp-device-register", mode=mode)
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == code, run.stderr
    assert message in run.json["error"]["message"]
    # The tool did register, then failed; retries (exit 5) keep the same uuid.
    assert len(registration_server.requests) >= 1
    assert len({r.json["uuid"] for r in registration_server.requests}) == 1
    after = {p.name: p.read_bytes() for p in device_root.sota.iterdir() if p.is_file()}
    assert after == before
    assert "undid what lmp-device-register wrote" in run.stderr


def test_tool_timeout(live_root, device_root, registration_server, fakes, env):
    fakes.set("lmp-device-register", sleep=30)
    run = run_cli(*ldr_args(device_root, registration_server, "--timeout", "1"), env=env)
    assert run.returncode == 5
    message = run.json["error"]["message"]
    assert "lmp-device-register did not finish within" in message and "gave up" in message


def test_missing_tool_exits_2_naming_where_it_looked(live_root, device_root,
                                                     registration_server, fakes, env):
    if Path(backend_ldr.DEFAULT_PATH).exists():
        pytest.skip(f"this machine has {backend_ldr.DEFAULT_PATH}")
    (fakes.dir / "lmp-device-register").unlink()
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == 2 and run.json["error"]["kind"] == "config"
    message = run.json["error"]["message"]
    for place in ("--lmp-device-register", "$LMP_DEVICE_REGISTER", str(fakes.dir),
                  "/usr/bin/lmp-device-register"):
        assert place in message
    run = run_cli(*ldr_args(device_root, registration_server, "--lmp-device-register",
                            "/nonexistent/ldr"), env=env)
    assert run.returncode == 2 and "/nonexistent/ldr" in run.json["error"]["message"]


def test_already_registered_device_never_runs_the_tool(live_root, device_root,
                                                       registration_server, fakes, env):
    (device_root.sota / "sql.db").write_bytes(b"")
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == 3 and fakes.calls() == []


def test_dry_run_shows_the_redacted_command(live_root, device_root, registration_server,
                                            fakes, env):
    run = run_cli(*live_device_args(device_root, registration_server, "--backend",
                                    "lmp-device-register", "--dry-run"), env=env)
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["command"][0] == str(fakes.dir / "lmp-device-register")
    assert shown["command"][shown["command"].index("-T") + 1] == "<redacted>"
    assert shown["environment"] == {"DEVICE_API": registration_server.url}
    assert fakes.calls() == [] and registration_server.requests == []
    assert TOKEN not in run.stdout + run.stderr
