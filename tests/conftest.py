"""Shared test helpers. The fixtures `fake_device`, `device_root`, `registration_server`
and `registration_server_tls` come from the public test kit (lmp_autoreg.testing.plugin)."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Hypothesis profiles (docs/reliability.md, "Bad input"). "default", for `make test`: a fixed
# seed and few examples, so a run is repeatable and within the suite's time budget. "long",
# for `make test-long`: new random cases, at least 2000 per family. No per-example deadline in
# either: a case runs real processes, whose start-up a loaded machine slows.
settings.register_profile(
    "default", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# "long" names derandomize itself: a profile inherits from "default", which this file
# replaces, and would otherwise run the same fixed-seed cases again.
settings.register_profile(
    "long", max_examples=2000, derandomize=False, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def any_text(max_size: int | None = None) -> st.SearchStrategy[str]:
    """Any text JSON can carry or ``os.fsdecode`` can give: lone surrogates included, which
    Hypothesis's ``text()`` leaves out."""
    return st.text(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)),
                   max_size=max_size)

# Settings the agent reads from the environment: a test starts from none of them.
AGENT_ENV = (
    "DEVICE_API", "PRODUCTION", "DEVICE_FACTORY", "HARDWARE_ID", "USE_HOSTNAME", "APPS",
    "RESTORABLE_APPS", "DEVICE_GROUP", "TOKEN_FILE", "SOTA_DIR", "BACKEND", "LMP_DEVICE_REGISTER",
    "FIOCONFIG",
    "FIOCONFIG_BIN", "START_SERVICES", "POWEROFF", "REGISTRATION_TIMEOUT", "CACERT",
    "TOKEN_HEADER", "NOTIFY_SOCKET", "JOURNAL_STREAM", "LMP_AUTOREG_TEST_SYSTEMD_RUNTIME_DIR",
    "OAUTH_BASE",
)
# Files of the machine running the tests that an agent on the live root (no --sysroot) reads.
LIVE_ROOT_FILES = ("/etc/default/lmp-device-auto-register", "/etc/sota/hsm")


def require_tool(name: str) -> str:
    """Return the path of executable `name`, looked up on PATH and beside the running Python.

    A missing tool skips the test on a developer's machine but fails it in CI (env var CI
    set), so that CI never passes by silently skipping a check.
    """
    here = str(Path(sys.executable).parent)
    path = shutil.which(name) or shutil.which(name, path=here)
    if path is None:
        message = f"required tool {name!r} not found on PATH or in {here}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_module(name: str) -> Any:
    """Import module `name`; a missing one skips the test, but fails it in CI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"Python module {name} is required in CI but is not installed")
        pytest.skip(f"Python module {name} is not installed")


# What else changes how the agent behaves, read by Python, requests or OpenSSL: every
# ``PYTHON*`` variable (``PYTHONUNBUFFERED=1`` would hide output that is never flushed),
# the test seams, SoftHSM's configuration, proxies and CA bundles. A device has none of them.
OUTSIDE_ENV_PREFIXES = ("PYTHON", "LMP_AUTOREG_TEST_", "SOFTHSM2_", "FAKETIME")
OUTSIDE_ENV = frozenset({
    "http_proxy", "https_proxy", "all_proxy", "no_proxy", "requests_ca_bundle",
    "curl_ca_bundle", "ssl_cert_file", "ssl_cert_dir", "ld_preload",
})


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of the machine running the tests without anything that changes what
    the agent (or a fake tool) does, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items()
        if k not in AGENT_ENV and not k.startswith(OUTSIDE_ENV_PREFIXES)
        and k.lower() not in OUTSIDE_ENV
    }
    env.update(extra)
    return env


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, umask: int | None = None,
    stdin: str | None = None,
) -> Run:
    """Run the agent as a real subprocess, the way the unit and a jig do; ``stdin``, what a
    jig pipes in (else nothing: /dev/null)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmp_autoreg", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=timeout,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli():
    return run_cli


# The deadline of the usual runs: far above the agent's start-up on a loaded machine (a
# good registration never meets it), low enough that a run failing until it ends is short.
# A test whose subject is the deadline gives its own; one that must fail fast ends the
# failure with Reply.give_up().
TIMEOUT = "10"


def device_args(device, server, *extra: str) -> list[str]:
    """The usual arguments to register the fake `device` against `server`."""
    return ["--sysroot", str(device.root), "--device-api", server.url, "--fioconfig", "off",
            "--no-start", "--timeout", TIMEOUT, *extra]


def live_device_args(device, server, *extra: str) -> list[str]:
    """Arguments to register `device` on the live root (no --sysroot, so the post-steps run):
    its sota dir by absolute path, and every setting given, so nothing of this machine leaks
    in (the `live_root` fixture checks the files that could)."""
    return ["--sota-dir", str(device.sota), "--device-api", server.url, "--factory", "acme",
            "--hwid", "intel-corei7-64", "--tag", "main", "--apps", "app1,app2",
            "--token-file", str(device.path("/etc/lmp-device-register-token")),
            "--no-production", "--timeout", TIMEOUT, *extra]


@pytest.fixture
def live_root() -> None:
    """Fail when this machine has device files that would leak into a live-root run."""
    present = [path for path in LIVE_ROOT_FILES if os.path.exists(path)]
    if present:
        pytest.fail(f"this machine has {', '.join(present)}: a live-root test would read it")


@pytest.fixture
def sota(device_root) -> Path:
    return Path(device_root.sota)
