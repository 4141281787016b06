"""Post-steps (fioconfig check-in, service starts, poweroff), through the real CLI with
fake fioconfig/systemctl executables on PATH that record how they were run."""

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from lmp_autoreg.poststeps import (
    checkin_outcome,
    fioconfig_command,
    fioconfig_environment,
    gateway_url,
    probe_gateway,
    systemd_running,
)
from lmp_autoreg.settings import resolve
from lmp_autoreg.testhook import SYSTEMD_RUNTIME_DIR_ENV
from lmp_autoreg.testing import RegistrationServer, Reply, ThrowawayCA
from lmp_autoreg.testing.gateway import ConfigFile, DeviceGateway

from conftest import device_args, live_device_args, run_cli
from fakebin import FakeBin
from pausing import Paused

TOKEN = "not-a-real-token"


@pytest.fixture
def fakes(tmp_path) -> FakeBin:
    bin_ = FakeBin(tmp_path / "bin")
    bin_.add("fioconfig")
    bin_.add("systemctl")
    bin_.add("systemd-run")
    return bin_


@pytest.fixture
def systemd(tmp_path) -> dict[str, str]:
    """The environment of an agent that sees systemd running."""
    runtime = tmp_path / "run-systemd-system"
    runtime.mkdir()
    return {SYSTEMD_RUNTIME_DIR_ENV: str(runtime)}


@pytest.fixture
def no_systemd(tmp_path) -> dict[str, str]:
    """The environment of an agent that sees no systemd (whatever runs this machine)."""
    return {SYSTEMD_RUNTIME_DIR_ENV: str(tmp_path / "no-such-dir")}


def register(device, server, fakes, env, *extra):
    return run_cli(*live_device_args(device, server, "--json", *extra),
                   env=fakes.environ(**env))


def commands(fakes: FakeBin) -> list[list[str]]:
    return [[c.name, *c.argv] for c in fakes.calls()]


def show(name: str) -> list[str]:
    return ["systemctl", "show", "--property=LoadState", "--property=ActiveState", name]


def queue(name: str) -> list[list[str]]:
    """How a start is queued: a transient unit of PID 1, after multi-user.target, that runs
    ``systemctl start`` (the fake systemd-run runs it at once)."""
    return [show(name),
            ["systemd-run", "--no-block", "--collect", "--quiet",
             f"--unit=lmp-autoreg-start-{name}", "--property=After=multi-user.target",
             "systemctl", "start", name],
            ["systemctl", "start", name]]


def through_pid1(fakes: FakeBin, *argv: str) -> list[str]:
    return ["systemd-run", "--wait", "--pipe", "--collect", "--quiet",
            "--unit=lmp-autoreg-fioconfig-check-in",
            "--property=EnvironmentFile=-/etc/default/fioconfig", str(fakes.dir / argv[0]),
            *argv[1:]]


def test_checkin_then_services_in_order(live_root, device_root, registration_server, fakes,
                                        systemd):
    env = {**systemd, "SOTA_DIR": "/elsewhere", "NOTIFY_SOCKET": str(fakes.dir / "nobody")}
    run = register(device_root, registration_server, fakes, env)
    assert run.returncode == 0, run.stderr
    sota = str(device_root.sota)
    checkin = ["fioconfig", "--config", "/usr/lib/sota/conf.d", "--config", f"{sota}/sota.toml",
               "--config", "/etc/sota/conf.d/", "check-in"]
    # The check-in runs through PID 1, outside our sandbox; the starts are only queued.
    assert commands(fakes) == [through_pid1(fakes, *checkin), checkin,
                               *queue("aktualizr-lite"), *queue("fioconfig")]
    out = run.json
    assert out["fioconfig"] == "ok"
    assert out["services"] == {"aktualizr-lite": "queued", "fioconfig": "queued"}
    # The check-in ran after the install: sota.toml was there for it.
    assert (device_root.sota / "sota.toml").is_file()
    # fioconfig reads SOTA_DIR as its own config path list; no child gets NOTIFY_SOCKET.
    checkin = fakes.calls("fioconfig")[0]
    assert "SOTA_DIR" not in checkin.env  # PID 1's environment and fioconfig's own file
    assert all("NOTIFY_SOCKET" not in c.env for c in fakes.calls())
    assert TOKEN not in json.dumps([c.__dict__ for c in fakes.calls()])


