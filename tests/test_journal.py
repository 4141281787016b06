"""Logging under systemd: sd_notify STATUS= lines and native journal entries.

Notify: a real AF_UNIX datagram socket in a temp dir is the service manager; the agent
runs as a real subprocess with NOTIFY_SOCKET pointing at it.

Journal: libsystemd always writes to /run/systemd/journal/socket. journald need not run on
the test machine (it does not here), and a test must not write into the machine's journal,
so the agent runs in a private mount namespace (``unshare -m``, root) where a tmpfs hides
/run and our own datagram socket is bind-mounted as /run/systemd/journal/socket. What the
test reads is exactly what libsystemd sent, in the journal's native protocol. The agent's
stderr is a file whose device:inode is JOURNAL_STREAM, as systemd sets it for a service.

The tests that need systemd-python skip without it, but fail in CI (which installs it);
the fallbacks without it are tested by hiding the module (a ``systemd`` package on
PYTHONPATH that raises ImportError).
"""

import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmp_autoreg.journal import IDENTIFIER, priority, stderr_is_journal
from lmp_autoreg.progress import PROMPT
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.server import Reply

from conftest import Run, clean_env, device_args, require_module, require_tool, run_cli

TOKEN = "not-a-real-token"

# Mount a tmpfs over /run, bind-mount the directory $0 (holding our socket) as
# /run/systemd/journal, then run the agent: all in the namespace `unshare -m` made.
_NAMESPACE_SCRIPT = (
    'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && '
    '{ [ -z "$0" ] || mount --bind "$0" /run/systemd/journal; } && exec "$@"'
)


