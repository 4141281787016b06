"""After a registration: fioconfig check-in, service starts, and (factory flow) poweroff.

They run in this order, only on the live device (sysroot ``/``): on a mounted image they
would act on the machine running the agent, so there they are skipped with a note.

- ``fioconfig check-in`` (``--fioconfig``): ``auto`` runs it when the binary is found
  (``--fioconfig-bin``/``FIOCONFIG_BIN``, else ``PATH``) and only warns when it fails;
  ``on`` requires it (not found or failed: exit 7, and no service is started);
  ``off`` skips it. The device gateway it would ask (``CONFIG_URL`` of its environment,
  else ``tls.server`` of the sota.toml it reads, as fioconfig resolves them) is tried
  first with one TCP connection of at most ``GATEWAY_PROBE_TIMEOUT`` seconds: fioconfig
  retries an unreachable gateway for about 51 s (after 1, 2, 5, 13 and 30 s), and a fully
  detached factory has none, so when nothing answers there the check-in is not run and is
  "unreachable". The check-in itself is bounded by ``min(60 s, the time left before the
  --timeout deadline)``; cut short, its transient unit is stopped (``systemctl stop``),
  since a killed ``systemd-run --wait`` leaves the unit and fioconfig running. Its
  secrets dir (``SECRETS_DIR``, default ``/var/run/secrets``) is
  created first, as fioconfig's own unit does. With systemd running, the check-in runs
  outside this unit's sandbox, as a transient unit of PID 1 (``systemd-run --wait``)
  with fioconfig's own ``EnvironmentFile=-/etc/default/fioconfig``: its handlers write
  files (``/etc``, ``/var/sota``) and run scripts that a read-only OS would refuse, and it
  gets exactly the environment its own unit has. Without systemd it runs as our child,
  with ``/etc/default/fioconfig`` applied over our environment. fioconfig finds
  ``sota.toml`` through its own config search path, whose environment variable is also
  called ``SOTA_DIR`` but means a list of config paths: the child never inherits ours,
  and a sota dir other than ``/var/sota`` is passed as ``--config`` paths. Its exit
  status is mapped with the last line it printed: 0 "ok", 123 a handler's failure,
  anything else (1) an error.
- each service of ``--start`` (default aktualizr-lite,fioconfig), all of them even when
  one fails: ``systemctl show`` says whether the unit exists (a unit that is not loaded
  is "failed: <name> is not-found", exit 7); one that is running already is "started";
  any other gets its start queued and is "queued". The start is never asked of systemd
  from inside this unit's job: meta-lmp's aktualizr-lite is ``WantedBy=multi-user.target``
  and ``After=boot-complete.target``, and once systemd-boot-check-no-failures.service
  orders boot-complete.target after multi-user.target, which waits for this unit, systemd
  refuses that start as an ordering cycle (a real boot shows it; even ``--no-block``).
  Instead a transient unit of PID 1 (``systemd-run --no-block``), ordered
  ``After=multi-user.target``, runs ``systemctl start <name>`` once the boot has got past
  this unit; on a device already booted it runs at once. A transient unit that cannot be
  queued is "failed: <why>" (exit 7). When systemd is not running
  (``/run/systemd/system`` is missing, the check of sd_booted(3)), each is "skipped".
- ``systemctl poweroff`` (``--poweroff``), only when every step before it succeeded:
  ``run_post_steps`` marks it "requested", and the CLI asks for it (``power_off``) only
  after the result, the JSON and the last log line are written and flushed, since the
  shutdown stops this unit at once. A refused poweroff is then logged with
  ``LMP_EXIT_CODE=7`` and the agent exits 7.

Every other command is bounded by ``min(60 s, --timeout)``. The device stays registered
whatever happens here. Nothing secret is passed to these commands.
"""

import logging
import os
import shutil
import socket
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from . import testhook
from .errors import PostStepFailed
from .guard import read_env_file
from .paths import DEFAULT_SOTA_DIR
from .retry import Deadline
from .settings import Settings
from .util import child_environ, run

if TYPE_CHECKING:
    from .result import Result

LOG = logging.getLogger(__name__)

