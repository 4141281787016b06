"""cli.run: main, flushed output, then os._exit without Python's teardown (docs/performance.md)."""

import subprocess
import sys

from lmp_autoreg import __version__

from conftest import clean_env, device_args

# An atexit handler stands for the interpreter's teardown: run() must end before it.
PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("teardown ran\\n"))
sys.argv[1:] = {args!r}
from lmp_autoreg.cli import run
run()
"""


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE.format(args=list(args))],
                          capture_output=True, text=True, env=clean_env(), timeout=60)


def test_help_and_version_exit_0_with_their_output_and_no_teardown():
    run = probe("--version")
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout == f"lmp-device-auto-register {__version__}\n"
    run = probe("register", "--help")
    assert run.returncode == 0 and run.stdout.startswith("usage: ") and run.stderr == ""
    assert "--hsm-so-pin PIN" in run.stdout  # all of it: flushed before the exit


def test_exit_codes_and_logs_survive_the_fast_exit(device_root, registration_server):
    run = probe(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 0, run.stderr
    assert "teardown ran" not in run.stderr
    assert "lmp-device-auto-register: registered: installed" in run.stderr  # logging flushed
    assert run.stdout.rstrip().endswith("}")
    run = probe(*device_args(device_root, registration_server))
    assert run.returncode == 3 and "already registered" in run.stderr
    assert "teardown ran" not in run.stderr
    run = probe("--bogus")
    assert run.returncode == 2 and "unrecognized arguments" in run.stderr

