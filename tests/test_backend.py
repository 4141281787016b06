"""The lmp-device-register backend: the pure parts (argv, environment, message mapping),
then the real CLI driving a fake lmp-device-register on PATH that imitates the C++ tool
(it really registers with the test kit's server, or fails with the tool's messages)."""

import json
import shutil
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
        "/usr/bin/lmp-device-register", "--start-daemon", "0", "--production", "0",
        "-T", TOKEN, "-n", "jig-7", "-u", UUID, "-t", "main", "-f", "acme",
        "-i", "intel-corei7-64", "-d", "/var/sota", "-a", "app1,app2", "-g", "lab", "-A", " ",
    ]


def test_command_without_token_apps_or_name(fake_device):
    Path("/etc/lmp-device-register-token").unlink()
    for app in Path("/var/sota/compose-apps").iterdir():
        (app / "docker-compose.yml").unlink()
        app.rmdir()
    argv = backend_ldr.command(ldr_settings({"production": True}), "ldr", UUID)
    assert argv[argv.index("--production") + 1] == "1"
    assert argv[argv.index("-T") + 1] == "na"  # empty would make the tool start OAuth
    assert argv[argv.index("-n") + 1] == UUID
    assert "-a" not in argv and "-g" not in argv


def test_command_options_only_when_asked(fake_device):
    settings = ldr_settings({"restorable_apps": "app1", "api_token_header": "X-Token"})
    argv = backend_ldr.command(settings, "ldr", UUID)
    assert argv[-4:] == ["-A", "app1", "-H", "X-Token"]
    argv = backend_ldr.command(ldr_settings({"restorable_apps": ""}), "ldr", UUID)
    assert argv[-2:] == ["-A", ""]  # off; the tool's own default would be on


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


PARSE_NOISE = ("Unable to parse response from: http://x/sign Error is:\n <unspecified file>(1): "
               "garbage after data\nRaw response was: ")


@pytest.mark.parametrize(
    ("stderr", "error", "shown"),
    [
        ("Unable to reach the device registration endpoint https://api.foundries.io/ota/devices/"
         "; err: Couldn't resolve host name\n", Unreachable, "Couldn't resolve host name"),
        ("The device registration endpoint is not healthyhttps://x/; status code: 503\n",
         NoAnswer, "not healthy"),
        ("Unable to post to https://x/: Timeout was reached\nUnable to create device: HTTP_-1\n",
         NoAnswer, "Timeout was reached"),
        (PARSE_NOISE + "<html>Bad Gateway</html>\nUnable to create device: HTTP_502\n",
         NoAnswer, "(HTTP 502): <html>Bad Gateway</html>"),
        ("Unable to create device: HTTP_429\n", NoAnswer, "(HTTP 429): no message"),
        (PARSE_NOISE + "Device already exists\nUnable to create device: HTTP_409\n",
         ServerRefused, "server refused the registration (HTTP 409): Device already exists"),
        (PARSE_NOISE + "Invalid factory(other) must be acme\nUnable to create device: HTTP_400\n",
         ServerRefused, "(HTTP 400): Invalid factory(other) must be acme"),
        ("Unable to create device: HTTP_401\nerrors:\n\tdetail: bad token\n", ServerRefused,
         "(HTTP 401): errors: / detail: bad token"),
        ("Unable to create device: HTTP_302\n", BadAnswer, "HTTP 302"),
        ("ERROR: Device already registered in /var/sota\nRe-run with --force 1 to remove "
         "existing registration data\n", AlreadyRegistered, "Device already registered"),
        ("Unable to write to /var/sota\n", LocalFailure, "Unable to write to /var/sota"),
        ("ERROR: aktualizr-lite already running\n", LocalFailure, "already running"),
        ("Missing factory definition\n", ConfigError, "Missing factory definition"),
        ("Missing tag definition\n", ConfigError, "Missing tag definition"),
        ("Invalid UUID: 1234, aborting\n", ConfigError, "Invalid UUID"),
        ("HSM incorrectly configured\n", ConfigError, "HSM incorrectly configured"),
        ("", LocalFailure, "nothing on stderr"),
    ],
)
def test_classify(stderr, error, shown):
    e = backend_ldr.classify(255, stderr)
    assert type(e) is error
    assert str(e).startswith("lmp-device-register")
    assert shown in str(e)
    assert "Unable to parse" not in str(e) and "Raw response" not in str(e)
    if error is ServerRefused:
        assert e.status == int(stderr.rsplit("HTTP_", 1)[1].split()[0])


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
    bin_.add("systemd-run")
    return bin_


