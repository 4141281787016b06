"""The agent driven from the outside: a real subprocess against the test kit's server."""

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lmp_autoreg import __version__
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.server import RegistrationServer, Reply

from conftest import clean_env, device_args, run_cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_version_and_help():
    run = run_cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"lmp-device-auto-register {__version__}"
    run = run_cli("--help")
    assert run.returncode == 0 and "register" in run.stdout and "status" in run.stdout


@pytest.mark.parametrize("args", [("--help",), ("register", "--help")])
def test_help_is_plain_text_where_colour_is_asked_for(args):
    """Python 3.14's argparse colours help when FORCE_COLOR is set; the agent's stays plain
    text (cli._PlainFormatter), for the journal and for a jig that reads it."""
    run = run_cli(*args, env=clean_env(FORCE_COLOR="1", TERM="xterm-256color"))
    assert run.returncode == 0
    assert run.stdout.startswith("usage: lmp-device-auto-register") and "--help" in run.stdout
    assert "\x1b[" not in run.stdout


def test_registers_and_reports_json(device_root, registration_server, sota):
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 0, run.stderr
    out = run.json
    assert out["result"] == "registered" and out["exit_code"] == 0 and out["error"] is None
    assert out["factory"] == "acme" and out["hardware_id"] == "intel-corei7-64"
    assert out["apps"] == ["app1", "app2"] and out["production"] is False
    assert out["name"] == out["uuid"] and out["sota_dir"] == "/var/sota"
    assert out["files"] == {"pkey.pem": "0600", "client.chained": "0644", "client.pem": "0644",
                            "root.crt": "0644", "sota.toml": "0644"}
    assert out["certificate"]["subject"].startswith(f"CN={out['uuid']}") or \
        f"CN={out['uuid']}" in out["certificate"]["subject"]
    for name in out["files"]:
        assert (sota / name).is_file()
    assert mode(sota / "pkey.pem") == 0o600
    [request] = registration_server.requests
    assert request.json["uuid"] == out["uuid"]
    assert request.headers["OSF-TOKEN"] == "not-a-real-token"
    assert request.headers["User-Agent"] == f"lmp-device-auto-register/{__version__}"
    # The token never shows in what the agent prints.
    assert "not-a-real-token" not in run.stdout + run.stderr


def test_text_output_names_uuid_and_files(device_root, registration_server):
    run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 0, run.stderr
    uuid = registration_server.requests[0].json["uuid"]
    assert f"registered {uuid}" in run.stdout and "pkey.pem (0600)" in run.stdout


def test_already_registered_exits_3_and_sends_nothing(device_root, registration_server, sota):
    assert run_cli(*device_args(device_root, registration_server)).returncode == 0
    before = {p: p.read_bytes() for p in sota.iterdir() if p.is_file()}
    uuid = registration_server.requests[0].json["uuid"]
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 3
    assert run.json["result"] == "already-registered" and run.json["uuid"] == uuid
    assert run.json["exit_code"] == 3 and run.json["sota_dir"] == "/var/sota"
    assert len(registration_server.requests) == 1
    assert {p: p.read_bytes() for p in sota.iterdir() if p.is_file()} == before


def test_sql_db_alone_means_registered(device_root, registration_server, sota):
    (sota / "sql.db").write_bytes(b"")
    run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 3 and registration_server.requests == []


def test_force_registers_again(device_root, registration_server, sota):
    assert run_cli(*device_args(device_root, registration_server)).returncode == 0
    (sota / "sql.db").write_bytes(b"old database")
    run = run_cli(*device_args(device_root, registration_server, "--force", "--json"))
    assert run.returncode == 0, run.stderr
    first, second = (r.json["uuid"] for r in registration_server.requests)
    assert first != second and run.json["uuid"] == second
    assert not (sota / "sql.db").exists()
    assert "removed the previous registration" in run.stderr


