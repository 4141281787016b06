"""The Makefile's venv follows the machine: a changed set of extras installs again.

`make` runs for real in a copy of the Makefile, with a fake `python3` (whose venv's python
logs what pip was asked to install) and a fake `pkg-config` that finds libsystemd only
while a marker file exists, as installing libsystemd-dev would make the real one do.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool

REPO = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$MAKE_TEST_LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""
FAKE_PKG_CONFIG = """#!/bin/sh
[ "$1 $2" = "--exists libsystemd" ] && [ -e "$(dirname "$0")/libsystemd-installed" ]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, work / name)
    os.utime(work / "pyproject.toml", (1_000_000_000, 1_000_000_000))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", FAKE_PYTHON), ("pkg-config", FAKE_PKG_CONFIG)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return work


def make_venv(project: Path) -> list[str]:
    """Run `make venv`; return the pip installs it ran."""
    make = require_tool("make")
    log = project / "calls.log"
    log.write_text("")
    bin_dir = project.parent / "bin"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MAKE_TEST_LOG": str(log)}
    run = subprocess.run([make, "-C", str(project), "venv", f"PYTHON={bin_dir / 'python3'}"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return [line for line in log.read_text().splitlines() if "pip install" in line]


def installed(extras: str) -> list[str]:
    return [f"-m pip install -q --disable-pip-version-check -e .[{extras}]"]


def test_installing_libsystemd_later_reinstalls_with_the_systemd_extra(project):
    marker = project.parent / "bin" / "libsystemd-installed"
    assert make_venv(project) == installed("test,dev,kit")
    assert (project / ".venv/.installed-stamp").read_text().strip() == "test,dev,kit"
    assert make_venv(project) == []  # nothing changed: nothing to do

    marker.touch()  # apt-get install libsystemd-dev
    assert make_venv(project) == installed("test,dev,kit,systemd")
    assert (project / ".venv/.installed-stamp").read_text().strip() == "test,dev,kit,systemd"
    assert make_venv(project) == []

    marker.unlink()  # and removed again
    assert make_venv(project) == installed("test,dev,kit")


def test_a_changed_pyproject_still_reinstalls(project):
    assert make_venv(project) == installed("test,dev,kit")
    edited = (project / "pyproject.toml").stat().st_mtime
    stamp = project / ".venv/.installed-stamp"
    os.utime(stamp, (edited - 10, edited - 10))  # pyproject.toml edited after the install
    assert make_venv(project) == installed("test,dev,kit")
    assert make_venv(project) == []