class DatagramSink:
    """A bound AF_UNIX datagram socket and a thread that keeps reading it (a full queue
    would block the sender)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.sock.recv(1 << 16))
            except TimeoutError:
                continue

    def close(self) -> list[bytes]:
        """Stop after reading what is queued; return every datagram received."""
        self._stop.set()
        self._thread.join(5)
        self.sock.setblocking(False)
        while True:
            try:
                self.datagrams.append(self.sock.recv(1 << 16))
            except BlockingIOError:
                break
        self.sock.close()
        return self.datagrams


@pytest.fixture
def hide_systemd(tmp_path) -> dict[str, str]:
    """Environment entries that make ``import systemd`` fail in the agent."""
    package = tmp_path / "hide" / "systemd"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('systemd-python hidden by a test')\n")
    return {"PYTHONPATH": str(tmp_path / "hide")}


def statuses(datagrams: list[bytes]) -> list[str]:
    lines = [d.decode() for d in datagrams]
    assert all(line.startswith("STATUS=") for line in lines), lines
    return [line.removeprefix("STATUS=") for line in lines]


def notify_run(device, server, tmp_path, env_extra, *extra, address=None):
    path = str(tmp_path / "notify.sock")
    sink = DatagramSink(path if address is None else "\0" + address[1:])
    env = clean_env(NOTIFY_SOCKET=address or path, **env_extra)
    try:
        run = run_cli(*device_args(device, server, *extra), env=env)
    finally:
        datagrams = sink.close()
    return run, statuses(datagrams)


def check_registration_statuses(run: Run, lines: list[str], server) -> None:
    assert run.returncode == 0, run.stderr
    uuid = server.requests[0].json["uuid"]
    assert lines[0] == f"registering intel-corei7-64 as {uuid} with factory acme"
    assert f"sending the registration request to {server.url}" in lines
    assert lines[-1] == f"done: registered {uuid}"
    assert not any(TOKEN in line for line in lines)


def test_notify_status_lines(device_root, registration_server, tmp_path):
    require_module("systemd.daemon")
    run, lines = notify_run(device_root, registration_server, tmp_path, {})
    check_registration_statuses(run, lines, registration_server)
    # Status goes to the manager in addition to stderr, not instead of it.
    assert "done: registered" in run.stderr


def test_notify_status_without_systemd_python(device_root, registration_server, tmp_path,
                                              hide_systemd):
    run, lines = notify_run(device_root, registration_server, tmp_path, hide_systemd)
    check_registration_statuses(run, lines, registration_server)


@pytest.mark.parametrize("module", ["installed", "hidden"])
def test_notify_to_an_abstract_socket(device_root, registration_server, tmp_path, hide_systemd,
                                      module):
    if module == "installed":
        require_module("systemd.daemon")
    env = hide_systemd if module == "hidden" else {}
    address = f"@lmp-autoreg-test-{os.getpid()}-{module}"
    run, lines = notify_run(device_root, registration_server, tmp_path, env, address=address)
    check_registration_statuses(run, lines, registration_server)


def test_notify_last_status_is_the_error(device_root, registration_server, tmp_path):
    registration_server.default = Reply.error(409, "exists")
    run, lines = notify_run(device_root, registration_server, tmp_path, {}, "-q")
    assert run.returncode == 4
    assert lines[-1].startswith("server refused the registration (HTTP 409)")
    # -q quietens stderr, not the status the manager shows.
    assert any(line.startswith("registering") for line in lines)
    assert "registering" not in run.stderr


# -- journal ----------------------------------------------------------------------------


def parse_entry(data: bytes) -> dict[str, str]:
    """One entry of the journal's native protocol: KEY=value lines, or, for values with a
    newline, KEY, a newline, a little-endian 64-bit length, the value and a newline."""
    fields = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            data = rest
        else:
            key, size = line, int.from_bytes(rest[:8], "little")
            value, data = rest[8 : 8 + size], rest[9 + size :]
        fields[key.decode()] = value.decode()
    return fields


def require_namespaces() -> None:
    require_tool("unshare")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /run"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        reason = f"unshare -m cannot mount here (root needed): {probe.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def journal_run(tmp_path, args, env_extra=None, *, socket_dir: Path | None):
    """Run the agent with stderr as a journal stream, in a namespace whose journal socket
    is ours (``socket_dir`` holds it) or missing (None)."""
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        st = os.fstat(err.fileno())
        env = clean_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", **(env_extra or {}))
        proc = subprocess.run(
            ["unshare", "-m", "sh", "-c", _NAMESPACE_SCRIPT, str(socket_dir or ""),
             sys.executable, "-m", "lmp_autoreg", *args],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=60,
            stdin=subprocess.DEVNULL,
        )
    return Run(proc.returncode, proc.stdout, err_path.read_text())


def journal_entries(tmp_path, args, env_extra=None):
    socket_dir = tmp_path / "journal"
    socket_dir.mkdir()
    sink = DatagramSink(str(socket_dir / "socket"))
    try:
        run = journal_run(tmp_path, args, env_extra, socket_dir=socket_dir)
    finally:
        datagrams = sink.close()
    return run, [parse_entry(d) for d in datagrams]


def test_journal_entries_carry_the_fields(device_root, registration_server, tmp_path):
    require_module("systemd.journal")
    require_namespaces()
    run, entries = journal_entries(tmp_path, device_args(device_root, registration_server))
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # stderr is the journal: nothing goes to it twice
    uuid = registration_server.requests[0].json["uuid"]
    assert entries and all(e["SYSLOG_IDENTIFIER"] == IDENTIFIER for e in entries)
    first, last = entries[0], entries[-1]
    assert first["MESSAGE"] == f"registering intel-corei7-64 as {uuid} with factory acme"
    assert first["PRIORITY"] == "6" and first["CODE_FILE"].endswith("register.py")
    assert all(e["LMP_UUID"] == uuid and e["LMP_FACTORY"] == "acme" for e in entries)
    assert last["MESSAGE"] == f"done: registered {uuid}" and last["LMP_EXIT_CODE"] == "0"
    assert all("LMP_EXIT_CODE" not in e for e in entries[:-1])
    assert not any(TOKEN in str(e) for e in entries)


def test_journal_error_entry(device_root, registration_server, tmp_path):
    require_module("systemd.journal")
    require_namespaces()
    registration_server.default = Reply.error(400, "Bad thing")
    run, entries = journal_entries(tmp_path, device_args(device_root, registration_server))
    assert run.returncode == 4 and run.stderr == ""
    last = entries[-1]
    assert last["PRIORITY"] == "3" and last["LMP_EXIT_CODE"] == "4"
    assert last["MESSAGE"].startswith("server refused the registration (HTTP 400)")
    assert last["LMP_UUID"] == registration_server.requests[0].json["uuid"]


def test_journal_multiline_message(tmp_path):
    """A message with a newline travels in the binary form of the protocol, whole."""
    require_module("systemd.journal")
    require_namespaces()
    run, entries = journal_entries(tmp_path, ["--bogus-option\nsecond line"])
    assert run.returncode == 2
    assert "--bogus-option\nsecond line" in entries[-1]["MESSAGE"]
    assert entries[-1]["LMP_EXIT_CODE"] == "2"


@pytest.mark.parametrize("journal", ["missing", "refusing"])
def test_journal_unreachable_falls_back_to_stderr(device_root, registration_server, tmp_path,
                                                  journal):
    """No journal socket (libsystemd would drop entries silently), or one that refuses them:
    the agent writes plain lines to stderr."""
    require_module("systemd.journal")
    require_namespaces()
    socket_dir = None
    if journal == "refusing":  # a socket file nobody reads from any more
        socket_dir = tmp_path / "journal"
        socket_dir.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
            gone.bind(str(socket_dir / "socket"))
    run = journal_run(tmp_path, device_args(device_root, registration_server),
                      socket_dir=socket_dir)
    assert run.returncode == 0
    assert "lmp-device-auto-register: registering intel-corei7-64" in run.stderr
    assert "lmp-device-auto-register: done: registered" in run.stderr


def test_journal_stream_without_systemd_python_is_plain_stderr(device_root, registration_server,
                                                               tmp_path, hide_systemd):
    require_namespaces()
    run, entries = journal_entries(tmp_path, device_args(device_root, registration_server),
                                   hide_systemd)
    assert run.returncode == 0 and entries == []
    assert "lmp-device-auto-register: done: registered" in run.stderr


def test_stderr_is_journal_compares_device_and_inode(tmp_path):
    with open(tmp_path / "f", "w") as f, open(tmp_path / "g", "w") as g:
        st = os.fstat(f.fileno())
        value = f"{st.st_dev}:{st.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": value}, f)
        assert not stderr_is_journal({"JOURNAL_STREAM": value}, g)
    assert not stderr_is_journal({}, sys.stderr)
    assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, sys.stderr)
    assert not stderr_is_journal({"JOURNAL_STREAM": "1:x"}, sys.stderr)


def test_priorities():
    assert [priority(level) for level in (logging.DEBUG, logging.INFO, PROMPT, logging.WARNING,
                                          logging.ERROR, logging.CRITICAL)] == [7, 6, 5, 4, 3, 2]


def test_the_board_serial_is_a_field_and_in_the_status_lines(tmp_path, registration_server):
    """The board's serial (docs/spec.md section 6): a journal field of every entry from the
    moment it is read, and named by the status lines a jig's operator sees."""
    require_module("systemd.journal")
    require_namespaces()
    device = FakeDevice(tmp_path / "device", board_serial="SN-0042").build()
    run, entries = journal_entries(tmp_path, device_args(device, registration_server))
    assert run.returncode == 0, run.stderr
    uuid = registration_server.requests[0].json["uuid"]
    messages = [e["MESSAGE"] for e in entries]
    at = messages.index("board serial SN-0042 (from /sys/firmware/devicetree/base/serial-number)")
    assert all(e["LMP_BOARD_SERIAL"] == "SN-0042" for e in entries[at + 1:])
    assert f"registering intel-corei7-64 as {uuid} with factory acme (board SN-0042)" in messages
    assert messages[-1] == f"done: registered {uuid} (board SN-0042)"


def test_the_status_lines_name_the_board(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "device", board_serial="SN-0042").build()
    run, lines = notify_run(device, registration_server, tmp_path, {})
    assert run.returncode == 0, run.stderr
    uuid = registration_server.requests[0].json["uuid"]
    assert lines[0] == "board serial SN-0042 (from /sys/firmware/devicetree/base/serial-number)"
    assert lines[-1] == f"done: registered {uuid} (board SN-0042)"