def test_a_failed_force_keeps_the_old_registration(device_root, registration_server, sota):
    assert run_cli(*device_args(device_root, registration_server)).returncode == 0
    (sota / "sql.db").write_bytes(b"old database")
    before = {p.name: p.read_bytes() for p in sota.iterdir() if p.is_file()}
    registration_server.default = Reply.error(400, "no more devices today")
    run = run_cli(*device_args(device_root, registration_server, "--force"))
    assert run.returncode == 4
    assert {p.name: p.read_bytes() for p in sota.iterdir() if p.is_file()} == before
    assert run_cli("status", "--sysroot", str(device_root.root)).returncode == 0


def test_files_a_killed_run_set_aside_are_put_back_first(device_root, registration_server,
                                                          sota):
    assert run_cli(*device_args(device_root, registration_server)).returncode == 0
    before = {p.name: p.read_bytes() for p in sota.iterdir() if p.is_file()}
    aside = sota / ".lmp-autoreg" / "aside"  # where a run killed after setting them aside
    aside.mkdir()
    for name in before:
        (sota / name).rename(aside / name)
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 3, run.stderr  # put back, so registered: nothing to do
    assert {p.name: p.read_bytes() for p in sota.iterdir() if p.is_file()} == before
    assert not aside.exists() and len(registration_server.requests) == 1


def test_an_image_whose_sota_dir_is_an_absolute_link(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "image", sota_dir="/data/sota").build()
    (device.root / "var").mkdir()
    (device.root / "var" / "sota").symlink_to("/data/sota")  # absolute, as in the image
    run = run_cli(*device_args(device, registration_server, "--json"))
    assert run.returncode == 0, run.stderr
    assert (device.root / "data/sota/sota.toml").is_file()
    assert registration_server.requests[0].json["sota-config-dir"] == "/var/sota"
    assert not Path("/data/sota/sota.toml").exists()


def test_missing_factory_exits_2_naming_every_place(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "dev", factory=None).build()
    run = run_cli(*device_args(device, registration_server, "--json"))
    assert run.returncode == 2
    message = run.json["error"]["message"]
    for place in ("--factory", "$DEVICE_FACTORY",
                  "DEVICE_FACTORY in /etc/default/lmp-device-auto-register",
                  "LMP_FACTORY in /etc/os-release"):
        assert place in message
    assert run.json["error"]["kind"] == "config" and registration_server.requests == []


def test_factory_lmp_is_refused(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "dev", factory="lmp").build()
    run = run_cli(*device_args(device, registration_server))
    assert run.returncode == 2 and "placeholder" in run.stderr


def test_missing_token_exits_2_unless_production(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "dev", token=None).build()
    run = run_cli(*device_args(device, registration_server))
    assert run.returncode == 2 and "API token is not set" in run.stderr
    assert "/etc/lmp-device-register-token" in run.stderr
    run = run_cli(*device_args(device, registration_server, "--production"))
    assert run.returncode == 0, run.stderr
    assert "OSF-TOKEN" not in registration_server.requests[0].headers


def test_bad_option_exits_2_with_json(device_root, registration_server):
    run = run_cli(*device_args(device_root, registration_server, "--json", "--uuid", "nope"))
    assert run.returncode == 2 and run.json["error"]["kind"] == "config"
    run = run_cli("register", "--no-such-option", "--json")
    assert run.returncode == 2 and run.json["result"] == "error"
    assert run.json["error"]["message"] == (
        "unrecognized arguments: --no-such-option (see 'lmp-device-auto-register --help')"
    )


