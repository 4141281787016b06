"""One identity per device, and one registration at a time (docs/reliability.md sections 2
and 3)."""

import fcntl
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lmp_autoreg import identity
from lmp_autoreg.errors import LocalFailure
from lmp_autoreg.paths import DevicePaths
from lmp_autoreg.state import State
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.server import RegistrationServer, Reply

from conftest import clean_env, device_args, run_cli
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


def left_in(sota: Path) -> dict[str, bytes]:
    """What the sota dir holds, state included (the lock's pid aside): name -> bytes."""
    return {str(p.relative_to(sota)): b"" if p.name == "lock" else p.read_bytes()
            for p in sota.rglob("*") if p.is_file()}


def assert_lost_answer_conflict(run, uuid: str, name: str, when: str) -> dict:
    """Exit 4, and the error's JSON: kind, message and a remedy naming the device."""
    assert run.returncode == 4, run.stderr
    error = run.json["error"]
    assert error["kind"] == "refused" and run.json["exit_code"] == 4
    assert error["message"].startswith("server refused the registration (HTTP 409)")
    assert f"uuid {uuid} was sent by {when} whose answer never arrived" in error["message"]
    remedy = error["remedy"]
    assert remedy["case"] == "conflict-after-lost-answer"
    assert remedy["device"] == {"uuid": uuid, "name": name}
    assert f"fioctl devices delete {name}" in remedy["text"]
    assert f"keeps the identity {uuid}" in remedy["text"] and "--force" in remedy["text"]
    assert remedy["text"] in error["message"] and "PRIVATE KEY" not in run.stdout + run.stderr
    return error


def test_409_for_a_reused_identity_says_what_to_do(device_root, registration_server, sota):
    uuid = fail_once(device_root, registration_server)
    before = left_in(sota)
    registration_server.default = Reply.error(409, "Device already exists")
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert_lost_answer_conflict(run, uuid, uuid, "an interrupted attempt")
    # The identity stays as it was, for the run after the device is deleted.
    assert left_in(sota) == before


def test_a_409_for_a_new_identity_has_no_remedy(device_root, registration_server):
    """A uuid never sent before that the server refuses is not a lost answer's."""
    registration_server.default = Reply.error(409, "Device already exists")
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 4 and run.json["error"]["remedy"] is None
    assert "answer never arrived" not in run.json["error"]["message"]


def test_a_409_after_no_connection_has_no_remedy(device_root):
    """A request that found no connection never reached the server, so the 409 that the
    next one gets is not a lost answer's."""
    with RegistrationServer(listen_delay=None) as server:
        server.default = Reply.error(409, "Device already exists")
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmp_autoreg",
             *device_args(device_root, server, "--timeout", "60", "--json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=clean_env(),
        )
        assert proc.stderr is not None and proc.stdout is not None
        listening = False
        for line in proc.stderr:
            if "Connection refused" in line and not listening:
                server.listen()
                listening = True
        out = json.loads(proc.stdout.read())
        assert proc.wait(60) == 4 and len(server.posts) == 1
    assert out["error"]["remedy"] is None and "never arrived" not in out["error"]["message"]


def test_a_lost_answer_then_409_keeps_the_identity_until_the_device_is_deleted(tmp_path):
    """The partially detached factory's case (docs/reliability.md section 2): the server
    creates the device, then its answer is lost; the retry, with the same uuid, gets 409.
    Exit 4 with the remedy; the key and uuid stay pending, nothing else is written; once
    the device is deleted in the factory, the next run registers that same identity."""
    device = FakeDevice(tmp_path / "device", board_serial="SN-0042").build()
    with RegistrationServer() as server:
        server.reject_duplicates = True
        server.enqueue(Reply.truncated(0))  # registered, but the answer never arrives
        run = run_cli(*device_args(device, server, "--json", "--name", "bench-7"))
        first, retry = server.posts
        uuid = first.json["uuid"]
        assert retry.json["uuid"] == uuid and public_key(retry.json["csr"]) == public_key(
            first.json["csr"])
        assert list(server.registered) == [uuid]
        assert_lost_answer_conflict(run, uuid, "bench-7", "an earlier request of this run")
        assert run.json["board"] == {"serial": "SN-0042",
                                     "source": "/sys/firmware/devicetree/base/serial-number"}
        # On disk: the pending identity alone, the key that the server certified.
        assert sorted(n for n in left_in(device.sota) if not n.startswith("compose-apps/")
                      ) == [".lmp-autoreg/identity.json", ".lmp-autoreg/lock"]
        kept = json.loads((device.sota / ".lmp-autoreg/identity.json").read_text())
        assert kept["uuid"] == uuid and public_key(kept["key"]) == public_key(first.json["csr"])
        assert status(device)["pending"] is True

        # The same again: nothing changes while the device is in the factory.
        again = run_cli(*device_args(device, server, "--json", "--name", "bench-7"))
        assert_lost_answer_conflict(again, uuid, "bench-7", "an interrupted attempt")

        server.reject_duplicates = False  # the operator deleted bench-7 in the factory
        done = run_cli(*device_args(device, server, "--json", "--name", "bench-7"))
        assert done.returncode == 0, done.stderr
        assert done.json["uuid"] == uuid and done.json["error"] is None
        assert public_key((device.sota / "pkey.pem").read_bytes()) == public_key(kept["key"])


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