@pytest.fixture
def env(fakes, tmp_path) -> dict[str, str]:
    runtime = tmp_path / "run-systemd-system"
    runtime.mkdir()
    return fakes.environ(**{SYSTEMD_RUNTIME_DIR_ENV: str(runtime)})


def ldr_args(device, server, *extra) -> list[str]:
    """The tool is slow to start on a loaded machine: room for one attempt, unless a test
    that waits out retries gives a shorter --timeout."""
    return live_device_args(device, server, "--backend", "lmp-device-register", "--json",
                            "--timeout", "15", *extra)


def posts(server) -> list:
    """The POSTs the server received (the tool's HEAD health checks left out)."""
    return [r for r in server.requests if r.method == "POST"]


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
    assert call.argv == ["--start-daemon", "0", "--production", "0", "-T", TOKEN,
                         "-n", uuid, "-u", uuid, "-t", "main", "-f", "acme",
                         "-i", "intel-corei7-64", "-d", str(device_root.sota), "-a", "app1,app2",
                         "-A", " "]
    assert call.env["DEVICE_API"] == registration_server.url and "PRODUCTION" not in call.env
    assert call.umask == 0o077  # the tool's key is never readable by others, even briefly
    [request] = posts(registration_server)
    assert request.json["uuid"] == uuid and request.headers["OSF-TOKEN"] == TOKEN
    # The same post-steps as the native backend, after the tool.
    started = ["systemctl", "systemd-run", "systemctl"]  # show, queue, the queued start
    assert [c.name for c in fakes.calls()] == ["lmp-device-register", "systemd-run",
                                               "fioconfig", *started * 2]
    assert out["fioconfig"] == "ok" and out["services"]["aktualizr-lite"] == "queued"
    # The token is on the tool's argv (it takes it nowhere else) but never in what we print.
    shown = (f"running {fakes.dir}/lmp-device-register --start-daemon 0 --production 0 "
             f"-T <redacted> -n {uuid}")
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


def test_pins_the_tool_prints_are_cut_out(live_root, device_root, registration_server, fakes,
                                          env):
    """A tool that prints its PINs when it fails (as its releases that ran pkcs11-tool did):
    what the agent shows of it has them redacted."""
    fakes.set("lmp-device-register", mode="pkcs11-tool-fails")
    run = run_cli(*ldr_args(device_root, registration_server, "-vv", "--hsm-module",
                            "/usr/lib/softhsm/libsofthsm2.so", "--hsm-pin", PIN,
                            "--hsm-so-pin", SO_PIN), env=env)
    assert run.returncode == 6, run.stderr
    message = run.json["error"]["message"]
    assert "--so-pin <redacted> --pin <redacted>" in message and "CKR_PIN_INCORRECT" in message
    for secret in (PIN, SO_PIN, TOKEN):
        assert secret not in run.stdout + run.stderr