@pytest.mark.parametrize(
    ("command", "abbreviation"),
    [((), "--prod"), (("register",), "--prod"), (("register", "--force"), "--dry"),
     ((), "--js"), (("status",), "--sys"), (("demo",), "--kee")],
)
def test_abbreviated_options_are_refused(device_root, registration_server, sota, command,
                                         abbreviation):
    """An option is typed whole or not at all: ``--prod`` does not mean ``--production``
    (nor ``--dry`` ``--dry-run``), whatever the command."""
    args = [*command, *device_args(device_root, registration_server)]
    if command[:1] in (("status",), ("demo",)):
        args = [*command]
    run = run_cli(*args, abbreviation, str(device_root.root), "--json")
    assert run.returncode == 2, run.stderr
    assert run.json["error"]["kind"] == "config"
    assert f"unrecognized arguments: {abbreviation}" in run.json["error"]["message"]
    assert registration_server.requests == [] and not (sota / "sota.toml").exists()


def test_short_options_still_combine(tmp_path):
    run = run_cli("status", "-vv", "--sysroot", str(tmp_path))
    assert run.returncode == 1 and run.stdout == "not registered\n", run.stderr


@pytest.mark.parametrize(
    ("word", "suggestion"),
    [("regster", "register"), ("stauts", "status"), ("dmeo", "demo"), ("registered", "register"),
     ("frobnicate", None)],
)
def test_a_typo_in_the_command_is_an_unknown_command(device_root, registration_server, sota,
                                                      word, suggestion):
    """A mistyped command is named as such, with the closest command, and nothing runs;
    it is not taken for ``register`` with a stray word."""
    run = run_cli(word, *device_args(device_root, registration_server), "--json")
    assert run.returncode == 2, run.stderr
    message = run.json["error"]["message"]
    assert message.startswith(f"unknown command '{word}': ")
    assert "the commands are register, status, demo" in message
    if suggestion:
        assert f"did you mean '{suggestion}'?" in message
    else:
        assert "did you mean" not in message
    assert f"unknown command '{word}'" in run.stderr
    assert registration_server.requests == [] and not (sota / ".lmp-autoreg").exists()


def test_register_is_the_command_when_the_first_word_is_an_option(device_root,
                                                                   registration_server):
    run = run_cli(*device_args(device_root, registration_server), "--json")
    assert run.returncode == 0 and run.json["result"] == "registered", run.stderr
    run = run_cli("--force", *device_args(device_root, registration_server), "--json")
    assert run.returncode == 0 and run.json["result"] == "registered", run.stderr


def test_server_refusal_exits_4_with_server_message(device_root, registration_server, sota):
    registration_server.enqueue(Reply.error(409, "Device already exists"))
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 4
    assert "HTTP 409" in run.json["error"]["message"]
    assert "Device already exists" in run.json["error"]["message"]
    assert run.json["error"]["kind"] == "refused"
    assert not (sota / "sota.toml").exists() and not (sota / "pkey.pem").exists()


def test_factory_mismatch_is_refused(tmp_path):
    device = FakeDevice(tmp_path / "dev", factory="acme").build()
    with RegistrationServer(factory="other") as server:
        run = run_cli(*device_args(device, server))
    assert run.returncode == 4 and "Invalid factory(acme) must be other" in run.stderr


def test_5xx_exits_5_and_installs_nothing(device_root, registration_server, sota):
    registration_server.default = Reply.html_500()
    run = run_cli(*device_args(device_root, registration_server, "--json", "--timeout", "1"))
    assert run.returncode == 5 and run.json["error"]["kind"] == "no-answer"
    # Only the pending identity (for the next run) and the lock are left.
    assert listing(sota) == [".lmp-autoreg", ".lmp-autoreg/identity.json", ".lmp-autoreg/lock",
                             "compose-apps", "compose-apps/app1",
                             "compose-apps/app1/docker-compose.yml", "compose-apps/app2",
                             "compose-apps/app2/docker-compose.yml"]


def test_no_server_exits_5(device_root, registration_server):
    url = registration_server.url
    registration_server.stop()
    run = run_cli("--sysroot", str(device_root.root), "--device-api", url, "--fioconfig", "off",
                  "--no-start", "--timeout", "2")
    assert run.returncode == 5 and "cannot reach" in run.stderr


