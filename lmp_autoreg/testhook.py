"""TEST-ONLY: the ways a test steers the agent, and the only module that reads them.

Each is an environment variable named ``LMP_AUTOREG_TEST_*``, never set on a device;
unset, each costs one environment lookup where it is read. Tests import the names from
here (tests/pausing.py, tests/test_poststeps.py), and tests/test_structure.py checks
that no other module of the agent reads an ``LMP_AUTOREG_`` variable.

- ``LMP_AUTOREG_TEST_PAUSE=<step>:<marker file>`` (``pause``): on reaching ``<step>`` the
  agent writes its pid into ``<marker file>`` and waits until that file is removed (at
  most ``MAX_PAUSE`` seconds), so that a test can kill it there or change the disk under
  it. Steps:

  - ``before-request``: the identity is saved, nothing is sent yet;
  - ``between-files``: the first file of the answer is installed, the others are not;
  - ``before-sota-toml``: every file but ``sota.toml`` is installed.

- ``LMP_AUTOREG_TEST_SYSTEMD_RUNTIME_DIR=<dir>`` (``systemd_runtime_dir``): the directory
  whose existence means "systemd is running" (sd_booted(3) checks
  ``/run/systemd/system``), so that a test drives both answers of the post-steps' check
  on any machine. It replaces that directory in that check and nowhere else.
"""

import os
from collections.abc import Mapping

PREFIX = "LMP_AUTOREG_TEST_"
PAUSE_ENV = PREFIX + "PAUSE"
SYSTEMD_RUNTIME_DIR_ENV = PREFIX + "SYSTEMD_RUNTIME_DIR"
STEPS = ("before-request", "between-files", "before-sota-toml")
MAX_PAUSE = 60.0


def pause(step: str) -> None:
    """TEST-ONLY: pause at ``step`` if a test asks for it; otherwise return at once."""
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return
    name, _, marker = value.partition(":")
    if name != step or not marker:
        return
    import time

    tmp = f"{marker}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, marker)  # the test sees the marker only once the pid is in it
    end = time.monotonic() + MAX_PAUSE
    while os.path.exists(marker) and time.monotonic() < end:
        time.sleep(0.01)


def systemd_runtime_dir(environ: Mapping[str, str], real: str) -> str:
    """``real``, unless a test names another directory (TEST-ONLY)."""
    return environ.get(SYSTEMD_RUNTIME_DIR_ENV) or real
