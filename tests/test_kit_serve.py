"""`python -m lmp_autoreg.testing serve`: the kit's server as a real process of its own.

Each test starts the command as a subprocess, reads the two lines it prints, registers
a device against it with the agent (a real subprocess too), and stops it by a signal.
"""

import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from cryptography import x509

from lmp_autoreg.testing.device import FakeDevice

from conftest import clean_env, run_cli

START_TIMEOUT = 60.0  # a loaded machine may take long to import and make the keys


class Served:
    """A running `serve` command; `url` and `ca` are what it printed."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmp_autoreg.testing", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=clean_env(),
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._line("url")
        self.ca = Path(self._line("ca"))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")  # end of output

    def _line(self, key: str) -> str:
        try:
            line = self._lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            line = ""
        if not line.startswith(f"{key}: "):
            self.proc.kill()
            assert self.proc.stderr is not None
            err = self.proc.stderr.read()
            pytest.fail(f"serve printed {line!r} instead of '{key}: ...'; stderr: {err}")
        return line[len(key) + 2 :].rstrip("\n")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(signum)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        return self.proc.wait(timeout=30), err


@pytest.fixture
def serve():
    """Start `serve` commands; any still running at the end of the test is killed."""
    started: list[Served] = []

    def start(*args: str) -> Served:
        started.append(Served(*args))
        return started[-1]

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


def register(device: FakeDevice, url: str, *extra: str):
    return run_cli("--sysroot", str(device.root), "--device-api", url, "--fioconfig", "off",
                   "--no-start", "--timeout", "30", "--json", *extra)


def refused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_serve_registers_a_device_and_stops_cleanly_on_a_signal(serve, tmp_path, signum):
    served = serve("--port", "0", "--state-dir", str(tmp_path / "state"))
    try:
        assert served.url.startswith("http://127.0.0.1:") and served.url.endswith("/sign")
        assert served.ca == tmp_path / "state" / "factory_ca.pem"
        assert requests.head(served.url, timeout=10).status_code == 405
        device = FakeDevice(tmp_path / "dev").build()
        run = register(device, served.url)
        assert run.returncode == 0, run.stderr
        cert = x509.load_pem_x509_certificate((device.sota / "client.pem").read_bytes())
        assert cert.serial_number == int(run.json["uuid"].replace("-", ""), 16)
    finally:
        code, err = served.stop(signum)
    assert code == 0, err
    assert "HEAD /sign -> 405" in err and "POST /sign -> 201" in err
    assert "Traceback" not in err
    assert refused(served.port)


def test_serve_restarted_with_its_state_dir_keeps_its_ca(serve, tmp_path):
    state = tmp_path / "state"
    first = serve("--port", "0", "--tls", "--state-dir", str(state))
    try:
        ca_pem = first.ca.read_text()
        one = FakeDevice(tmp_path / "one").build()
        run = register(one, first.url, "--cacert", str(first.ca))
        assert run.returncode == 0, run.stderr
    finally:
        assert first.stop()[0] == 0
    keys = {p.name: p.stat().st_mode & 0o777 for p in state.glob("*.key")}
    assert keys == {"factory_ca.key": 0o600, "local-ca.key": 0o600}
    kept = tmp_path / "kept-ca.pem"  # the copy a board was given on its first boot
    kept.write_text(ca_pem)
    again = serve("--port", str(first.port), "--tls", "--state-dir", str(state))
    try:
        assert again.url == first.url
        assert again.ca.read_text() == ca_pem
        two = FakeDevice(tmp_path / "two").build()
        run = register(two, again.url, "--cacert", str(kept))
        assert run.returncode == 0, run.stderr
    finally:
        assert again.stop()[0] == 0
    issuers = {
        x509.load_pem_x509_certificate((device.sota / "client.pem").read_bytes()).issuer
        for device in (one, two)
    }
    assert len(issuers) == 1  # the same local-ca signed both devices


def test_serve_without_a_state_dir_removes_its_ca(serve, tmp_path):
    served = serve("--port", "0", "--factory", "other")
    try:
        assert served.ca.is_file()
        device = FakeDevice(tmp_path / "dev").build()  # factory acme: the server wants other
        run = register(device, served.url)
        assert run.returncode == 4, run.stderr
        assert "Invalid factory(acme) must be other" in run.stderr
    finally:
        assert served.stop()[0] == 0
    assert not served.ca.exists()


def test_serve_with_a_token_file_and_group_knob(serve, tmp_path):
    token = tmp_path / "token"
    token.write_text("lab-token\n")
    served = serve("--port", "0", "--token-file", str(token), "--accept-group")
    try:
        device = FakeDevice(tmp_path / "dev", token="wrong").build()
        assert register(device, served.url).returncode == 4
        device = FakeDevice(tmp_path / "dev2", token="lab-token").build()
        run = register(device, served.url, "--device-group", "lab")
        assert run.returncode == 0, run.stderr
    finally:
        code, err = served.stop()
    assert code == 0
    assert "lab-token" not in err


def test_serve_on_a_port_in_use_fails_with_exit_1():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "lmp_autoreg.testing", "serve", "--port",
             str(busy.getsockname()[1])],
            capture_output=True, text=True, timeout=60, env=clean_env(),
        )
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr
    assert proc.stdout == ""


def test_serve_partially_detached_keeps_its_devices_across_a_restart(serve, tmp_path):
    """`serve --partially-detached`: /sign creates each device in the kit's devices API (in
    the group), which `api: URL` names; a restart from the state dir keeps the devices, so
    the same uuid registered again ends in the API's 409 at the device."""
    state, token = tmp_path / "state", tmp_path / "api-token"
    token.write_text("api-secret\n")
    args = ("--state-dir", str(state), "--partially-detached", "--device-group", "line-1",
            "--api-token-file", str(token))
    first = serve("--port", "0", *args)
    try:
        api = first._line("api")
        assert api == first.url.removesuffix("/sign") + "/ota/devices/"
        device = FakeDevice(tmp_path / "dev").build()
        run = register(device, first.url, "--production")
        assert run.returncode == 0, run.stderr
        uuid = run.json["uuid"]
        assert requests.get(api, timeout=10).status_code == 401
    finally:
        code, err = first.stop()
    assert code == 0 and "api-secret" not in err and "Traceback" not in err
    again = serve("--port", str(first.port), *args)
    try:
        assert again._line("api") == api
        listed = requests.get(api, headers={"OSF-TOKEN": "api-secret"}, timeout=10).json()
        assert [(d["uuid"], d["device-group"]) for d in listed["devices"]] == [(uuid, "line-1")]
        run = register(device, again.url, "--production", "--force", "--uuid", uuid)
        assert run.returncode == 4 and "(HTTP 409)" in run.json["error"]["message"]
    finally:
        assert again.stop()[0] == 0


def test_serve_devices_api_without_a_token_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "lmp_autoreg.testing", "serve", "--port", "0", "--devices-api"],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )
    assert proc.returncode == 2 and "--api-token" in proc.stderr and proc.stdout == ""