def test_timeout_exits_5(device_root, registration_server):
    registration_server.default = Reply(delay=5)
    run = run_cli(*device_args(device_root, registration_server, "--timeout", "0.5"))
    assert run.returncode == 5 and "no answer" in run.stderr


def test_something_in_the_way_exits_6_writing_nothing(device_root, registration_server, sota):
    # A directory where sota.toml goes: found before the first file is written.
    (sota / "sota.toml").mkdir()
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 6, run.stderr
    message = run.json["error"]["message"]
    assert run.json["error"]["kind"] == "local" and f"cannot write {sota}/sota.toml" in message
    assert "something other than a file is in the way" in message
    for name in ("pkey.pem", "client.pem", "root.crt", "client.chained"):
        assert not (sota / name).exists()
    assert [p.name for p in sota.iterdir() if p.name.startswith(".")] == [".lmp-autoreg"]


def test_bad_answers_exit_5_and_write_nothing(device_root, registration_server, sota):
    sent = 0
    for reply in (Reply.bad_name("../evil"), Reply.other_key(), Reply.without("client.pem"),
                  Reply.not_json()):
        registration_server.enqueue(reply)  # then a give-up, whatever the start-up
        registration_server.default = Reply.give_up()
        run = run_cli(*device_args(device_root, registration_server, "--json"))
        assert run.returncode == 5, (reply, run.stderr)
        # The bad answer was retried; the give-up ended the run.
        assert "attempt 1 failed" in run.stderr and "gave up after 2 attempts" in run.stderr
        sent, before = len(registration_server.requests), sent
        assert sent - before == 2
        assert run.json["error"]["kind"] == "no-answer"
        assert not (sota / "pkey.pem").exists() and not (sota / "sota.toml").exists()
        assert not (sota.parent / "evil").exists()


def test_https_with_and_without_cacert(device_root, registration_server_tls, sota):
    server = registration_server_tls
    run = run_cli(*device_args(device_root, server, "--timeout", "3"))
    assert run.returncode == 5 and "certificate" in run.stderr.lower()
    assert "--cacert" in run.stderr and server.requests == []
    run = run_cli(*device_args(device_root, server, "--cacert", str(server.ca_file)))
    assert run.returncode == 0, run.stderr
    assert (sota / "sota.toml").exists()


def test_dry_run_sends_and_writes_nothing(device_root, registration_server, sota):
    before = listing(device_root.root)
    run = run_cli(*device_args(device_root, registration_server, "--dry-run"))
    assert run.returncode == 0, run.stderr
    request = json.loads(run.stdout)
    assert request["method"] == "POST" and request["url"] == registration_server.url
    assert request["headers"]["OSF-TOKEN"] == "<redacted>"
    assert request["body"]["overrides"]["pacman"]["compose_apps"] == '"app1,app2"'
    assert "not-a-real-token" not in run.stdout + run.stderr
    assert registration_server.requests == [] and listing(device_root.root) == before
    run = run_cli(*device_args(device_root, registration_server, "--dry-run", "--json"))
    assert run.returncode == 0 and run.json["result"] == "dry-run"


def test_status(device_root, registration_server):
    root = str(device_root.root)
    run = run_cli("status", "--sysroot", root, "--json")
    assert run.returncode == 1 and run.json["registered"] is False
    assert run_cli("status", "--sysroot", root).stdout.strip() == "not registered"
    assert run_cli(*device_args(device_root, registration_server, "--production")).returncode == 0
    run = run_cli("status", "--sysroot", root, "--json")
    assert run.returncode == 0
    assert run.json["registered"] is True and run.json["factory"] == "acme"
    assert run.json["uuid"] == registration_server.requests[0].json["uuid"]
    assert run.json["production"] is True and run.json["not_after"]
    assert run.json["sota_dir"] == "/var/sota" and run.json["pending"] is False
    run = run_cli("status", "--sysroot", root, "--bogus")
    assert run.returncode == 2


