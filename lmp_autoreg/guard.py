"""The first check of every start: where the sota dir is, and is the device registered?

Most starts of the agent end here (the unit runs it on every boot until the device is
registered and ``aktualizr-lite`` has made ``sql.db``; a jig may run it on a registered
device), so this module uses only ``os`` and the small DER reader: no ``pathlib``,
``logging``, ``dataclasses`` or ``cryptography``, each of which costs milliseconds of
start-up (docs/performance.md). ``settings.resolve_paths`` builds on ``locate``.
"""

import os
from collections.abc import Mapping

from . import checked, der
from .errors import AlreadyRegistered, ConfigError

# The same device paths as paths.DEFAULT_SOTA_DIR and paths.DEFAULTS_FILE, as plain strings.
DEFAULT_SOTA_DIR = "/var/sota"
DEFAULTS_FILE = "/etc/default/lmp-device-auto-register"
# The agent's state in the sota dir (state.py); an install journal there means the files
# beside it are an unfinished install, not a registration.
STATE_DIR = ".lmp-autoreg"
JOURNAL = "install.json"

StrPath = str | os.PathLike[str]
# Room a sota dir leaves in PATH_MAX for the names the agent puts under it (the longest:
# ``.lmp-autoreg/aside/.client.chained.tmp-<pid>``), with some to spare.
SOTA_ROOM = 64
MAX_LINKS = 40  # as the kernel: a loop of links is an error, not a hang


def read_env_file(path: StrPath) -> dict[str, str]:
    """Parse KEY=VALUE lines (os-release, /etc/default, /etc/sota/hsm); quotes are stripped.

    A missing file is empty. Comments, blank lines and an ``export`` prefix are allowed.
    Anything but a regular file is refused without blocking (a FIFO, say: ``checked``);
    bytes that are not UTF-8 stay in the values, for ``checked.setting`` to refuse where a
    value is used.
    """
    try:
        data = checked.read_file(path)
    except OSError as e:
        raise ConfigError(f"cannot read {os.fspath(path)}: {e.strerror or e}") from e
    if data is None:
        return {}
    values = {}
    for line in checked.decode(data).splitlines():
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
    sysroot = checked.path(str(cli.get("sysroot") or "/"), "--sysroot")
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
        value = checked.path(str(value), f"sota dir from {place}",
                             room=len(sysroot.encode()) + SOTA_ROOM)
        if not value.startswith("/") or ".." in value.split("/"):
            raise ConfigError(
                f"sota dir from {place} is invalid: {value!r} is not an absolute device path "
                "without '..'"
            )
        return sysroot, value
    return sysroot, DEFAULT_SOTA_DIR


def _toml_string(value: str) -> str | None:
    """The string a TOML value starts with (basic or literal), or None when it is not one."""
    if value.startswith("'"):
        end = value.find("'", 1)
        return value[1:end] if end > 0 else None
    if not value.startswith('"'):
        return None
    end = value.find('"', 1)
    if end < 0:
        return None
    if "\\" not in value[:end]:
        return value[1:end]
    import tomllib  # an escape sequence: rare enough to pay for the real parser

    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return None
    return parsed if isinstance(parsed, str) else None


def sota_toml_facts(text: str) -> tuple[str | None, bool]:
    """What the guard needs of a ``sota.toml``: ``import.tls_clientcert_path`` (None when
    not set) and whether it has a ``[p11]`` section (an HSM, whatever its key and
    certificate ids: ``01``/``03`` as registered, ``07``/``09`` after fioconfig rotated
    them). A line scanner for the layout the server and the tools write, not a TOML parser:
    ``tomllib`` costs milliseconds on every boot (docs/performance.md)."""
    section, cert, p11 = "", None, False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line[1:line.find("]")].strip() if "]" in line else ""
            p11 = p11 or section == "p11"
            continue
        key, eq, value = line.partition("=")
        if eq and section == "import" and key.strip() == "tls_clientcert_path":
            cert = _toml_string(value.strip()) or None
    return cert, p11


def _device_to_host(sota: str, device_sota: str | None, path: str) -> str:
    """Where a path ``sota.toml`` names is on this machine: relative paths are in the sota
    dir (aktualizr's import base), absolute ones are device paths."""
    if not path.startswith("/"):
        return os.path.join(sota, path)
    if device_sota is None or device_sota == sota:
        return path
    if path.startswith(device_sota.rstrip("/") + "/"):
        return os.path.join(sota, path[len(device_sota.rstrip("/")) + 1:])
    if sota.endswith(device_sota):  # elsewhere in a mounted image: under its sysroot
        return host_path(sota[: -len(device_sota)] or "/", path)
    return path


def _sota_toml(sota: StrPath) -> str | None:
    try:
        data = checked.read_file(os.path.join(sota, "sota.toml"))
    except OSError:
        return None
    return None if data is None else data.decode(errors="replace")


def client_cert(sota: StrPath, device_sota: str | None = None) -> str:
    """The client certificate of the registration in ``sota`` (a path on this machine):
    the one ``sota.toml`` names (``import.tls_clientcert_path``: fioconfig's rotation
    renames it ``client.<n>.pem``), by default ``<sota>/client.pem``. ``device_sota`` is
    the same sota dir as the device sees it, for absolute paths in ``sota.toml``."""
    sota = os.fspath(sota)
    text = _sota_toml(sota)
    named = sota_toml_facts(text)[0] if text is not None else None
    if named is None:
        return os.path.join(sota, "client.pem")
    return _device_to_host(sota, device_sota, named)


def is_registered(sota: StrPath, device_sota: str | None = None) -> bool:
    """docs/spec.md section 1: sql.db, or sota.toml with the client certificate it names or an HSM
    configuration ([p11]).

    Never while an install journal exists: then those files are an unfinished install.
    """
    sota = os.fspath(sota)
    if os.path.exists(os.path.join(sota, STATE_DIR, JOURNAL)):
        return False
    if os.path.exists(os.path.join(sota, "sql.db")):
        return True
    text = _sota_toml(sota)
    if text is None:
        return False
    named, p11 = sota_toml_facts(text)
    if p11:
        return True
    cert = os.path.join(sota, "client.pem") if named is None else \
        _device_to_host(sota, device_sota, named)
    return os.path.exists(cert)


def registered_uuid(sota: StrPath, device_sota: str | None = None) -> str | None:
    """The uuid (the CN of the client certificate ``sota.toml`` names) of an installed
    registration, when readable. In HSM mode that is ``client.pem``, which the tool writes
    beside the token's copy; a rotation keeps the subject, so the uuid stays right."""
    try:
        data = checked.read_file(client_cert(sota, device_sota))
        return None if data is None else der.common_name(data)
    except (OSError, ValueError):
        return None


def check_not_registered(sota: StrPath, device_path: str | None = None) -> None:
    """Raise ``AlreadyRegistered`` (exit 3) when the device is registered: docs/spec.md section 1.

    ``sota`` is the sota dir on this machine, ``device_path`` the same on the device."""
    if is_registered(sota, device_path):
        uuid = registered_uuid(sota, device_path)
        raise AlreadyRegistered(
            f"already registered ({os.fspath(sota)}"
            + (f", uuid {uuid}" if uuid else "")
            + "): nothing to do; --force registers again",
            uuid,
            device_path,
        )
