"""Local faults on real file systems (docs/reliability.md section 5): disk full, read-only,
no permission.

Each test runs the agent in a private mount namespace (``unshare -m``, as root) whose sota
dir is a small ``tmpfs``, and injects the fault while the agent waits at a named step (the
test-only pause hook): it fills the tmpfs through ``/proc/<pid>/root``, remounts it
read-only with ``nsenter``, or takes away the write permission from an agent that runs
without CAP_DAC_OVERRIDE. The agent must exit 6 naming the path and roll back. Then the
same script repairs the fault and runs the agent again, which must register the device
with the same uuid (completing the install from the answer it kept, without asking the
server again). What the sota dir held after each run is copied out for the assertions.
"""

import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmp_autoreg import identity
from lmp_autoreg.testing.server import RegistrationServer

from conftest import clean_env, device_args, require_tool
from pausing import Paused

REGISTERED = ["client.chained", "client.pem", "pkey.pem", "root.crt", "sota.toml"]
NO_DAC = "-dac_override,-dac_read_search"

# $1 sota dir, $2 output dir, then the agent's command line. Run 1 may pause (the hook is
# in its environment); run 2 comes after the repair, without the hook.
SCRIPT = r"""
set -u
sota=$1; out=$2; shift 2
mount -t tmpfs -o "size=${SIZE:-256k},mode=0755" tmpfs "$sota" || exit 90
if [ -n "${READ_ONLY:-}" ]; then mount -o remount,ro "$sota" || exit 91; fi
${WRAP:-} "$@" --json >"$out/run1.json" 2>"$out/run1.err"; echo $? >"$out/run1.rc"
mkdir "$out/after1"; cp -a "$sota/." "$out/after1/"
rm -f "$sota/filler"; mount -o remount,rw,size=256k "$sota"; chmod 0755 "$sota"
env -u LMP_AUTOREG_TEST_PAUSE "$@" --json >"$out/run2.json" 2>"$out/run2.err"
echo $? >"$out/run2.rc"
mkdir "$out/after2"; cp -a "$sota/." "$out/after2/"
"""


@pytest.fixture(scope="module")
def namespaces() -> None:
    for tool in ("unshare", "nsenter", "setpriv"):
        require_tool(tool)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if os.geteuid() != 0 or probe.returncode != 0:
        message = "needs root and mount namespaces (unshare -m)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Outcome:
    out: Path

    def rc(self, n: int) -> int:
        return int((self.out / f"run{n}.rc").read_text())

    def json(self, n: int) -> dict:
        return json.loads((self.out / f"run{n}.json").read_text())

    def err(self, n: int) -> str:
        return (self.out / f"run{n}.err").read_text()

    def files(self, n: int) -> list[str]:
        after = self.out / f"after{n}"
        return sorted(p.name for p in after.iterdir() if p.is_file() and p.name != "filler")

    def state(self, n: int) -> list[str]:
        state = self.out / f"after{n}" / ".lmp-autoreg"
        return sorted(p.name for p in state.iterdir()) if state.is_dir() else []


def command(device, server, out: Path) -> list[str]:
    return ["unshare", "-m", "sh", "-c", SCRIPT, "sh", str(device.sota), str(out),
            sys.executable, "-m", "lmp_autoreg", *device_args(device, server)]


