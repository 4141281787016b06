"""Installing the answer (docs/spec.md section 4): modes, verification, and all-or-nothing."""

import stat
from pathlib import Path

import pytest

from lmp_autoreg.errors import BadAnswer, LocalFailure
from lmp_autoreg.guard import is_registered
from lmp_autoreg.install import PlannedFile, install, verify_answer
from lmp_autoreg.testing.server import Reply

from conftest import device_args, run_cli


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o277])
def test_modes_whatever_the_umask(device_root, registration_server, sota, umask):
    run = run_cli(*device_args(device_root, registration_server), umask=umask)
    assert run.returncode == 0, run.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in sota.iterdir() if p.is_file()}
    assert modes == {"pkey.pem": 0o600, "client.pem": 0o644, "root.crt": 0o644,
                     "client.chained": 0o644, "sota.toml": 0o644}


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply.bad_name("../evil"), "may not be written"),
        (Reply.bad_name(".hidden"), "may not be written"),
        (Reply.bad_name("sql.db"), "not the server's to write: ['sql.db']"),
        (Reply.bad_name("compose-apps"), "not the server's to write: ['compose-apps']"),
        (Reply.bad_name("pkey.pem"), "the device key never leaves the device"),
        (Reply.other_key(), "another key"),
        (Reply.without("client.pem"), "lacks client.pem"),
        (Reply.without("sota.toml"), "lacks sota.toml"),
        (Reply(files=lambda f: {**f, "sota.toml": "not = [toml"}), "not valid TOML"),
        (Reply(files=lambda f: {**f, "sota.toml": "  \n"}), "sota.toml is empty"),
        (Reply(files=lambda f: {**f, "root.crt": "garbage"}), "root.crt is not"),
        (Reply(files=lambda f: {**f, "client.chained": f["root.crt"]}), "client.chained"),
    ],
)
def test_untrustworthy_answers_write_nothing(device_root, registration_server, sota, reply,
                                             message):
    before = sorted(p.name for p in sota.iterdir())
    registration_server.enqueue(reply)  # then a give-up: no race with the agent's start-up
    registration_server.default = Reply.give_up()
    run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 5
    assert message in run.stderr
    assert sorted(p.name for p in sota.iterdir() if p.name != ".lmp-autoreg") == before
    assert not (sota.parent / "evil").exists()


def test_certificate_for_another_uuid_is_rejected(device_root, registration_server, sota):
    ca = registration_server.ca
    registration_server.enqueue(Reply(
        files=lambda f: {**f, "client.pem": ca.cert_for_other_key("someone-else")}))
    registration_server.default = Reply.give_up()
    run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 5 and "not this device" in run.stderr


def test_failure_between_two_files_restores_everything(fs):
    # Modes too: a file that was 0600 (an HSM device's sota.toml holds the PIN) stays 0600.
    fs.create_file("/var/sota/root.crt", contents="a root that was here before", st_mode=0o100600)
    fs.set_disk_usage(400, path="/var/sota")
    # pkey.pem and root.crt fit; client.pem does not: the disk fills between two files.
    plan = [PlannedFile("pkey.pem", b"key", 0o600), PlannedFile("root.crt", b"new root", 0o644),
            PlannedFile("client.pem", b"c" * 500, 0o644), PlannedFile("sota.toml", b"x=1", 0o644)]
    with pytest.raises(LocalFailure, match="cannot write /var/sota/client.pem: No space left"):
        install(Path("/var/sota"), plan)
    assert sorted(p.name for p in Path("/var/sota").iterdir()) == ["root.crt"]
    assert Path("/var/sota/root.crt").read_bytes() == b"a root that was here before"
    assert Path("/var/sota/root.crt").stat().st_mode & 0o777 == 0o600


def test_something_in_the_way_fails_before_any_write(tmp_path):
    (tmp_path / "client.pem").mkdir()
    plan = [PlannedFile("pkey.pem", b"key", 0o600), PlannedFile("client.pem", b"cert", 0o644)]
    with pytest.raises(LocalFailure, match="client.pem: something other than a file"):
        install(tmp_path, plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client.pem"]


def test_a_link_in_the_way_is_replaced_and_its_target_left_alone(tmp_path):
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_text("an old certificate on another partition")
    sota = tmp_path / "sota"
    sota.mkdir()
    (sota / "client.pem").symlink_to(elsewhere)
    install(sota, [PlannedFile("client.pem", b"cert", 0o644)])
    assert not (sota / "client.pem").is_symlink()
    assert (sota / "client.pem").read_bytes() == b"cert"
    assert elsewhere.read_text() == "an old certificate on another partition"


def test_disk_full_at_unit_level(fs):
    fs.create_dir("/var/sota")
    fs.set_disk_usage(200, path="/var/sota")
    plan = [PlannedFile("pkey.pem", b"k" * 50, 0o600),
            PlannedFile("sota.toml", b"x" * 500, 0o644)]
    with pytest.raises(LocalFailure, match="cannot write /var/sota/sota.toml: No space left"):
        install(Path("/var/sota"), plan)
    assert list(Path("/var/sota").iterdir()) == []


def test_is_registered_rules(tmp_path):
    assert not is_registered(tmp_path)
    (tmp_path / "sota.toml").write_text("[tls]\n")
    assert not is_registered(tmp_path)
    (tmp_path / "sota.toml").write_text('[p11]\nmodule = "/m.so"\n')
    assert is_registered(tmp_path)
    (tmp_path / "sota.toml").write_text("[tls]\n")
    (tmp_path / "client.pem").write_text("x")
    assert is_registered(tmp_path)
    (tmp_path / "sota.toml").unlink()
    assert not is_registered(tmp_path)
    (tmp_path / "sql.db").write_text("")
    assert is_registered(tmp_path)


def test_verify_answer_orders_sota_toml_last():
    from lmp_autoreg import identity
    from lmp_autoreg.testing.ca import ThrowawayCA

    ca = ThrowawayCA()
    device_key = identity.FileKey.generate()
    uuid = "11111111-2222-4333-8444-555555555555"
    cert = ca.sign_csr(identity.make_csr(device_key, uuid, "acme", False))
    files = {"sota.toml": "[tls]\n", "root.crt": ca.cert_pem, "client.pem": cert}
    plan = verify_answer(files, uuid=uuid, key=device_key)
    assert [p.name for p in plan] == ["pkey.pem", "client.pem", "root.crt", "sota.toml"]
    assert [p.mode for p in plan] == [0o600, 0o644, 0o644, 0o644]
    with pytest.raises(BadAnswer, match="pkey.pem"):
        verify_answer({**files, "pkey.pem": "x"}, uuid=uuid, key=device_key)