@pytest.mark.parametrize(
    ("stderr", "code", "kind", "shown"),
    [
        ("Unable to reach the device registration endpoint http://x; err: Couldn't connect\n",
         5, "no-answer", "Couldn't connect"),
        ("Unable to create device: HTTP_503\n", 5, "no-answer", "HTTP 503"),
        ("Unable to create device: HTTP_409\n", 4, "refused", "HTTP 409"),
        ("ERROR: Device already registered in /var/sota\n", 3, None, None),
        ("HSM incorrectly configured\n", 2, "config", "HSM incorrectly configured"),
        ("Unable to write to /var/sota\n", 6, "local", "Unable to write to"),
    ],
)
def test_tool_messages_become_exit_codes(live_root, device_root, registration_server, fakes,
                                         env, stderr, code, kind, shown):
    before = sota_listing(device_root)
    fakes.set("lmp-device-register", stderr=stderr, exit=255)
    run = run_cli(*ldr_args(device_root, registration_server, "--timeout", "3"), env=env)
    assert run.returncode == code, run.stderr
    assert run.json["exit_code"] == code
    if kind is not None:
        assert run.json["error"]["kind"] == kind
        assert shown in run.json["error"]["message"]
    assert sota_listing(device_root) == before
    calls = fakes.calls()
    assert {c.name for c in calls} == {"lmp-device-register"}  # no post-steps
    assert len({c.argv[c.argv.index("-u") + 1] for c in calls}) == 1  # one uuid, retried or not


def test_tool_failures_worth_retrying_are_retried_with_one_uuid(
    live_root, device_root, registration_server, fakes, env
):
    registration_server.enqueue(Reply(status=503), Reply(status=503))
    # Room for three runs of the tool however slowly it starts (emulated, 2 to 3 s each):
    # the run ends once the third is registered.
    run = run_cli(*ldr_args(device_root, registration_server, "--timeout", "60"), env=env)
    assert run.returncode == 0, run.stderr
    requests = posts(registration_server)
    assert len(requests) == 3
    assert {r.json["uuid"] for r in requests} == {run.json["uuid"]}
    assert "attempt 1 failed" in run.stderr and "HTTP 503" in run.stderr


def test_real_refusal_and_unreachable_server(live_root, device_root, registration_server,
                                             fakes, env):
    registration_server.enqueue(Reply.error(400, "Invalid factory(other) must be acme"))
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == 4, run.stderr
    message = run.json["error"]["message"]  # the server's words, not the tool's parse noise
    assert message == ("lmp-device-register: server refused the registration (HTTP 400): "
                       "Invalid factory(other) must be acme")
    registration_server.stop()
    run = run_cli(*ldr_args(device_root, registration_server, "--timeout", "3"), env=env)
    assert run.returncode == 5
    assert "Unable to reach the device registration endpoint" in run.stderr


@pytest.mark.parametrize(
    ("mode", "code", "message"),
    [
        ("wrong-key", 5, "certifies another key than this device's"),
        ("no-toml", 5, "left no usable sota.toml"),
        ("crash", 6, "Could not store certificate"),
    ],
)
def test_what_the_tool_wrote_is_undone_on_failure(live_root, device_root, registration_server,
                                                  fakes, env, mode, code, message):
    (device_root.sota / "root.crt").write_text("an older file the tool overwrites\n")
    before = {p.name: p.read_bytes() for p in device_root.sota.iterdir() if p.is_file()}
    fakes.set("lmp-device-register", mode=mode)
    run = run_cli(*ldr_args(device_root, registration_server, "--timeout", "6"), env=env)
    assert run.returncode == code, run.stderr
    # In the log: a last attempt cut short by the deadline reports only that in the JSON.
    assert message in run.stderr
    # The tool did register, then failed; retries (exit 5) keep the same uuid.
    assert len(posts(registration_server)) >= 1
    assert len({r.json["uuid"] for r in posts(registration_server)}) == 1
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
    assert fakes.calls() == [] and registration_server.requests == []  # not even a HEAD
    assert TOKEN not in run.stdout + run.stderr