def outdir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def fill(pid: int, directory: Path) -> None:
    """Fill the file system of ``directory`` as process ``pid`` sees it."""
    fd = os.open(f"/proc/{pid}/root{directory}/filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def assert_repaired(outcome: Outcome, server: RegistrationServer, requests: int = 1) -> None:
    """Run 2 registered the device with run 1's uuid, asking the server ``requests`` times
    in all."""
    assert outcome.rc(2) == 0, outcome.err(2)
    uuid = outcome.json(2)["uuid"]
    assert outcome.json(1)["uuid"] in (uuid, None)
    assert len(server.requests) == requests
    assert {r.json["uuid"] for r in server.requests} == {uuid}
    assert outcome.files(2) == REGISTERED and outcome.state(2) == ["lock"]
    after = outcome.out / "after2"
    key = identity.key_from_pem((after / "pkey.pem").read_bytes())
    identity.check_client_certificate((after / "client.pem").read_bytes(), uuid=uuid,
                                      public_key=key.public_key())


def test_disk_full_between_two_files(namespaces, device_root, registration_server, tmp_path):
    out, sota = outdir(tmp_path), device_root.sota
    with Paused("between-files", tmp_path / "marker",
                command=command(device_root, registration_server, out)) as agent:
        fill(agent.pid, sota)
        agent.resume()
    outcome = Outcome(out)
    assert outcome.rc(1) == 6, outcome.err(1)
    message = outcome.json(1)["error"]["message"]
    assert f"cannot write {sota}/client.chained: No space left on device" in message
    assert "nothing was installed" in message
    assert outcome.files(1) == []  # pkey.pem, written before the disk filled, is gone
    assert outcome.state(1) == ["identity.json", "install.json", "lock"]
    assert_repaired(outcome, registration_server)
    assert "completing it" in outcome.err(2)


def test_read_only_between_two_files(namespaces, device_root, registration_server, tmp_path):
    out, sota = outdir(tmp_path), device_root.sota
    with Paused("between-files", tmp_path / "marker",
                command=command(device_root, registration_server, out)) as agent:
        subprocess.run(["nsenter", "-t", str(agent.pid), "-m", "mount", "-o", "remount,ro",
                        str(sota)], check=True)
        agent.resume()
    outcome = Outcome(out)
    assert outcome.rc(1) == 6, outcome.err(1)
    message = outcome.json(1)["error"]["message"]
    assert f"cannot write {sota}/client.chained: Read-only file system" in message
    # A read-only file system cannot be rolled back: it says so, and the device is not
    # registered (no sota.toml); the next run completes the install.
    assert "rolled back all but pkey.pem" in message
    assert outcome.files(1) == ["pkey.pem"]
    assert_repaired(outcome, registration_server)


def test_read_only_from_the_start(namespaces, device_root, registration_server, tmp_path):
    out, sota = outdir(tmp_path), device_root.sota
    proc = subprocess.run(command(device_root, registration_server, out),
                          env=clean_env(READ_ONLY="1"), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outcome = Outcome(out)
    assert outcome.rc(1) == 6
    assert f"cannot create {sota}/.lmp-autoreg: Read-only file system" in outcome.err(1)
    assert outcome.files(1) == [] and outcome.state(1) == []
    assert_repaired(outcome, registration_server)  # 1 request in all: run 1 sent none


def test_disk_full_before_the_identity_is_saved(namespaces, device_root, registration_server,
                                                tmp_path):
    out, sota = outdir(tmp_path), device_root.sota
    proc = subprocess.run(command(device_root, registration_server, out),
                          env=clean_env(SIZE="4k"), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outcome = Outcome(out)
    assert outcome.rc(1) == 6, outcome.err(1)
    assert f"cannot write {sota}/.lmp-autoreg/identity.json: No space left" in outcome.err(1)
    assert outcome.files(1) == [] and outcome.state(1) == ["lock"]
    assert_repaired(outcome, registration_server)


def test_permission_denied_during_the_install(namespaces, device_root, registration_server,
                                             tmp_path):
    out, sota = outdir(tmp_path), device_root.sota
    # Root without CAP_DAC_OVERRIDE obeys file modes, as any service user does.
    wrap = f"setpriv --bounding-set {NO_DAC} --inh-caps {NO_DAC}"
    with Paused("before-request", tmp_path / "marker", env=clean_env(WRAP=wrap),
                command=command(device_root, registration_server, out)) as agent:
        os.chmod(f"/proc/{agent.pid}/root{sota}", 0o555)
        agent.resume()
    outcome = Outcome(out)
    assert outcome.rc(1) == 6, outcome.err(1)
    message = outcome.json(1)["error"]["message"]
    assert f"cannot write {sota}/pkey.pem: Permission denied; nothing was installed" in message
    assert outcome.files(1) == []
    assert outcome.state(1) == ["identity.json", "install.json", "lock"]
    assert_repaired(outcome, registration_server)