def test_custom_service_list_and_fioconfig_bin(live_root, device_root, registration_server,
                                               fakes, systemd, tmp_path):
    elsewhere = FakeBin(tmp_path / "opt")
    binary = elsewhere.add("fioconfig")
    run = register(device_root, registration_server, fakes, systemd,
                   "--start", "c-svc,a-svc,b-svc", "--fioconfig-bin", str(binary))
    assert run.returncode == 0, run.stderr
    assert fakes.calls("fioconfig") == [] and len(elsewhere.calls("fioconfig")) == 1
    assert commands(fakes)[1:] == [c for s in ("c-svc", "a-svc", "b-svc") for c in queue(s)]
    assert list(run.json["services"]) == ["c-svc", "a-svc", "b-svc"]


def test_auto_without_fioconfig_skips_it(live_root, device_root, registration_server, fakes,
                                         systemd):
    env = fakes.environ(**systemd)
    (fakes.dir / "fioconfig").unlink()
    env["PATH"] = str(fakes.dir)  # the agent runs as sys.executable: it needs no PATH
    run = run_cli(*live_device_args(device_root, registration_server, "--json"), env=env)
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == "skipped: fioconfig not found in PATH"
    assert "no fioconfig binary" in run.stderr
    assert run.json["services"] == {"aktualizr-lite": "queued", "fioconfig": "queued"}


def test_auto_failing_checkin_is_a_warning(live_root, device_root, registration_server, fakes,
                                           systemd):
    fakes.set("fioconfig", exit=1, stderr="check-in: HTTP 503 from the device gateway\n")
    run = register(device_root, registration_server, fakes, systemd)
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == "failed: exit status 1: check-in: HTTP 503 from the " \
        "device gateway"
    assert run.json["error"] is None
    assert "warning: fioconfig check-in failed: exit status 1" in run.stderr
    assert run.json["services"] == {"aktualizr-lite": "queued", "fioconfig": "queued"}


def test_checkin_timeout_is_bounded(live_root, device_root, registration_server, fakes, systemd,
                                    tmp_path):
    """The deadline bounds the check-in too: what the registration left of --timeout, not
    --timeout again. The test holds the agent 4 s before its request, so at most 6 s of
    the 10 are left for a check-in that would take 120."""
    fakes.set("fioconfig", sleep=120)
    args = live_device_args(device_root, registration_server, "--json", "--timeout", "10",
                            "--no-start")
    with Paused("before-request", tmp_path / "marker", args,
                env=fakes.environ(**systemd)) as paused:
        time.sleep(4.0)
        run = paused.resume(timeout=60)
    assert run.returncode == 0, run.stderr
    said = re.fullmatch(r"failed: timed out after (\d+) s", run.json["fioconfig"])
    assert said and int(said.group(1)) <= 6
    # The killed systemd-run left its unit running fioconfig: the agent stopped it.
    assert commands(fakes)[-1] == ["systemctl", "stop", "lmp-autoreg-fioconfig-check-in"]
    left = fakes.dir / "units" / "lmp-autoreg-fioconfig-check-in.pid"
    assert not left.exists(), "the check-in's unit was left running"


def test_on_failing_checkin_exits_7_and_starts_nothing(live_root, device_root,
                                                       registration_server, fakes, systemd):
    fakes.set("fioconfig", exit=2, stderr="no network\n")
    run = register(device_root, registration_server, fakes, systemd, "--fioconfig", "on")
    assert run.returncode == 7, run.stderr
    out = run.json
    assert out["exit_code"] == 7 and out["result"] == "registered"
    assert out["error"]["kind"] == "post-step" and "fioconfig" in out["error"]["message"]
    assert out["fioconfig"] == "failed: exit status 2: no network"
    assert out["services"] == {"aktualizr-lite": "skipped", "fioconfig": "skipped"}
    assert fakes.calls("systemctl") == []
    # Registered all the same: the files stay.
    assert out["uuid"] and (device_root.sota / "sota.toml").is_file()
    assert (device_root.sota / "client.pem").is_file()


def test_on_without_fioconfig_exits_7(live_root, device_root, registration_server, fakes,
                                      systemd, tmp_path):
    missing = str(tmp_path / "nowhere" / "fioconfig")
    run = register(device_root, registration_server, fakes, systemd, "--fioconfig", "on",
                   "--fioconfig-bin", missing)
    assert run.returncode == 7
    assert run.json["fioconfig"] == f"skipped: fioconfig not found in {missing}"
    assert f"error: fioconfig check-in skipped: no fioconfig binary (looked in {missing})" \
        in run.stderr


