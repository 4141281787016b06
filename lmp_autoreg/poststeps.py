"""After a registration: fioconfig check-in, service starts, and (factory flow) poweroff.

They run in this order, only on the live device (sysroot ``/``): on a mounted image they
would act on the machine running the agent, so there they are skipped with a note.

- ``fioconfig check-in`` (``--fioconfig``): ``auto`` runs it when the binary is found
  (``--fioconfig-bin``/``FIOCONFIG_BIN``, else ``PATH``) and only warns when it fails;
  ``on`` requires it (not found or failed: exit 7, and no service is started);
  ``off`` skips it. fioconfig finds ``sota.toml`` through its own config search path,
  whose environment variable is also called ``SOTA_DIR`` but means a list of config
  paths: the child never inherits ours, and a sota dir other than ``/var/sota`` is
  passed as ``--config`` paths.
- ``systemctl start`` of each service of ``--start`` (default aktualizr-lite,fioconfig),
  all of them even when one fails; a failure exits 7. When systemd is not running
  (``/run/systemd/system`` is missing, the check of sd_booted(3)), each is "skipped".
- ``systemctl poweroff`` (``--poweroff``), the last step, only when every step before it
  succeeded; it queues the shutdown and returns, so the result is still printed, and
  says whether the poweroff was refused (exit 7).

Every command is bounded by ``min(60 s, --timeout)``. The device stays registered
whatever happens here. Nothing secret is passed to these commands.
"""

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from . import testhook
from .errors import PostStepFailed
from .paths import DEFAULT_SOTA_DIR
from .settings import Settings
from .util import child_environ, run

if TYPE_CHECKING:
    from .result import Result

LOG = logging.getLogger(__name__)

STEP_TIMEOUT = 60.0
SYSTEMD_RUNTIME_DIR = "/run/systemd/system"
# fioconfig's default config search path, with the sota.toml entry for our sota dir.
_FIOCONFIG_CONFIG = ("/usr/lib/sota/conf.d", "{sota}/sota.toml", "/etc/sota/conf.d/")


def systemd_running(environ: Mapping[str, str]) -> bool:
    """True when systemd is the init system (the directory sd_booted(3) checks exists)."""
    # TEST-ONLY: a test may name another directory (``testhook``); a device never does.
    return Path(testhook.systemd_runtime_dir(environ, SYSTEMD_RUNTIME_DIR)).is_dir()


def step_timeout(settings: Settings) -> float:
    return min(STEP_TIMEOUT, settings.timeout)


def run_post_steps(
    settings: Settings, result: "Result", environ: Mapping[str, str] | None = None
) -> None:
    """Check in with fioconfig, start the services, then (``--poweroff``) power off;
    record each in ``result``.

    ``result.fioconfig`` becomes "ok", "off", "failed: ..." or "skipped: ...";
    ``result.services`` maps each service to "started", "failed" or "skipped", and
    ``"poweroff"`` to "requested", "failed" or "skipped" with ``--poweroff``. The poweroff
    is asked for only when everything before it succeeded, and before the result is
    printed, so that the JSON tells a jig whether it was refused. Raises
    ``PostStepFailed`` (exit 7) when a required step failed.
    """
    environ = os.environ if environ is None else environ
    paths = settings.paths
    if not paths.is_live:
        note = f"skipped: --sysroot {paths.sysroot} is not /"
        LOG.info("post-steps %s: they would act on this machine, not on the image", note)
        result.fioconfig = "off" if settings.fioconfig == "off" else note
        result.services = {name: "skipped" for name in settings.start}
        if settings.poweroff:
            result.services["poweroff"] = "skipped"
        return
    failures = []
    checkin = fioconfig_checkin(settings, environ)
    result.fioconfig = checkin
    if settings.fioconfig == "on" and checkin != "ok":
        failures.append(f"the required fioconfig check-in (--fioconfig on) did not succeed "
                        f"({checkin})")
        if settings.start:
            LOG.warning("not starting %s: the required fioconfig check-in did not succeed",
                        ", ".join(settings.start))
        services = {name: "skipped" for name in settings.start}
    else:
        services = start_services(settings, environ)
    result.services = services
    failed = [name for name, state in services.items() if state == "failed"]
    if failed:
        failures.append(f"could not start {', '.join(failed)}")
    if settings.poweroff:
        if failures:
            LOG.warning("not powering off: %s", "; ".join(failures))
            services["poweroff"] = "skipped"
        else:
            services["poweroff"] = poweroff(settings, environ)
            if services["poweroff"] == "failed":
                failures.append("the poweroff was refused")
    if failures:
        raise PostStepFailed("registered, but " + "; ".join(failures))


