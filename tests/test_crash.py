"""Crash safety (docs/reliability.md section 4): kill -9 the real agent at each step, then run
it again.

After the kill the device must not look registered; the rerun must end in a correctly
registered device with the *same* uuid. The server here refuses a uuid it has already
registered (409), as the reference server does, so a rerun that asked again after the
server had answered would fail: an interrupted install must be completed from the answer
the agent kept.
"""

import json
import os
import signal
import subprocess

import pytest

from lmp_autoreg import identity
from lmp_autoreg.testing.server import RegistrationServer, Reply

from conftest import clean_env, device_args, run_cli
from pausing import AGENT, Paused

REGISTERED = ["client.chained", "client.pem", "pkey.pem", "root.crt", "sota.toml"]


@pytest.fixture
def server():
    with RegistrationServer() as server:
        server.reject_duplicates = True
        yield server


def status(device) -> dict:
    run = run_cli("status", "--sysroot", str(device.root), "--json")
    assert run.returncode == (0 if run.json["registered"] else 1)
    return run.json


def installed(sota) -> list[str]:
    return sorted(p.name for p in sota.iterdir() if p.is_file() and not p.name.startswith("."))


def assert_registered_as(device, sota, uuid: str) -> None:
    assert installed(sota) == REGISTERED
    key = identity.key_from_pem((sota / "pkey.pem").read_bytes())
    identity.check_client_certificate((sota / "client.pem").read_bytes(), uuid=uuid,
                                      public_key=key.public_key())
    assert status(device) == {**status(device), "registered": True, "uuid": uuid,
                              "pending": False}
    assert sorted(p.name for p in (sota / ".lmp-autoreg").iterdir()) == ["lock"]