def test_off_runs_no_checkin(live_root, device_root, registration_server, fakes, systemd):
    run = register(device_root, registration_server, fakes, systemd, "--fioconfig", "off")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == "off" and fakes.calls("fioconfig") == []
    assert len(fakes.calls("systemctl")) == 4


def test_missing_unit_exits_7_after_trying_all(live_root, device_root, registration_server,
                                               fakes, systemd):
    fakes.set("systemctl", missing=["aktualizr-lite"])
    run = register(device_root, registration_server, fakes, systemd)
    assert run.returncode == 7
    out = run.json
    assert out["services"] == {"aktualizr-lite": "failed: aktualizr-lite is not-found",
                               "fioconfig": "queued"}
    assert out["result"] == "registered" and out["error"]["kind"] == "post-step"
    assert "could not start aktualizr-lite" in out["error"]["message"]
    # No start asked of a unit that does not exist; the next one is still queued.
    assert commands(fakes)[2:] == [show("aktualizr-lite"), *queue("fioconfig")]
    assert (device_root.sota / "sota.toml").is_file()


def test_start_that_cannot_be_queued_exits_7(live_root, device_root, registration_server,
                                             fakes, systemd):
    fakes.set("systemctl", active=["fioconfig"])
    fakes.set("systemd-run", when={"lmp-autoreg-start-aktualizr-lite": {
        "exit": 1, "stderr": "Failed to start transient service unit: Access denied\n"}})
    run = register(device_root, registration_server, fakes, systemd)
    assert run.returncode == 7
    assert run.json["services"] == {
        "aktualizr-lite": "failed: Failed to start transient service unit: Access denied",
        "fioconfig": "started",  # running already: nothing to queue
    }
    assert commands(fakes)[2:] == [*queue("aktualizr-lite")[:2], show("fioconfig")]


