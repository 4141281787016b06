"""``--token-file -``: the API token piped in on standard input, as a jig passes a secret
over ssh without a file on the device and without argv (docs/spec.md section 3):
``ssh dut lmp-device-auto-register --token-file - < token``."""

import os
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmp_autoreg.errors import ConfigError
from lmp_autoreg.settings import token_from_stdin

from conftest import clean_env, device_args, run_cli
from fakebin import FakeBin

TOKEN = "piped-token-0123456789"


def test_a_piped_token_registers_and_is_never_shown(device_root, registration_server):
    run = run_cli(*device_args(device_root, registration_server, "--token-file", "-",
                               "--json"), stdin=TOKEN + "\nnot read\n")
    assert run.returncode == 0, run.stderr
    (post,) = registration_server.requests
    assert post.headers["OSF-TOKEN"] == TOKEN
    assert TOKEN not in run.stdout and TOKEN not in run.stderr


def test_a_terminal_on_stdin_is_refused(device_root, registration_server):
    """Typed at a terminal, the token would be echoed: refused before anything is read."""
    primary, secondary = os.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lmp_autoreg",
             *device_args(device_root, registration_server, "--token-file", "-", "--json")],
            stdin=secondary, capture_output=True, text=True, env=clean_env(), timeout=60)
    finally:
        os.close(secondary)
        os.close(primary)
    assert proc.returncode == 2, proc.stderr
    assert "standard input is a terminal" in proc.stderr
    assert registration_server.requests == []


def test_a_pipe_that_never_ends_a_line_ends_by_the_deadline(device_root, registration_server):
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmp_autoreg",
         *device_args(device_root, registration_server, "--token-file", "-", "--json"),
         "--timeout", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=clean_env())
    assert proc.stdin is not None
    proc.stdin.write("half-a-token")  # the writer stays open and never ends the line
    proc.stdin.flush()
    try:
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdin.close()
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()
    assert proc.returncode == 2, err
    assert "no whole line within 2 s" in err and "half-a-token" not in err
    assert registration_server.requests == []


def test_the_tool_backend_refuses_a_piped_token(device_root, registration_server, tmp_path):
    """lmp-device-register takes a token only on its command line: a token piped in to stay
    off every command line is refused rather than put there."""
    fakes = FakeBin(tmp_path / "bin")
    fakes.add("lmp-device-register")
    run = run_cli("--sota-dir", str(device_root.sota), "--device-api", registration_server.url,
                  "--factory", "acme", "--hwid", "intel-corei7-64", "--tag", "main",
                  "--no-production", "--fioconfig", "off", "--no-start", "--backend",
                  "lmp-device-register", "--token-file", "-", "--json",
                  env=fakes.environ(), stdin=TOKEN + "\n")
    assert run.returncode == 2, run.stderr
    assert "takes a token only on its command line" in run.json["error"]["message"]
    assert fakes.calls() == [] and TOKEN not in run.stdout + run.stderr


def read_piped(data: bytes, seconds: float = 5.0, *, hold: bool = False) -> str:
    """``token_from_stdin`` on a pipe that a thread fills with ``data``, then closes (or,
    ``hold``, keeps open until the reader is done)."""
    reader, writer = os.pipe()
    done = threading.Event()

    def feed() -> None:
        try:
            with os.fdopen(writer, "wb") as f:
                f.write(data)
                f.flush()
                if hold:
                    done.wait(30)
        except BrokenPipeError:  # the reader stopped at its bound
            pass

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        return token_from_stdin("native", seconds, reader)
    finally:
        done.set()
        os.close(reader)
        thread.join(10)


@pytest.mark.props
@given(data=st.binary(max_size=300) | st.builds(
    lambda token, rest: token + rest, st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                               min_size=1, max_size=40).map(str.encode),
    st.binary(max_size=40)))
def test_any_bytes_on_stdin_are_a_token_or_a_config_error_that_shows_none(data):
    first = data.split(b"\n", 1)[0]
    lines = first.decode("utf-8", "surrogateescape").splitlines()
    expected = lines[0].strip() if lines else ""
    try:
        token = read_piped(data)
    except ConfigError as e:
        assert not expected or not all("!" <= c <= "~" for c in expected)
        assert expected == "" or expected not in str(e)
        return
    assert token == expected and all("!" <= c <= "~" for c in token)


def test_a_line_past_the_bound_is_refused_without_reading_on():
    """Past the bound the reader stops at once: it does not wait for the writer's end."""
    with pytest.raises(ConfigError, match="longer than"):
        read_piped(b"x" * (2 << 20), seconds=30, hold=True)


def test_a_piped_token_never_goes_over_plain_http_to_another_host(device_root):
    run = run_cli("--sysroot", str(device_root.root), "--device-api", "http://192.0.2.1/sign",
                  "--token-file", "-", "--json", stdin=TOKEN + "\n")
    assert run.returncode == 2
    assert "plain http" in run.json["error"]["message"]