def kill_at(step: str, device, server, marker) -> None:
    """Start the agent and kill -9 it at ``step``."""
    args = device_args(device, server)
    if step == "awaiting-answer":  # no hook needed: the server takes its time
        server.enqueue(Reply.hang(600))
        agent = subprocess.Popen([*AGENT, *args, "--timeout", "600"], env=clean_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            server.wait_for(1, timeout=60)  # the request is in: the answer is held
        finally:
            agent.send_signal(signal.SIGKILL)
            agent.wait()
        return
    with Paused(step, marker, args) as agent:
        agent.kill()


# step -> requests the server has seen once the rerun is done
STEPS = {
    "before-request": 1,  # the killed run sent nothing
    "awaiting-answer": 2,  # the server never answered the first: asked again
    "between-files": 1,  # the answer was kept: installed without asking again
    "before-sota-toml": 1,
}


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_then_rerun_registers_the_same_uuid(device_root, server, sota, tmp_path, step):
    kill_at(step, device_root, server, tmp_path / "marker")
    after_kill = status(device_root)
    assert after_kill["registered"] is False and after_kill["pending"] is True
    assert not (sota / "sota.toml").exists()
    killed = json.loads((sota / ".lmp-autoreg" / "identity.json").read_text())["uuid"]

    run = run_cli(*device_args(device_root, server, "--json"))
    assert run.returncode == 0, run.stderr
    uuid = run.json["uuid"]
    assert uuid == killed  # the rerun is the killed run's device, not a new one
    assert len(server.requests) == STEPS[step]
    assert {r.json["uuid"] for r in server.requests} == {uuid}
    assert list(server.registered) == [uuid]  # the server knows one device
    assert_registered_as(device_root, sota, uuid)
    if STEPS[step] == 1 and step != "before-request":
        assert "completing it" in run.stderr


def test_a_leftover_sota_toml_never_makes_a_half_install_look_registered(
        device_root, server, sota, tmp_path):
    # sota.toml with client.pem means "registered": an image that ships a sota.toml must
    # not look registered once client.pem is in and the new sota.toml is not.
    (sota / "sota.toml").write_text("[pacman]\ntype = \"ostree\"\n")
    kill_at("before-sota-toml", device_root, server, tmp_path / "marker")
    assert (sota / "client.pem").exists() and (sota / "sota.toml").exists()
    assert status(device_root)["registered"] is False
    assert run_cli(*device_args(device_root, server)).returncode == 0
    assert "[tls]" in (sota / "sota.toml").read_text()
    assert_registered_as(device_root, sota, server.requests[0].json["uuid"])


def test_leftover_temporary_files_are_removed(device_root, server, sota, tmp_path):
    kill_at("between-files", device_root, server, tmp_path / "marker")
    leftover = sota / ".client.pem.tmp-4242"  # what a kill inside a write leaves
    leftover.write_text("half a certificate")
    assert run_cli(*device_args(device_root, server)).returncode == 0
    assert not leftover.exists()


@pytest.mark.parametrize("fresh", [["--force"], ["--uuid", "0a0b0c0d-1111-4222-8333-444455556666"]])
def test_force_or_another_uuid_abandons_the_half_install(device_root, server, sota, tmp_path,
                                                        fresh):
    kill_at("between-files", device_root, server, tmp_path / "marker")
    first = server.requests[0].json["uuid"]
    run = run_cli(*device_args(device_root, server, "--json", *fresh))
    assert run.returncode == 0, run.stderr
    assert run.json["uuid"] != first and len(server.requests) == 2
    assert "abandoning the unfinished install of " + first in run.stderr
    assert_registered_as(device_root, sota, run.json["uuid"])


def test_a_rerun_naming_the_killed_runs_uuid_completes_its_install(device_root, server, sota,
                                                                   tmp_path):
    """``--uuid`` equal to the interrupted install's uuid is that install: completed from
    the kept answer, not abandoned (the server, which registered it, would answer 409)."""
    kill_at("between-files", device_root, server, tmp_path / "marker")
    killed = server.requests[0].json["uuid"]
    run = run_cli(*device_args(device_root, server, "--json", "--uuid", killed))
    assert run.returncode == 0, run.stderr
    assert run.json["uuid"] == killed and len(server.requests) == 1
    assert "completing it" in run.stderr
    assert_registered_as(device_root, sota, killed)


def test_a_failed_force_after_a_killed_install_leaves_no_registration(device_root, server,
                                                                      sota, tmp_path):
    """``--force`` abandons what a killed install wrote: when it then fails, the device
    holds none of it. With the sota.toml an image ships, a client.pem left behind would
    make the device look registered."""
    (sota / "sota.toml").write_text('[pacman]\ntype = "ostree"\n')
    kill_at("before-sota-toml", device_root, server, tmp_path / "marker")
    assert (sota / "client.pem").exists()
    server.default = Reply.error(400, "Invalid factory(acme) must be other")
    run = run_cli(*device_args(device_root, server, "--json", "--force"))
    assert run.returncode == 4, run.stderr
    assert not {"client.pem", "client.chained", "pkey.pem", "root.crt"} & set(installed(sota))
    assert status(device_root)["registered"] is False
    # What the image shipped stays: the killed install never got to its sota.toml.
    assert (sota / "sota.toml").read_text() == '[pacman]\ntype = "ostree"\n'


def test_force_after_a_killed_install_puts_back_what_the_image_shipped(device_root, server,
                                                                       sota, tmp_path):
    """A file of the image that the killed install replaced (its root.crt, a link in place
    of client.pem) is the image's again once --force abandons that install; a file the
    install only added goes."""
    (sota / "sota.toml").write_text('[pacman]\ntype = "ostree"\n')
    (sota / "root.crt").write_text("the image's root.crt\n")
    (sota / "client.pem").symlink_to("/usr/share/image/client.pem")
    kill_at("before-sota-toml", device_root, server, tmp_path / "marker")
    assert "the image's" not in (sota / "root.crt").read_text()
    server.default = Reply.error(400, "Invalid factory(acme) must be other")
    run = run_cli(*device_args(device_root, server, "--json", "--force"))
    assert run.returncode == 4, run.stderr
    assert (sota / "sota.toml").read_text() == '[pacman]\ntype = "ostree"\n'
    assert (sota / "root.crt").read_text() == "the image's root.crt\n"
    assert os.readlink(sota / "client.pem") == "/usr/share/image/client.pem"
    assert not (sota / "client.chained").exists() and not (sota / "pkey.pem").exists()


def test_a_rollback_never_reads_through_a_link_in_the_image(device_root, server, sota,
                                                            tmp_path):
    """A link where client.pem goes, to a file outside the sysroot (a file of the host): an
    install that fails after its snapshot puts the link back as a link, and the host
    file's content never lands in the image."""
    assert run_cli(*device_args(device_root, server)).returncode == 0
    canary = tmp_path / "host" / "canary"
    canary.parent.mkdir()
    canary.write_text("CANARY: a file of the host\n")
    (sota / "client.pem").unlink()
    (sota / "client.pem").symlink_to(canary)
    with Paused("before-sota-toml", tmp_path / "marker",
                device_args(device_root, server, "--json", "--force")) as agent:
        # sota.toml's temporary file is taken: its write fails, and the install rolls back.
        (sota / f".sota.toml.tmp-{agent.pid}").write_text("in the way")
        run = agent.resume()
    assert run.returncode == 6, run.stderr
    assert "rolled back" in run.json["error"]["message"] or \
        "nothing was installed" in run.json["error"]["message"]
    for path in device_root.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"CANARY" not in path.read_bytes(), path
    assert os.readlink(sota / "client.pem") == str(canary)
    assert canary.read_text() == "CANARY: a file of the host\n"