def test_no_start(live_root, device_root, registration_server, fakes, systemd):
    run = register(device_root, registration_server, fakes, systemd, "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["services"] == {} and fakes.calls("systemctl") == []
    assert run.json["fioconfig"] == "ok"


def test_poweroff_comes_after_the_result_is_out(live_root, device_root, registration_server,
                                                fakes, systemd, tmp_path):
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    seen = {str(out): str(tmp_path / "stdout-at-poweroff"),
            str(err): str(tmp_path / "stderr-at-poweroff")}
    fakes.set("systemctl", when={"poweroff": {"copy": seen}})
    with out.open("w") as stdout, err.open("w") as stderr:
        code = subprocess.run(
            [sys.executable, "-m", "lmp_autoreg",
             *live_device_args(device_root, registration_server, "--json", "--poweroff")],
            stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
            env=fakes.environ(**systemd), timeout=60).returncode
    assert code == 0, err.read_text()
    assert commands(fakes)[-1] == ["systemctl", "poweroff"]
    # What a jig or the journal keeps was written and flushed when the poweroff was asked.
    result = json.loads((tmp_path / "stdout-at-poweroff").read_text())
    assert result["result"] == "registered" and result["exit_code"] == 0
    assert result["services"] == {"aktualizr-lite": "queued", "fioconfig": "queued",
                                  "poweroff": "requested"}
    said = (tmp_path / "stderr-at-poweroff").read_text()
    assert f"done: registered {result['uuid']}" in said and "powering off" in said


def test_refused_poweroff_is_still_reported(live_root, device_root, registration_server,
                                            fakes, systemd):
    fakes.set("systemctl", when={"poweroff": {"exit": 1, "stderr": "Access denied\n"}})
    run = register(device_root, registration_server, fakes, systemd, "--poweroff", "--no-start")
    assert run.returncode == 7
    # The JSON was out before the poweroff was asked for; the refusal is the last line.
    assert run.json["result"] == "registered" and run.json["services"] == {"poweroff": "requested"}
    last = run.stderr.strip().splitlines()[-1]
    assert last == "lmp-device-auto-register: error: registered, but the poweroff was refused"
    assert "the poweroff was refused: Access denied" in run.stderr


def test_no_poweroff_after_a_failure(live_root, device_root, registration_server, fakes,
                                     systemd):
    fakes.set("systemd-run", when={"lmp-autoreg-start-fioconfig": {"exit": 1}})
    run = register(device_root, registration_server, fakes, systemd, "--poweroff")
    assert run.returncode == 7
    assert run.json["services"]["poweroff"] == "skipped"
    assert ["systemctl", "poweroff"] not in commands(fakes)


def test_no_poweroff_beats_the_environment(live_root, device_root, registration_server, fakes,
                                           systemd):
    run = register(device_root, registration_server, fakes, {**systemd, "POWEROFF": "1"},
                   "--no-poweroff")
    assert run.returncode == 0, run.stderr
    assert "poweroff" not in run.json["services"]
    assert ["systemctl", "poweroff"] not in commands(fakes)


def test_without_systemd_services_are_skipped(live_root, device_root, registration_server,
                                              fakes, no_systemd):
    run = register(device_root, registration_server, fakes, no_systemd, "--poweroff")
    assert run.returncode == 0, run.stderr
    assert run.json["services"] == {"aktualizr-lite": "skipped", "fioconfig": "skipped",
                                    "poweroff": "skipped"}
    assert "systemd is not running: not starting aktualizr-lite, fioconfig" in run.stderr
    assert "systemd is not running: not powering off" in run.stderr
    assert fakes.calls("systemctl") == []
    assert run.json["fioconfig"] == "ok"  # the check-in does not need systemd


def test_checkin_without_systemd_creates_secrets_dir_and_maps_123(
    live_root, device_root, registration_server, fakes, no_systemd, tmp_path
):
    secrets = tmp_path / "run" / "secrets"
    fakes.set("fioconfig", exit=123, stderr="level=ERROR msg=\"on-change handler failed\"\n")
    run = register(device_root, registration_server, fakes,
                   {**no_systemd, "SECRETS_DIR": str(secrets)}, "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == ('failed: a handler failed (exit status 123): '
                                     'level=ERROR msg="on-change handler failed"')
    assert secrets.is_dir()  # made before fioconfig ran, which needs it
    [checkin] = fakes.calls("fioconfig")
    assert checkin.env["SECRETS_DIR"] == str(secrets) and fakes.calls("systemd-run") == []


def test_fioconfig_environment_takes_its_default_file():
    env = fioconfig_environment({"PATH": "/bin", "SOTA_DIR": "/x", "CONFIG_URL": "a"},
                                {"CONFIG_URL": "b", "SECRETS_DIR": "/run/s"})
    assert env == {"PATH": "/bin", "CONFIG_URL": "b", "SECRETS_DIR": "/run/s"}
    assert checkin_outcome(0, "") == "ok"
    assert checkin_outcome(1, "a\nlast words\n\n") == "failed: exit status 1: last words"


def test_sysroot_skips_every_post_step(device_root, registration_server, fakes, systemd):
    args = device_args(device_root, registration_server, "--json")
    args = [a for a in args if a not in ("--no-start",)]
    args[args.index("--fioconfig") + 1] = "on"
    run = run_cli(*args, "--poweroff", env=fakes.environ(**systemd))
    assert run.returncode == 0, run.stderr
    note = f"skipped: --sysroot {device_root.root} is not /"
    assert run.json["fioconfig"] == note
    assert run.json["services"] == {"aktualizr-lite": "skipped", "fioconfig": "skipped",
                                    "poweroff": "skipped"}
    assert f"post-steps {note}" in run.stderr
    assert fakes.calls() == []


def test_fioconfig_command_for_the_default_sota_dir(fake_device):
    settings = resolve({}, {})
    assert fioconfig_command(settings, "/usr/bin/fioconfig") == ["/usr/bin/fioconfig", "check-in"]


def test_systemd_running_check(tmp_path):
    assert systemd_running({SYSTEMD_RUNTIME_DIR_ENV: str(tmp_path)})
    assert not systemd_running({SYSTEMD_RUNTIME_DIR_ENV: str(tmp_path / "x")})


def test_systemd_running_looks_at_run_systemd_system_by_default(fs):
    assert not systemd_running({})
    fs.create_file("/run/systemd/system")  # a file is not the directory systemd makes
    assert not systemd_running({SYSTEMD_RUNTIME_DIR_ENV: ""})
    fs.remove("/run/systemd/system")
    fs.create_dir("/run/systemd/system")
    assert systemd_running({})


# -- the check-in against the kit's device gateway (the stand-in fioconfig) -------------


def checkin_env(no_systemd, tmp_path, **extra) -> dict[str, str]:
    """An agent without systemd runs fioconfig as its child, with our SECRETS_DIR."""
    return {**no_systemd, "SECRETS_DIR": str(tmp_path / "run" / "secrets"), **extra}


def test_configuration_arrives_decrypted_into_a_new_secrets_dir(
    live_root, device_root, registration_server, fakes, no_systemd, tmp_path
):
    gateway = registration_server.gateway
    handlers = tmp_path / "handlers"
    handlers.mkdir()
    seen = tmp_path / "handler-saw"
    handler = handlers / "note"
    handler.write_text(f'#!/bin/sh\ncat "$CONFIG_FILE" > {seen}\n')
    handler.chmod(0o755)
    fakes.set("fioconfig", handlers_dir=f"{handlers}/")
    gateway.set_config(None, {"wifi.conf": "ssid=factory\n",
                              "banner": ConfigFile("hello\n", unencrypted=True),
                              "apps/key": ConfigFile("k\n", on_changed=(str(handler),))})
    run = register(device_root, registration_server, fakes,
                   checkin_env(no_systemd, tmp_path), "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == "ok"
    secrets = tmp_path / "run" / "secrets"
    assert (secrets / "wifi.conf").read_text() == "ssid=factory\n"  # decrypted
    assert (secrets / "banner").read_text() == "hello\n"
    assert (secrets / "apps" / "key").read_text() == "k\n" and seen.read_text() == "k\n"
    assert oct((secrets / "wifi.conf").stat().st_mode & 0o777) == oct(0o640)
    assert (device_root.sota / "config.encrypted").is_file()
    [get] = gateway.requests
    assert get.device == run.json["uuid"] and get.request.path == "/config"


@pytest.mark.registration_server(partially_detached=True, device_group="line-1")
def test_a_partially_detached_device_gets_its_groups_files_at_the_first_checkin(
    live_root, device_root, registration_server, fakes, no_systemd, tmp_path
):
    """The server creates the device in its devices API in group line-1 before answering;
    the first check-in then brings the files of every device and those of line-1, and
    none of another group's."""
    gateway = registration_server.gateway
    gateway.set_config(None, {"common.conf": "every device\n", "shared": "common\n"})
    gateway.set_group_config("line-1", {"line.conf": "line 1\n", "shared": "line 1 wins\n"})
    gateway.set_group_config("line-2", {"other.conf": "line 2\n"})
    run = register(device_root, registration_server, fakes,
                   checkin_env(no_systemd, tmp_path), "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == "ok"
    assert registration_server.devices_api.group_of(run.json["uuid"]) == "line-1"
    secrets = tmp_path / "run" / "secrets"
    assert sorted(p.name for p in secrets.iterdir()) == ["common.conf", "line.conf", "shared"]
    assert (secrets / "common.conf").read_text() == "every device\n"
    assert (secrets / "line.conf").read_text() == "line 1\n"
    assert (secrets / "shared").read_text() == "line 1 wins\n"
    [get] = gateway.requests  # one check-in: the first one had it all


def test_a_handler_failing_with_123_is_reported(
    live_root, device_root, registration_server, fakes, no_systemd, tmp_path
):
    handler = tmp_path / "handlers" / "fail"
    handler.parent.mkdir()
    handler.write_text("#!/bin/sh\nexit 123\n")
    handler.chmod(0o755)
    fakes.set("fioconfig", handlers_dir=f"{handler.parent}/")
    registration_server.gateway.set_config(None, {"x": ConfigFile("1", on_changed=(str(handler),))})
    run = register(device_root, registration_server, fakes, checkin_env(no_systemd, tmp_path),
                   "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"].startswith("failed: a handler failed (exit status 123): ")


def test_no_configuration_204_and_unchanged_304_are_ok(
    live_root, device_root, registration_server, fakes, no_systemd, tmp_path
):
    run = register(device_root, registration_server, fakes, checkin_env(no_systemd, tmp_path),
                   "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == "ok"
    assert not (device_root.sota / "config.encrypted").exists()  # a 204 stores nothing
    # A device that has the configuration already (config.encrypted newer): 304.
    gateway = registration_server.gateway
    gateway.set_config(None, {"f": "v"})
    stored = device_root.sota / "config.encrypted"
    stored.write_text('{"f": {"Value": "old", "Unencrypted": true}}')
    env = fakes.environ(**checkin_env(no_systemd, tmp_path))
    checkin = subprocess.run([str(fakes.dir / "fioconfig"), "--config",
                              str(device_root.sota / "sota.toml"), "check-in"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert checkin.returncode == 0, checkin.stderr
    assert "has not changed" in checkin.stderr and stored.read_text().endswith("true}}")
    assert "If-Modified-Since" in gateway.requests[-1].request.headers


def test_gateway_5xx_fails_after_fioconfigs_retries(
    live_root, device_root, registration_server, fakes, no_systemd, tmp_path
):
    fakes.set("fioconfig", retry_delays=[0.1] * 5)
    registration_server.gateway.enqueue(*[Reply.error(503, "busy")] * 6)
    run = register(device_root, registration_server, fakes, checkin_env(no_systemd, tmp_path),
                   "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == "failed: exit status 1: " + run.stderr.split(
        "fioconfig check-in failed: exit status 1: ")[1].splitlines()[0]
    assert "HTTP_503: busy" in run.json["fioconfig"]
    assert len(registration_server.gateway.requests) == 6


def test_a_refused_certificate_fails_the_checkin(
    live_root, device_root, registration_server, fakes, no_systemd, tmp_path
):
    with DeviceGateway(registration_server.ca, device_ca=ThrowawayCA("acme")) as other:
        fakes.set("fioconfig", retry_delays=[0.1] * 5)
        env = checkin_env(no_systemd, tmp_path, CONFIG_URL=f"{other.url}/config")
        run = register(device_root, registration_server, fakes, env, "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"].startswith("failed: exit status 1: ")
    assert "Unable to GET" in run.json["fioconfig"]
    assert other.requests == []  # no request got past the handshake


def test_an_unreachable_gateway_does_not_hold_the_boot(
    live_root, device_root, fakes, no_systemd, tmp_path
):
    with RegistrationServer() as server:
        assert server.gateway is None  # sota.toml names ota-lite.foundries.io
        with DeviceGateway(server.ca, listening=False) as gone:
            env = checkin_env(no_systemd, tmp_path, CONFIG_URL=f"{gone.url}/config")
            run = register(device_root, server, fakes, env, "--no-start")
            assert run.returncode == 0, run.stderr
            assert run.json["fioconfig"] == "unreachable"
            assert fakes.calls("fioconfig") == []  # not the minute of retries fioconfig takes
            assert f"the device gateway {gone.url}/config is unreachable" in run.stderr
            required = run_cli(*live_device_args(device_root, server, "--json", "--force",
                                                 "--fioconfig", "on", "--no-start"),
                               env=fakes.environ(**env))
    assert required.returncode == 7
    assert required.json["fioconfig"] == "unreachable"


def test_secrets_dir_exists_before_the_checkin(
    live_root, device_root, registration_server, fakes, no_systemd, tmp_path
):
    """fioconfig refuses to extract without its secrets dir: it must be there first."""
    registration_server.gateway.set_config(None, {"a": "b"})
    secrets = tmp_path / "deep" / "secrets"
    run = register(device_root, registration_server, fakes,
                   {**no_systemd, "SECRETS_DIR": str(secrets)}, "--no-start")
    assert run.returncode == 0, run.stderr
    assert run.json["fioconfig"] == "ok" and (secrets / "a").read_text() == "b"


@pytest.mark.parametrize(("configs", "config_url", "expected"), [
    ([], None, "https://ota-lite.foundries.io:8443/config"),
    ([("sota.toml", '[tls]\nserver = "https://gw:1"\n')], None, "https://gw:1/config"),
    ([("sota.toml", '[tls]\nserver = "https://gw:1"\n')], "https://x/c", "https://x/c"),
    # The last file name alphabetically wins; a later file of the same name replaces one.
    ([("sota.toml", '[tls]\nserver = "https://a:1"\n'),
      ("z-50.toml", '[tls]\nserver = "https://z:1"\n')], None, "https://z:1/config"),
    ([("a.toml", '[tls]\nserver = "https://a:1"\n'),
      ("a.toml", '[tls]\nserver = "https://b:1"\n')], None, "https://b:1/config"),
    ([("z.toml", "not toml ["), ("sota.toml", '[tls]\nserver = "https://s:2"\n')], None,
     "https://s:2/config"),
])
def test_gateway_url_as_fioconfig_resolves_it(configs, config_url, expected):
    assert gateway_url(configs, config_url) == expected


def test_probe_of_a_closed_port_says_why(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refused
        why = probe_gateway(f"https://127.0.0.1:{s.getsockname()[1]}/config", 5)
    assert why is not None and "refused" in why.lower()
    assert probe_gateway("https:///config", 5) == "https:///config names no host"
