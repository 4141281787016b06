"""Clock sanity (docs/reliability.md section 7): a clock before the release date gets a clear
warning."""

import subprocess
import sys
from datetime import UTC, date, datetime

from lmp_autoreg import RELEASE_DATE
from lmp_autoreg.preflight import clock_warning

from conftest import clean_env, device_args, require_tool

RELEASE = date.fromisoformat(RELEASE_DATE)


def test_clock_warning_only_before_the_release():
    assert clock_warning(datetime(2031, 5, 1, tzinfo=UTC), RELEASE) is None
    assert clock_warning(datetime.combine(RELEASE, datetime.min.time(), UTC), RELEASE) is None
    warning = clock_warning(datetime(1970, 1, 1, 0, 0, 12, tzinfo=UTC), RELEASE)
    assert warning is not None
    assert "1970-01-01 00:00" in warning and RELEASE_DATE in warning
    assert "not yet valid" in warning


def test_the_agent_warns_about_a_clock_from_the_past(device_root, registration_server):
    # libfaketime sets the process's clock to 1 January 1970 plus a few seconds, the
    # clock of a board without a battery-backed RTC, before NTP.
    faketime = require_tool("faketime")
    args = device_args(device_root, registration_server)
    # Only the wall clock: a board's monotonic clock counts from its boot whatever the date
    # (and the agent's waits, such as the bound of an exchange, run on it).
    proc = subprocess.run([faketime, "1970-01-01 00:00:05", sys.executable, "-m",
                           "lmp_autoreg", *args], capture_output=True, text=True,
                          env=clean_env(FAKETIME_DONT_FAKE_MONOTONIC="1"), timeout=60)
    assert "the system clock says 1970-01-01" in proc.stderr
    assert "not yet valid" in proc.stderr
    # Over plain http the certificate's dates play no part: the registration goes on.
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lmp_autoreg", *args, "--force"],
                          capture_output=True, text=True, env=clean_env(), timeout=60)
    assert proc.returncode == 0 and "system clock" not in proc.stderr