STEP_TIMEOUT = 60.0
# At most this long is spent finding out whether the device gateway is there at all.
GATEWAY_PROBE_TIMEOUT = 5.0
# fioconfig's gateway when no sota.toml names one.
DEFAULT_GATEWAY = "https://ota-lite.foundries.io:8443"
SYSTEMD_RUNTIME_DIR = "/run/systemd/system"
# fioconfig's default config search path, with the sota.toml entry for our sota dir.
_FIOCONFIG_CONFIG = ("/usr/lib/sota/conf.d", "{sota}/sota.toml", "/etc/sota/conf.d/")
# fioconfig's unit's EnvironmentFile=, and its default secrets dir.
FIOCONFIG_DEFAULTS = "/etc/default/fioconfig"
DEFAULT_SECRETS_DIR = "/var/run/secrets"
# fioconfig's exit status when a handler's on-change command exits 123.
HANDLER_FAILED = 123
# The transient unit of the check-in, so the journal names it.
CHECKIN_UNIT = "lmp-autoreg-fioconfig-check-in"
# The transient unit that starts a service once the boot is past this unit's target.
START_UNIT = "lmp-autoreg-start-{}"
START_AFTER = "multi-user.target"


def systemd_running(environ: Mapping[str, str]) -> bool:
    """True when systemd is the init system (the directory sd_booted(3) checks exists)."""
    # TEST-ONLY: a test may name another directory (``testhook``); a device never does.
    return Path(testhook.systemd_runtime_dir(environ, SYSTEMD_RUNTIME_DIR)).is_dir()


def step_timeout(settings: Settings) -> float:
    return min(STEP_TIMEOUT, settings.timeout)


def run_post_steps(
    settings: Settings,
    result: "Result",
    environ: Mapping[str, str] | None = None,
    deadline: Deadline | None = None,
) -> None:
    """Check in with fioconfig, start the services, then (``--poweroff``) power off;
    record each in ``result``.

    ``result.fioconfig`` becomes "ok", "off", "unreachable", "failed: ..." or
    "skipped: ..."; ``deadline`` (default: ``--timeout`` from now) bounds the check-in;
    ``result.services`` maps each service to "queued", "started", "failed: ..." or
    "skipped", and ``"poweroff"`` to "requested" or "skipped" with ``--poweroff``: it is
    requested only when everything before it succeeded, and asked for by ``power_off``
    once the result is out. Raises ``PostStepFailed`` (exit 7) when a required step failed.
    """
    environ = os.environ if environ is None else environ
    deadline = deadline or Deadline(settings.timeout)
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
    checkin = fioconfig_checkin(settings, environ, deadline)
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
    failed = [name for name, state in services.items() if state.startswith("failed")]
    if failed:
        failures.append(f"could not start {', '.join(failed)}")
    if settings.poweroff:
        if failures:
            LOG.warning("not powering off: %s", "; ".join(failures))
            services["poweroff"] = "skipped"
        elif not systemd_running(environ):
            LOG.warning("systemd is not running: not powering off")
            services["poweroff"] = "skipped"
        else:
            services["poweroff"] = "requested"  # once the result is out: power_off
    if failures:
        raise PostStepFailed("registered, but " + "; ".join(failures))


def fioconfig_binary(settings: Settings) -> str | None:
    if settings.fioconfig_bin:
        return settings.fioconfig_bin if os.access(settings.fioconfig_bin, os.X_OK) else None
    return shutil.which("fioconfig")