def rotate(sota, number: int) -> str:
    """What fioconfig's certificate rotation leaves: the certificate under a new name that
    sota.toml now points at (a device path), and another certificate at client.pem."""
    rotated = f"client.{number}.pem"
    (sota / "client.pem").rename(sota / rotated)
    toml = (sota / "sota.toml").read_text()
    line = 'tls_clientcert_path = "/var/sota/client.pem"'
    assert line in toml
    (sota / "sota.toml").write_text(toml.replace(line, line.replace("client.pem", rotated)))
    return rotated


def test_rotated_certificate_is_followed(device_root, registration_server, sota):
    assert run_cli(*device_args(device_root, registration_server)).returncode == 0
    uuid = registration_server.requests[0].json["uuid"]
    rotated = rotate(sota, 2468)
    (sota / "client.pem").write_text(registration_server.ca.cert_pem)  # not the device's
    root = str(device_root.root)
    for args in (("status", "--sysroot", root, "--json"),
                 device_args(device_root, registration_server, "--json")):
        run = run_cli(*args)
        assert run.json["uuid"] == uuid, run.stdout
    assert run.returncode == 3 and run.json["result"] == "already-registered"
    assert len(registration_server.requests) == 1
    (sota / "client.pem").unlink()  # the certificate sota.toml names is what counts
    assert run_cli("status", "--sysroot", root).returncode == 0
    (sota / rotated).unlink()
    (sota / "client.pem").write_text(registration_server.ca.cert_pem)
    run = run_cli("status", "--sysroot", root, "--json")
    assert run.returncode == 1 and run.json["registered"] is False


@pytest.mark.parametrize("ids", [("01", "03"), ("07", "09")])
def test_hsm_configuration_is_a_registration(device_root, registration_server, sota, ids):
    assert run_cli(*device_args(device_root, registration_server)).returncode == 0
    uuid = registration_server.requests[0].json["uuid"]
    (sota / "pkey.pem").unlink()
    with (sota / "sota.toml").open("a") as f:
        f.write(f'\n[p11]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\npass = "1234"\n'
                f'tls_pkey_id = "{ids[0]}"\ntls_clientcert_id = "{ids[1]}"\n')
    root = str(device_root.root)
    run = run_cli("status", "--sysroot", root, "--json")
    assert run.returncode == 0 and run.json["uuid"] == uuid
    (sota / "client.pem").unlink()  # the certificate is on the token
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 3 and run.json["uuid"] is None
    assert len(registration_server.requests) == 1


def test_console_script_runs_the_same_main():
    script = Path(sys.executable).parent / "lmp-device-auto-register"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                          env=clean_env())
    assert proc.returncode == 0 and proc.stdout == run_cli("--version").stdout


def test_demo_from_a_subprocess(tmp_path):
    run = run_cli("demo", "--json", "--keep", str(tmp_path / "dev"))
    assert run.returncode == 0, run.stderr
    out = run.json
    assert out["result"] == "registered" and out["production"] is True
    assert out["files"]["pkey.pem"] == "0600"
    assert "businessCategory=production" in out["certificate"]["subject"]
    assert (tmp_path / "dev/var/sota/sota.toml").is_file()
    # The configuration came through the kit's device gateway, decrypted with the key.
    assert out["fioconfig"] == "ok"
    assert out["config_files"] == {"wifi.conf": "0640", "motd": "0640"}
    secrets = tmp_path / "dev/var/run/secrets"
    assert (secrets / "wifi.conf").read_text().startswith("ssid=factory-floor\n")
    assert (tmp_path / "dev/var/sota/config.encrypted").is_file()
    run = run_cli("demo")
    assert run.returncode == 0, run.stderr
    assert "uuid:" in run.stdout and "issuer:" in run.stdout and "0600  pkey.pem" in run.stdout
    assert "check-in with the device gateway: ok" in run.stdout
    assert "0640  wifi.conf" in run.stdout


