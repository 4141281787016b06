"""Run the agent until it stops at a named step (``lmp_autoreg.testhook``, test-only), then kill it
there or let it go on: the crash and local-fault tests build on this."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lmp_autoreg.testhook import PAUSE_ENV

from conftest import Run, clean_env

AGENT = (sys.executable, "-m", "lmp_autoreg")


class Paused:
    """The agent started with ``args``, once it has reached ``step`` and waits there.

    ``command`` replaces the plain ``python -m lmp_autoreg`` (for a wrapper such as
    ``unshare``); the agent must be the last process it starts. ``pid`` is the agent's own
    pid, read from the marker file the agent writes.
    """

    def __init__(
        self,
        step: str,
        marker: Path,
        args: Sequence[str] = (),
        *,
        command: Sequence[str] = AGENT,
        env: dict[str, str] | None = None,
        wait: float = 20.0,
    ) -> None:
        self.marker = marker
        environ = env if env is not None else clean_env()
        self.proc = subprocess.Popen(
            [*command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**environ, PAUSE_ENV: f"{step}:{marker}"},
        )
        end = time.monotonic() + wait
        while not marker.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise AssertionError(f"the agent never reached {step}:\n{out}\n{err}")
            time.sleep(0.01)
        self.pid = int(marker.read_text())

    def kill(self) -> None:
        """kill -9 the agent, as a power cut or the OOM killer would."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.communicate(timeout=20)

    def resume(self, timeout: float = 30) -> Run:
        """Let the agent go on from the step; wait for it to end."""
        self.marker.unlink()
        out, err = self.proc.communicate(timeout=timeout)
        return Run(self.proc.returncode, out, err)

    def __enter__(self) -> "Paused":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.kill()
            self.proc.communicate()