# -- the same request as the native backend, and the tool's own checks -----------------


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        ("apps", []),
        ("no apps", None),
        ("a list", ["--restorable-apps", "app1"]),
        ("off", ["--restorable-apps", ""]),
        ("a group", ["--device-group", "lab"]),
    ],
)
def test_both_backends_send_the_same_body(live_root, device_root, registration_server, fakes,
                                          env, case, extra):
    args = live_device_args(device_root, registration_server, "--uuid", UUID, "--fioconfig",
                            "off", "--no-start", "--timeout", "15", *(extra or []))
    if extra is None:  # no apps given, none found: all apps
        i = args.index("--apps")
        del args[i:i + 2]
        shutil.rmtree(device_root.sota / "compose-apps")
    # The reference server refuses a group; the Foundries API, which takes one, is the peer.
    registration_server.accept_group = case == "a group"
    bodies = []
    for backend in ("native", "lmp-device-register"):
        run = run_cli(*args, "--backend", backend, env=env)
        assert run.returncode == 0, run.stderr
        body = dict(posts(registration_server)[-1].json)
        assert body.pop("csr").startswith("-----BEGIN CERTIFICATE REQUEST-----")
        bodies.append(body)
        for name in ("sota.toml", "client.pem", "pkey.pem", "root.crt", "client.chained"):
            (device_root.sota / name).unlink()
    native, tool = bodies
    assert native == tool
    pacman = native["overrides"]["pacman"]
    assert ("compose_apps" in pacman) is (case != "no apps")
    assert pacman.get("reset_apps") == {"a list": '"app1"', "off": None}.get(case, '" "')
    assert native.get("group") == ("lab" if case == "a group" else None)


def test_tool_built_for_production_registers_a_development_device(
    live_root, device_root, registration_server, fakes, env
):
    fakes.set("lmp-device-register", production_build=True)
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == 0, run.stderr
    assert run.json["production"] is False
    assert "businessCategory" not in run.json["certificate"]["subject"]
    [call] = fakes.calls("lmp-device-register")
    assert call.argv[call.argv.index("--production") + 1] == "0"
    assert "PRODUCTION" not in call.env


def test_unhealthy_endpoint_is_retried_then_no_answer(live_root, device_root,
                                                      registration_server, fakes, env):
    registration_server.head_status = 503  # the tool's HEAD check before the POST
    run = run_cli(*ldr_args(device_root, registration_server, "--timeout", "6"), env=env)
    assert run.returncode == 5, run.stderr
    # In the log (a last attempt cut short by the deadline reports only that in the JSON).
    assert "The device registration endpoint is not healthy" in run.stderr
    assert posts(registration_server) == []
    registration_server.head_status = 405  # the reference server's answer: healthy
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    ("mode", "hsm", "message"),
    [
        ("other-uuid", False, "succeeded, but client.pem is for "),
        ("hsm-no-p11", True, "left a sota.toml without the [p11] section"),
    ],
)
def test_backend_checks_what_the_tool_installed(live_root, device_root, registration_server,
                                                fakes, env, mode, hsm, message):
    fakes.set("lmp-device-register", mode=mode)
    hsm_args = ["--hsm-module", "/usr/lib/softhsm/libsofthsm2.so", "--hsm-pin", PIN,
                "--hsm-so-pin", SO_PIN] if hsm else []
    run = run_cli(*ldr_args(device_root, registration_server, "--timeout", "6", *hsm_args),
                  env=env)
    assert run.returncode == 5, run.stderr
    # The first attempt's reason (a last attempt cut by the deadline says only that).
    assert f"attempt 1 failed: lmp-device-register {message}" in run.stderr
    assert posts(registration_server)  # the tool did register: its files are refused
    assert not (device_root.sota / "sota.toml").exists()
    assert not (device_root.sota / "client.pem").exists()



# -- what is set aside: an old registration (--force), a half registration -------------


def sota_files(device) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mode & 0o7777)
            for p in device.sota.iterdir() if p.is_file()}