def test_demo_keep_refuses_a_used_directory_and_a_file(tmp_path):
    """``demo --keep`` builds a device only in a new or empty directory: on one already
    used, or on a plain file, it is a usage error that says what to do, and nothing
    there is touched."""
    used = tmp_path / "used"
    assert run_cli("demo", "--keep", str(used)).returncode == 0
    before = {p: p.read_bytes() for p in used.rglob("*") if p.is_file()}
    run = run_cli("demo", "--keep", str(used), "--json")
    assert run.returncode == 2, run.stderr
    assert run.json["error"]["kind"] == "config"
    assert run.json["error"]["message"] == (
        f"--keep {used}: the directory is not empty (an earlier demo's device?); remove it, "
        "or name a new or empty directory"
    )
    assert {p: p.read_bytes() for p in used.rglob("*") if p.is_file()} == before

    plain = tmp_path / "plain"
    plain.write_text("mine\n")
    for target in (plain, plain / "below"):
        run = run_cli("demo", "--keep", str(target))
        assert run.returncode == 2, run.stderr
        assert f"--keep {target}: " in run.stderr and "name a" in run.stderr
        assert "internal error" not in run.stderr
    assert "not a directory; name a new directory" in run_cli("demo", "--keep", str(plain)).stderr
    assert plain.read_text() == "mine\n"

    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_cli("demo", "--keep", str(empty), "--json")
    assert run.returncode == 0, run.stderr
    assert run.json["device_root"] == str(empty)


def test_every_missing_or_invalid_setting_is_named_in_one_run(tmp_path, registration_server):
    """One run names every setting that is missing or invalid, each with where it was
    looked for, so that a device is not fixed one setting per boot."""
    device = FakeDevice(tmp_path / "dev", factory=None, machine=None, token=None).build()
    env = clean_env(FIOCONFIG="maybe")
    run = run_cli("--sysroot", str(device.root), "--device-api", registration_server.url,
                  "--uuid", "nope", "--timeout", "0", "--cacert", str(tmp_path / "no.pem"),
                  "--hsm-module", "/usr/lib/softhsm/libsofthsm2.so", "--json", env=env)
    assert run.returncode == 2, run.stderr
    message = run.json["error"]["message"]
    expected = [
        "factory is not set: looked in --factory, $DEVICE_FACTORY, DEVICE_FACTORY in "
        "/etc/default/lmp-device-auto-register, LMP_FACTORY in /etc/os-release",
        "hardware id is not set: looked in --hwid, $HARDWARE_ID, HARDWARE_ID in "
        "/etc/default/lmp-device-auto-register, LMP_MACHINE in /etc/os-release",
        "uuid from --uuid is invalid: 'nope' is not of the form 8-4-4-4-12 hex digits",
        "API token is not set: looked in --token-file, $TOKEN_FILE",
        "fioconfig from $FIOCONFIG is invalid: 'maybe' is not one of auto, on, off",
        "partial HSM setting: --hsm-pin/HSM_PIN, --hsm-so-pin/HSM_SOPIN not set (looked on the "
        "command line and in /etc/sota/hsm)",
        "timeout from --timeout is invalid: '0.0' is not a positive number of seconds",
        f"CA bundle from --cacert is invalid: {tmp_path / 'no.pem'} is not a readable file",
    ]
    assert message.startswith(f"{len(expected)} settings are missing or invalid: ")
    positions = [message.find(text) for text in expected]
    assert -1 not in positions, message
    assert positions == sorted(positions)  # in the order of the settings
    assert message in run.stderr
    assert registration_server.requests == [] and not (device.sota / ".lmp-autoreg").exists()
    # One problem alone reads as itself, without a count.
    run = run_cli(*device_args(device, registration_server), "--factory", "acme",
                  "--hwid", "m", "--production", "--uuid", "nope", "--json")
    assert run.returncode == 2, run.stderr
    assert run.json["error"]["message"] == expected[2]
