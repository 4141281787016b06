"""TEST-ONLY: stop the agent at a named step, so that a test can kill it there or change
the disk under it. Never set on a device.

With ``LMP_AUTOREG_TEST_PAUSE=<step>:<marker file>`` in its environment, the agent, on
reaching ``<step>``, writes its pid into ``<marker file>`` and waits until that file is
removed (at most ``MAX_PAUSE`` seconds). Steps:

- ``before-request``: the identity is saved, nothing is sent yet;
- ``between-files``: the first file of the answer is installed, the others are not;
- ``before-sota-toml``: every file but ``sota.toml`` is installed.

Unset (always, outside tests), ``pause`` costs one environment lookup.
"""

import os
import time

ENV = "LMP_AUTOREG_TEST_PAUSE"
STEPS = ("before-request", "between-files", "before-sota-toml")
MAX_PAUSE = 60.0


def pause(step: str) -> None:
    """Pause at ``step`` if the test hook asks for it; otherwise return at once."""
    value = os.environ.get(ENV)
    if not value:
        return
    name, _, marker = value.partition(":")
    if name != step or not marker:
        return
    tmp = f"{marker}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, marker)  # the test sees the marker only once the pid is in it
    end = time.monotonic() + MAX_PAUSE
    while os.path.exists(marker) and time.monotonic() < end:
        time.sleep(0.01)