def fioconfig_binary(settings: Settings) -> str | None:
    if settings.fioconfig_bin:
        return settings.fioconfig_bin if os.access(settings.fioconfig_bin, os.X_OK) else None
    return shutil.which("fioconfig")


def fioconfig_command(settings: Settings, binary: str) -> list[str]:
    argv = [binary]
    if PurePosixPath(settings.paths.sota_device) != DEFAULT_SOTA_DIR:
        sota = str(settings.paths.sota_device)
        for path in _FIOCONFIG_CONFIG:
            argv += ["--config", path.format(sota=sota)]
    return [*argv, "check-in"]


def fioconfig_checkin(settings: Settings, environ: Mapping[str, str]) -> str:
    """Run ``fioconfig check-in`` as ``--fioconfig`` says; return what happened."""
    if settings.fioconfig == "off":
        return "off"
    required = settings.fioconfig == "on"
    complain = LOG.error if required else LOG.warning
    binary = fioconfig_binary(settings)
    if binary is None:
        where = settings.fioconfig_bin or "PATH"
        complain("fioconfig check-in skipped: no fioconfig binary (looked in %s)", where)
        return f"skipped: fioconfig not found in {where}"
    timeout = step_timeout(settings)
    LOG.info("checking in with fioconfig")
    env = child_environ(environ, drop=("SOTA_DIR", "NOTIFY_SOCKET"))
    try:
        done = run(fioconfig_command(settings, binary), timeout=timeout, env=env)
    except TimeoutError:
        complain("fioconfig check-in did not finish within %.0f s", timeout)
        return f"failed: timed out after {timeout:.0f} s"
    except OSError as e:
        complain("cannot run %s: %s", binary, e.strerror or e)
        return f"failed: cannot run {binary}"
    if done.returncode != 0:
        complain("fioconfig check-in failed (exit status %d): %s", done.returncode,
                 _last_line(done.stderr))
        return f"failed: exit status {done.returncode}"
    LOG.info("fioconfig check-in done")
    return "ok"


def start_services(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """``systemctl start`` each service in order; name -> "started" | "failed" | "skipped"."""
    if not settings.start:
        return {}
    if not systemd_running(environ):
        LOG.warning("systemd is not running: not starting %s", ", ".join(settings.start))
        return {name: "skipped" for name in settings.start}
    timeout = step_timeout(settings)
    env = child_environ(environ, drop=("NOTIFY_SOCKET",))
    states = {}
    for name in settings.start:
        LOG.info("starting %s", name)
        states[name] = "started" if _systemctl(["start", name], timeout, env) else "failed"
    return states


def poweroff(settings: Settings, environ: Mapping[str, str]) -> str:
    """``systemctl poweroff`` (it queues the job and returns): "requested", "failed" or
    "skipped" (systemd is not running)."""
    if not systemd_running(environ):
        LOG.warning("systemd is not running: not powering off")
        return "skipped"
    LOG.info("powering off")
    env = child_environ(environ, drop=("NOTIFY_SOCKET",))
    return "requested" if _systemctl(["poweroff"], step_timeout(settings), env) else "failed"


def _systemctl(args: list[str], timeout: float, env: dict[str, str]) -> bool:
    what = " ".join(["systemctl", *args])
    try:
        done = run(["systemctl", *args], timeout=timeout, env=env)
    except TimeoutError:
        LOG.error("%s did not finish within %.0f s", what, timeout)
        return False
    except OSError as e:
        LOG.error("cannot run %s: %s", what, e.strerror or e)
        return False
    if done.returncode != 0:
        LOG.error("%s failed (exit status %d): %s", what, done.returncode,
                  _last_line(done.stderr))
        return False
    return True


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
