"""The first check of every start: where the sota dir is, and is the device registered?

Most starts of the agent end here (the unit runs it on every boot until the device is
registered and ``aktualizr-lite`` has made ``sql.db``; a jig may run it on a registered
device), so this module uses only ``os`` and the small DER reader: no ``pathlib``,
``logging``, ``dataclasses`` or ``cryptography``, each of which costs milliseconds of
start-up (docs/performance.md). ``settings.resolve_paths`` builds on ``locate``.
"""

import os
from collections.abc import Mapping

from . import der
from .errors import AlreadyRegistered, ConfigError

# The same device paths as paths.DEFAULT_SOTA_DIR and paths.DEFAULTS_FILE, as plain strings.
DEFAULT_SOTA_DIR = "/var/sota"
DEFAULTS_FILE = "/etc/default/lmp-device-auto-register"
# The agent's state in the sota dir (state.py); an install journal there means the files
# beside it are an unfinished install, not a registration.
STATE_DIR = ".lmp-autoreg"
JOURNAL = "install.json"

StrPath = str | os.PathLike[str]
MAX_LINKS = 40  # as the kernel: a loop of links is an error, not a hang


def read_env_file(path: StrPath) -> dict[str, str]:
    """Parse KEY=VALUE lines (os-release, /etc/default, /etc/sota/hsm); quotes are stripped.

    A missing file is empty. Comments, blank lines and an ``export`` prefix are allowed.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read {os.fspath(path)}: {e.strerror}") from e
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def host_path(sysroot: str, device_path: str) -> str:
    """Where ``device_path`` (absolute, on the device) is on this machine.

    On the device itself that is the path as it is. Under another sysroot (a mounted
    image), symbolic links are followed as the device would follow them: an absolute
    target, and ``..``, stay inside the sysroot instead of reaching this machine's files.
    """
    if sysroot == "/":
        return device_path
    todo = [p for p in device_path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(sysroot, *done, part)
        if not os.path.islink(here):
            done.append(part)
            continue
        links += 1
        if links > MAX_LINKS:
            raise ConfigError(f"too many symbolic links under {sysroot} in {device_path}")
        target = os.readlink(here)
        if target.startswith("/"):
            done = []
        todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
    return os.path.join(sysroot, *done)


def locate(cli: Mapping[str, object], environ: Mapping[str, str]) -> tuple[str, str]:
    """The sysroot and the sota dir (a device path), from the first place that sets them.

    The sota dir comes from ``--sota-dir``, ``$SOTA_DIR``, ``SOTA_DIR`` in the default file
    (under the sysroot), or the default; empty values count as unset (docs/spec.md section 3).
    """
    sysroot = str(cli.get("sysroot") or "/")
    if not os.path.isdir(sysroot):
        raise ConfigError(f"--sysroot {sysroot} is not a directory")
    defaults = read_env_file(host_path(sysroot, DEFAULTS_FILE))
    places = (
        ("--sota-dir", cli.get("sota_dir")),
        ("$SOTA_DIR", environ.get("SOTA_DIR")),
        (f"SOTA_DIR in {DEFAULTS_FILE}", defaults.get("SOTA_DIR")),
    )
    for place, value in places:
        if value is None or value == "":
            continue
        value = str(value)
        if not value.startswith("/") or ".." in value.split("/"):
            raise ConfigError(
                f"sota dir from {place} is invalid: {value!r} is not an absolute device path "
                "without '..'"
            )
        return sysroot, value
    return sysroot, DEFAULT_SOTA_DIR


def is_registered(sota: StrPath) -> bool:
    """docs/spec.md section 1: sql.db, or sota.toml with client.pem or an HSM ([p11]) configuration.

    Never while an install journal exists: then those files are an unfinished install.
    """
    if os.path.exists(os.path.join(sota, STATE_DIR, JOURNAL)):
        return False
    if os.path.exists(os.path.join(sota, "sql.db")):
        return True
    toml = os.path.join(sota, "sota.toml")
    if not os.path.exists(toml):
        return False
    if os.path.exists(os.path.join(sota, "client.pem")):
        return True
    import tomllib  # only here, for an HSM configuration: it costs a few ms to import

    try:
        with open(toml, "rb") as f:
            return "p11" in tomllib.loads(f.read().decode(errors="replace"))
    except (OSError, tomllib.TOMLDecodeError):
        return False


def registered_uuid(sota: StrPath) -> str | None:
    """The uuid (the CN of ``client.pem``) of an installed registration, when readable."""
    try:
        with open(os.path.join(sota, "client.pem"), "rb") as f:
            return der.common_name(f.read())
    except (OSError, ValueError):
        return None


def check_not_registered(sota: StrPath, device_path: str | None = None) -> None:
    """Raise ``AlreadyRegistered`` (exit 3) when the device is registered: docs/spec.md section 1.

    ``sota`` is the sota dir on this machine, ``device_path`` the same on the device."""
    if is_registered(sota):
        uuid = registered_uuid(sota)
        raise AlreadyRegistered(
            f"already registered ({os.fspath(sota)}"
            + (f", uuid {uuid}" if uuid else "")
            + "): nothing to do; --force registers again",
            uuid,
            device_path,
        )