def fioconfig_config_path(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """fioconfig's config search path: ours for a sota dir other than ``/var/sota``, else
    ``SOTA_DIR`` of its environment (a comma-separated list), else its default."""
    sota = str(settings.paths.sota_device)
    if PurePosixPath(sota) == DEFAULT_SOTA_DIR and env.get("SOTA_DIR"):
        return env["SOTA_DIR"].split(",")
    return [path.format(sota=sota) for path in _FIOCONFIG_CONFIG]


def gateway_url(configs: Sequence[tuple[str, str]], config_url: str | None) -> str:
    """The URL fioconfig checks in with: ``config_url`` (``CONFIG_URL``), else ``tls.server``
    + ``/config`` from ``configs`` ((file name, TOML text) in search-path order), which
    fioconfig ranks by file name, the last name alphabetically first, a later file of the
    same name replacing an earlier one, and an unparsable file ignored here (fioconfig
    refuses to run: it then fails on its own)."""
    if config_url:
        return config_url
    by_name = dict(configs)
    for name in sorted(by_name, reverse=True):
        try:
            server = tomllib.loads(by_name[name]).get("tls", {}).get("server")
        except tomllib.TOMLDecodeError:
            continue
        if isinstance(server, str) and server:
            return server + "/config"
    return DEFAULT_GATEWAY + "/config"


def gateway_address(url: str) -> tuple[str, int] | None:
    """(host, port) of ``url``, or None when it names no host."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname else None


def read_configs(settings: Settings, search_path: Sequence[str]) -> list[tuple[str, str]]:
    """(file name, text) of each TOML file of fioconfig's search path, in its order."""
    found: list[tuple[str, str]] = []
    for entry in search_path:
        path = settings.paths.host(entry)
        try:
            files = sorted(p for p in path.iterdir() if p.name.endswith(".toml")) \
                if path.is_dir() else [path]
            found += [(p.name, p.read_text(encoding="utf-8", errors="replace"))
                      for p in files if p.is_file()]
        except OSError as e:
            LOG.debug("fioconfig config %s: %s", path, e)
    return found


def probe_gateway(url: str, timeout: float) -> str | None:
    """None when a TCP connection to ``url``'s host and port opens within ``timeout``;
    else why not."""
    address = gateway_address(url)
    if address is None:
        return f"{url} names no host"
    try:
        with socket.create_connection(address, timeout=max(timeout, 0.1)):
            return None
    except OSError as e:
        return f"{address[0]} port {address[1]}: {e.strerror or e}"


def fioconfig_command(settings: Settings, binary: str) -> list[str]:
    argv = [binary]
    if PurePosixPath(settings.paths.sota_device) != DEFAULT_SOTA_DIR:
        sota = str(settings.paths.sota_device)
        for path in _FIOCONFIG_CONFIG:
            argv += ["--config", path.format(sota=sota)]
    return [*argv, "check-in"]


def fioconfig_environment(
    environ: Mapping[str, str], defaults: Mapping[str, str]
) -> dict[str, str]:
    """The environment of a check-in run as our child: ours without what fioconfig would
    misread, with ``/etc/default/fioconfig`` (``defaults``) over it, as its unit has it."""
    return child_environ(environ, drop=("SOTA_DIR", "NOTIFY_SOCKET"), add=defaults)


def checkin_outcome(returncode: int, output: str) -> str:
    """What a check-in's exit status means (fioconfig: 0, 1, or 123 from a handler)."""
    if returncode == 0:
        return "ok"
    line = _last_line(output)
    if returncode == HANDLER_FAILED:
        return f"failed: a handler failed (exit status {returncode}): {line}"
    return f"failed: exit status {returncode}: {line}"


def fioconfig_checkin(
    settings: Settings, environ: Mapping[str, str], deadline: Deadline
) -> str:
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
    argv = fioconfig_command(settings, binary)
    defaults = read_env_file(FIOCONFIG_DEFAULTS)
    env = child_environ(environ, drop=("NOTIFY_SOCKET",))
    through_pid1 = systemd_running(environ)
    if through_pid1:
        # Outside our sandbox, in the environment fioconfig's own unit has (see above).
        its_env: Mapping[str, str] = defaults
        argv = ["systemd-run", "--wait", "--pipe", "--collect", "--quiet",
                f"--unit={CHECKIN_UNIT}", f"--property=EnvironmentFile=-{FIOCONFIG_DEFAULTS}",
                *argv]
    else:
        env = its_env = fioconfig_environment(environ, defaults)
    secrets = its_env.get("SECRETS_DIR") or DEFAULT_SECRETS_DIR
    url = gateway_url(read_configs(settings, fioconfig_config_path(settings, its_env)),
                      its_env.get("CONFIG_URL"))
    why = probe_gateway(url, min(GATEWAY_PROBE_TIMEOUT, deadline.remaining()))
    if why is not None:
        complain("fioconfig check-in skipped: the device gateway %s is unreachable (%s)",
                 url, why)
        return "unreachable"
    try:
        os.makedirs(secrets, mode=0o750, exist_ok=True)
    except OSError as e:
        complain("cannot create fioconfig's secrets dir %s: %s", secrets, e.strerror or e)
        return f"failed: cannot create {secrets}"
    LOG.info("checking in with fioconfig at %s", url)
    timeout = min(STEP_TIMEOUT, deadline.remaining())
    try:
        done = run(argv, timeout=timeout, env=env)
    except TimeoutError:
        complain("fioconfig check-in did not finish within %.0f s", timeout)
        if through_pid1:  # the killed systemd-run leaves the unit, and fioconfig, running
            _systemctl(["stop", CHECKIN_UNIT], STEP_TIMEOUT, env)
        return f"failed: timed out after {timeout:.0f} s"
    except OSError as e:
        complain("cannot run %s: %s", argv[0], e.strerror or e)
        return f"failed: cannot run {argv[0]}"
    outcome = checkin_outcome(done.returncode, done.stdout + "\n" + done.stderr)
    if outcome != "ok":
        complain("fioconfig check-in %s", outcome)
        return outcome
    LOG.info("fioconfig check-in done")
    return "ok"


def start_services(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """Queue the start of each service in order; name -> "queued" | "started" | "failed:
    <why>" | "skipped"."""
    if not settings.start:
        return {}
    if not systemd_running(environ):
        LOG.warning("systemd is not running: not starting %s", ", ".join(settings.start))
        return {name: "skipped" for name in settings.start}
    timeout = step_timeout(settings)
    env = child_environ(environ, drop=("NOTIFY_SOCKET",))
    return {name: _queue_start(name, timeout, env) for name in settings.start}


def unit_state(show_output: str) -> tuple[str, str]:
    """(LoadState, ActiveState) from ``systemctl show`` output."""
    props = dict(line.partition("=")[::2] for line in show_output.splitlines())
    return props.get("LoadState", ""), props.get("ActiveState", "")


def _queue_start(name: str, timeout: float, env: dict[str, str]) -> str:
    ok, out = _systemctl(["show", "--property=LoadState", "--property=ActiveState", name],
                         timeout, env)
    if not ok:
        return f"failed: {out}"
    load, active = unit_state(out)
    if load != "loaded":  # not-found, masked, bad-setting: a start could never be queued
        LOG.error("cannot start %s: the unit is %s", name, load or "unknown to systemd")
        return f"failed: {name} is {load or 'unknown to systemd'}"
    if active == "active":
        LOG.info("%s is running already", name)
        return "started"
    LOG.info("queuing the start of %s for when the boot is past %s", name, START_AFTER)
    ok, out = _command(["systemd-run", "--no-block", "--collect", "--quiet",
                        f"--unit={START_UNIT.format(name)}", f"--property=After={START_AFTER}",
                        "systemctl", "start", name], timeout, env)
    return "queued" if ok else f"failed: {out}"


def power_off(environ: Mapping[str, str] | None = None) -> bool:
    """Ask PID 1 to power off (``systemctl poweroff`` queues the job and returns); call it
    only once everything worth keeping is written. False when it was refused (logged)."""
    environ = os.environ if environ is None else environ
    LOG.info("powering off")
    env = child_environ(environ, drop=("NOTIFY_SOCKET",))
    ok, out = _systemctl(["poweroff"], STEP_TIMEOUT, env)
    if not ok:
        LOG.error("the poweroff was refused: %s", out)
    return ok


def _systemctl(args: list[str], timeout: float, env: dict[str, str]) -> tuple[bool, str]:
    return _command(["systemctl", *args], timeout, env)


def _command(argv: list[str], timeout: float, env: dict[str, str]) -> tuple[bool, str]:
    """Run a systemd command: (True, its stdout) or (False, why, also logged)."""
    what = " ".join(argv)
    try:
        done = run(argv, timeout=timeout, env=env)
    except TimeoutError:
        LOG.error("%s did not finish within %.0f s", what, timeout)
        return False, f"{argv[0]} timed out after {timeout:.0f} s"
    except OSError as e:
        LOG.error("cannot run %s: %s", what, e.strerror or e)
        return False, f"cannot run {argv[0]}: {e.strerror or e}"
    if done.returncode != 0:
        why = _last_line(done.stderr)
        LOG.error("%s failed (exit status %d): %s", what, done.returncode, why)
        return False, why
    return True, done.stdout


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
