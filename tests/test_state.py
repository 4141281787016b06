"""One identity per device, and one registration at a time (docs/reliability.md sections 2
and 3)."""

import fcntl
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lmp_autoreg import identity
from lmp_autoreg.errors import LocalFailure
from lmp_autoreg.paths import DevicePaths
from lmp_autoreg.state import State
from lmp_autoreg.testing.server import Reply

from conftest import device_args, run_cli
from pausing import Paused

# A server that asks to be retried in an hour: the agent gives up at once (exit 5) after
# one request, whatever its deadline, so no run here races the clock.
FAILING = Reply.give_up()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def public_key(pem: str | bytes) -> bytes:
    """The public key of a CSR or private key, DER: compares identities."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"CERTIFICATE REQUEST" in data:
        key = x509.load_pem_x509_csr(data).public_key()
    else:
        key = identity.key_from_pem(data).public_key()
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def status(device) -> dict:
    return run_cli("status", "--sysroot", str(device.root), "--json").json


def fail_once(device, server, *extra: str) -> str:
    """A run that gives up (exit 5); return the uuid it used."""
    server.default = FAILING
    run = run_cli(*device_args(device, server, "--timeout", "60", "--json", *extra))
    assert run.returncode == 5, run.stderr
    server.default = Reply()
    return run.json["uuid"]


def test_identity_is_kept_private_and_reused_by_the_next_run(device_root, registration_server,
                                                             sota):
    server = registration_server
    server.default = FAILING
    run = run_cli(*device_args(device_root, server, "--timeout", "60", "--json"), umask=0)
    assert run.returncode == 5
    first = run.json["uuid"]
    state = sota / ".lmp-autoreg"
    assert mode(state) == 0o700 and mode(state / "identity.json") == 0o600
    saved = json.loads((state / "identity.json").read_text())
    assert saved["uuid"] == first
    assert status(device_root)["pending"] is True

    server.default = Reply()
    run = run_cli(*device_args(device_root, server, "--json"))
    assert run.returncode == 0, run.stderr
    assert run.json["uuid"] == first
    assert "reusing the identity of an interrupted attempt" in run.stderr
    assert {r.json["uuid"] for r in server.requests} == {first}
    assert {public_key(r.json["csr"]) for r in server.requests} == {
        public_key(saved["key"])} == {public_key((sota / "pkey.pem").read_bytes())}
    # Removed after the install; the lock file stays (empty of secrets).
    assert sorted(p.name for p in state.iterdir()) == ["lock"]
    assert status(device_root)["pending"] is False


def test_force_starts_afresh(device_root, registration_server, sota):
    first = fail_once(device_root, registration_server)
    run = run_cli(*device_args(device_root, registration_server, "--force", "--json"))
    assert run.returncode == 0, run.stderr
    assert run.json["uuid"] != first
    csrs = [public_key(r.json["csr"]) for r in registration_server.requests]
    assert csrs[-1] != csrs[0]


def test_another_explicit_uuid_starts_afresh_the_same_one_reuses(device_root,
                                                                 registration_server):
    server = registration_server
    fail_once(device_root, server)
    other = "0a0b0c0d-1111-4222-8333-444455556666"
    assert fail_once(device_root, server, "--uuid", other) == other
    assert fail_once(device_root, server, "--uuid", other.upper()) == other
    run = run_cli(*device_args(device_root, server, "--uuid", other))
    assert run.returncode == 0, run.stderr
    keys = {}
    for request in server.requests:
        keys.setdefault(request.json["uuid"], set()).add(public_key(request.json["csr"]))
    assert len(keys) == 2 and len(keys[other]) == 1  # one key per uuid, reused


def test_dry_run_creates_nothing_and_shows_the_pending_uuid(device_root, registration_server,
                                                            sota):
    run = run_cli(*device_args(device_root, registration_server, "--dry-run"))
    assert run.returncode == 0 and not (sota / ".lmp-autoreg").exists()
    pending = fail_once(device_root, registration_server)
    before = {p: p.read_bytes() for p in sota.rglob("*") if p.is_file()}
    run = run_cli(*device_args(device_root, registration_server, "--dry-run", "--json"))
    assert run.returncode == 0
    assert run.json["uuid"] == pending and run.json["request"]["body"]["uuid"] == pending
    assert {p: p.read_bytes() for p in sota.rglob("*") if p.is_file()} == before
    assert "PRIVATE KEY" not in run.stdout + run.stderr


def test_409_for_a_reused_identity_says_what_to_do(device_root, registration_server):
    uuid = fail_once(device_root, registration_server)
    registration_server.default = Reply.error(409, "Device already exists")
    run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 4
    assert f"uuid {uuid} is the identity of an interrupted attempt" in run.stderr
    assert "--force" in run.stderr


@pytest.mark.parametrize(
    ("content", "warning"),
    [("{not json", "ignoring"),
     ('{"uuid": "0a0b0c0d-1111-4222-8333-444455556666", "key": "garbage"}', "cannot be read")],
)
def test_unreadable_identity_is_replaced(device_root, registration_server, sota, content,
                                         warning):
    fail_once(device_root, registration_server)
    (sota / ".lmp-autoreg/identity.json").write_text(content)
    run = run_cli(*device_args(device_root, registration_server, "--dry-run"))
    assert run.returncode == 0, run.stderr
    run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 0, run.stderr
    assert warning in run.stderr
    assert len({r.json["uuid"] for r in registration_server.requests}) == 2
    assert len({r.json["csr"] for r in registration_server.requests}) == 2


def test_unusable_journal_is_abandoned(device_root, registration_server, sota):
    fail_once(device_root, registration_server)
    pending = json.loads((sota / ".lmp-autoreg/identity.json").read_text())
    journal = {**pending, "files": {"client.pem": "not a certificate", "sota.toml": "x"}}
    (sota / ".lmp-autoreg/install.json").write_text(json.dumps(journal))
    (sota / "client.pem").write_text("not a certificate")  # what it had installed
    assert status(device_root)["registered"] is False
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 0, run.stderr
    assert "cannot be completed" in run.stderr
    assert run.json["uuid"] == pending["uuid"]  # the identity itself is fine: kept
    assert status(device_root)["registered"] is True


def test_second_run_exits_6_naming_the_first(device_root, registration_server, sota, tmp_path):
    args = device_args(device_root, registration_server)
    with Paused("before-request", tmp_path / "marker", args) as first:
        # At once, not after a deadline: run_cli's own limit (60 s) is far below it.
        second = run_cli(*args, "--json", "--timeout", "3600")
        assert second.returncode == 6, second.stderr
        assert f"pid {first.pid}" in second.json["error"]["message"]
        assert second.json["error"]["kind"] == "local"
        assert registration_server.requests == []
        done = first.resume()
    assert done.returncode == 0, done.stderr
    assert len(registration_server.requests) == 1


def test_lock_held_by_any_process(device_root, registration_server, sota):
    state = sota / ".lmp-autoreg"
    state.mkdir(mode=0o700)
    with open(state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 6 and f"pid {os.getpid()} holds" in run.stderr
    assert registration_server.requests == []
    assert run_cli(*device_args(device_root, registration_server)).returncode == 0


@pytest.mark.parametrize("take", [fcntl.flock, fcntl.lockf], ids=["flock", "posix-lock"])
def test_refuses_while_aktualizr_lite_holds_its_lock(device_root, registration_server, sota,
                                                     take):
    path = device_root.path("/var/lock/aklite.lock")
    path.parent.mkdir(parents=True)
    with open(path, "w") as lock:  # what aktualizr-lite does at start
        take(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = run_cli(*device_args(device_root, registration_server, "--json"))
        assert run.returncode == 6
        assert "aktualizr-lite is running" in run.json["error"]["message"]
        assert str(path) in run.json["error"]["message"]
        assert registration_server.requests == []
        assert not (sota / "pkey.pem").exists()
    # Released (aktualizr-lite stopped): the file alone does not stop a registration.
    run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 0, run.stderr
    assert path.read_bytes() == b""  # only read, never written


def test_journal_write_on_a_full_disk_names_the_path(fs):
    fs.create_dir("/var/sota")
    state = State(DevicePaths())
    with state.locked():
        fs.set_disk_usage(fs.get_disk_usage("/").used + 300, path="/")
        with pytest.raises(LocalFailure, match="cannot write /var/sota/.lmp-autoreg/install.json"):
            state.save_journal("u", "k" * 100, {"sota.toml": "x" * 400}, ["sota.toml"], {})
    assert sorted(os.listdir("/var/sota/.lmp-autoreg")) == ["lock"]