def test_failed_force_keeps_the_old_registration(live_root, device_root, registration_server,
                                                 fakes, env):
    run = run_cli(*ldr_args(device_root, registration_server), env=env)
    assert run.returncode == 0, run.stderr
    (device_root.sota / "sql.db").write_bytes(b"aktualizr-lite's database")
    before = sota_files(device_root)
    registration_server.stop()  # the tool cannot register: the old registration must stay
    run = run_cli(*ldr_args(device_root, registration_server, "--force", "--timeout", "3"),
                  env=env)
    assert run.returncode == 5, run.stderr
    assert sota_files(device_root) == before  # put back unchanged, modes included
    assert not (device_root.sota / ".lmp-autoreg" / "aside").exists()
    assert "put back what was set aside" in run.stderr


def test_forced_registration_through_the_tool_replaces_the_old(live_root, device_root,
                                                                 registration_server, fakes,
                                                                 env):
    assert run_cli(*ldr_args(device_root, registration_server), env=env).returncode == 0
    old = (device_root.sota / "client.pem").read_bytes()
    run = run_cli(*ldr_args(device_root, registration_server, "--force"), env=env)
    assert run.returncode == 0, run.stderr
    assert (device_root.sota / "client.pem").read_bytes() != old
    assert not (device_root.sota / ".lmp-autoreg" / "aside").exists()


@pytest.mark.parametrize("backend", ["native", "lmp-device-register"])
def test_half_registration_is_set_aside_and_restored(live_root, device_root,
                                                     registration_server, fakes, env, backend):
    (device_root.sota / "client.pem").write_text(registration_server.ca.cert_pem)
    (device_root.sota / "pkey.pem").write_text("a key of an older attempt\n")
    (device_root.sota / "pkey.pem").chmod(0o600)
    before = sota_files(device_root)
    args = ldr_args(device_root, registration_server, "--backend", backend, "--no-start",
                    "--fioconfig", "off")
    # Not a registration: neither backend calls it one.
    registration_server.enqueue(Reply.error(400, "Invalid factory(other) must be acme"))
    run = run_cli(*args, env=env)
    assert run.returncode == 4, run.stderr
    assert sota_files(device_root) == before  # the failed attempt put it back unchanged
    assert "half registration" in run.stderr
    run = run_cli(*args, env=env)
    assert run.returncode == 0, run.stderr
    assert (device_root.sota / "client.pem").read_bytes() != before["client.pem"][0]
    assert f"CN={run.json['uuid']}" in run.json["certificate"]["subject"]
    assert not (device_root.sota / ".lmp-autoreg" / "aside").exists()


@pytest.mark.parametrize("backend", ["native", "lmp-device-register"])
def test_a_dangling_link_of_a_half_registration_is_set_aside_never_written_through(
        live_root, device_root, registration_server, fakes, env, tmp_path, backend):
    """A link whose target is gone is a file of a half registration too: set aside (and put
    back as the same link), so that nothing, the tool included, writes through it."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = device_root.sota / "client.pem"
    link.symlink_to(outside / "client.pem")
    args = ldr_args(device_root, registration_server, "--backend", backend, "--no-start",
                    "--fioconfig", "off")
    registration_server.enqueue(Reply.error(400, "Invalid factory(other) must be acme"))
    run = run_cli(*args, env=env)
    assert run.returncode == 4, run.stderr
    assert link.is_symlink() and link.readlink() == outside / "client.pem"
    run = run_cli(*args, env=env)
    assert run.returncode == 0, run.stderr
    assert not link.is_symlink() and link.is_file()
    assert list(outside.iterdir()) == []
    assert not (device_root.sota / ".lmp-autoreg" / "aside").exists()


def test_the_tools_output_may_carry_any_bytes_of_the_server():
    """lmp-device-register prints the server's raw answer ("Raw response was: ..."), which
    may be any bytes: they are read with replacement, never a UnicodeDecodeError."""
    import sys

    from lmp_autoreg.util import run

    script = "import sys; sys.stderr.buffer.write(b'HTTP_400 \\xff\\xfe')"
    done = run([sys.executable, "-c", script], timeout=60)
    assert done.stderr == "HTTP_400 \ufffd\ufffd"
