"""The agent driven from the outside: a real subprocess against the test kit's server."""

import json
import stat
import subprocess
import sys
from pathlib import Path

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
    for reply in (Reply.bad_name("../evil"), Reply.other_key(), Reply.without("client.pem"),
                  Reply.not_json()):
        registration_server.enqueue(reply, reply)  # then a give-up, whatever the start-up
        registration_server.default = Reply.give_up()
        run = run_cli(*device_args(device_root, registration_server, "--json"))
        assert run.returncode == 5, (reply, run.stderr)
        # Both bad answers were retried; the give-up ended the run.
        assert "attempt 1 failed" in run.stderr and "attempt 2 failed" in run.stderr
        assert run.json["error"]["kind"] == "no-answer"
        assert not (sota / "pkey.pem").exists() and not (sota / "sota.toml").exists()
        assert not (sota.parent / "evil").exists()


def test_https_with_and_without_cacert(device_root, registration_server_tls, sota):
    server = registration_server_tls
    run = run_cli(*device_args(device_root, server, "--timeout", "1"))
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
    run = run_cli("demo")
    assert run.returncode == 0, run.stderr
    assert "uuid:" in run.stdout and "issuer:" in run.stdout and "0600  pkey.pem" in run.stdout
