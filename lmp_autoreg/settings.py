"""Where every setting comes from (docs/spec.md section 3).

For each setting the first place that has it wins: the command line, then the
environment, then ``/etc/default/lmp-device-auto-register``, then the device's own files,
then the default. ``resolve`` is pure apart from reading those files; it raises
one ``ConfigError`` naming every setting that is missing or invalid, each with every
place it looked. Every value passes ``checked`` where it is taken (``_Sources.first``, and
the few read elsewhere): text that is not UTF-8 or holds a control character, a path the
kernel cannot take, a token or header name HTTP cannot carry, a device file that is not a
regular file, are refused there, naming the place.
"""

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

from . import BACKENDS, FIOCONFIG_MODES, checked
from .errors import ConfigError
from .guard import locate, read_env_file
from .paths import DEFAULTS_FILE, HSM_CONFIG, OS_RELEASE, SOTA_TAG, TOKEN_FILE, DevicePaths
from .preflight import check_token_transport, is_loopback

DEFAULT_DEVICE_API = "https://api.foundries.io/ota/devices/"
DEFAULT_TOKEN_HEADER = "OSF-TOKEN"
DEFAULT_START = ("aktualizr-lite", "fioconfig")
# lmp-device-register's -A default: restorable apps on, for every app (docs/spec.md section 2).
ALL_RESTORABLE = " "
DEFAULT_TIMEOUT = 300.0
# Where ``--token-file -`` takes the token from (a message names it so, never the token).
STDIN = "standard input (--token-file -)"
DEFAULT_OAUTH_URL = "https://app.foundries.io/oauth"  # what lmp-device-register defaults to
T = TypeVar("T")
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def redacted_repr(record: tuple, secrets: tuple[str, ...]) -> str:
    """``repr`` of a NamedTuple with the values of the fields ``secrets`` hidden."""
    shown = ", ".join(
        f"{name}=<redacted>" if name in secrets and value is not None else f"{name}={value!r}"
        for name, value in zip(record._fields, record, strict=True)  # type: ignore[attr-defined]
    )
    return f"{type(record).__name__}({shown})"


# The records below are NamedTuples, not dataclasses: ``dataclasses`` (with the ``inspect``
# and ``ast`` it imports) costs about 1 MiB, which a run that never touches a key (a refused
# setting, say) does without (docs/performance.md).
class Hsm(NamedTuple):
    """A PKCS#11 module holding the device key; the PINs are secrets."""

    module: str
    pin: str
    so_pin: str

    def __repr__(self) -> str:
        return redacted_repr(self, ("pin", "so_pin"))


class Settings(NamedTuple):
    """Every setting of a registration, resolved (docs/spec.md section 3).

    ``repr`` hides the token.
    """

    paths: DevicePaths
    device_api: str
    production: bool
    factory: str
    tag: str
    hardware_id: str
    name: str | None  # None: the uuid
    uuid: str | None  # None: a pending identity, else a random one
    apps: tuple[str, ...] | None  # None: all apps (the override is left out)
    device_group: str | None
    token: str | None
    token_place: str | None  # where the token came from, for messages (never the token)
    token_header: str = DEFAULT_TOKEN_HEADER
    hsm: Hsm | None = None
    restorable_apps: str = ALL_RESTORABLE  # "": off; " ": on, all apps; else "a,b"
    backend: str = "native"
    lmp_device_register: str | None = None
    fioconfig: str = "auto"
    fioconfig_bin: str | None = None
    start: tuple[str, ...] = DEFAULT_START
    poweroff: bool = False
    timeout: float = DEFAULT_TIMEOUT
    cacert: str | None = None
    allow_insecure_token: bool = False
    # No token, not production: register by hand through the OAuth device flow (oauth.py).
    oauth: bool = False
    oauth_url: str = DEFAULT_OAUTH_URL
    timeout_given: bool = False  # --timeout or REGISTRATION_TIMEOUT set, not the default

    def __repr__(self) -> str:
        return redacted_repr(self, ("token",))


def _first_line(path: Path) -> str | None:
    """The first line of a device file, stripped; None when missing or empty. Anything but
    a regular file is refused without blocking (``checked.read_file``)."""
    try:
        data = checked.read_file(path)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    if data is None:
        return None
    lines = checked.decode(data).splitlines()
    return (lines[0].strip() if lines else "") or None


def list_apps(compose_apps: Path) -> tuple[str, ...]:
    """The sorted names of the sub-directories of ``compose_apps`` (hidden ones skipped),
    each a ``checked.app_name``. ``ConfigError`` when the directory cannot be read."""
    try:
        entries = list(os.scandir(compose_apps))
    except (FileNotFoundError, NotADirectoryError):
        return ()
    except OSError as e:
        raise ConfigError(f"apps: cannot read {compose_apps}: {e.strerror or e}") from e
    names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    return tuple(checked.app_name(name, f"an app directory in {compose_apps}") for name in names)


class _Sources:
    """The ordered places a setting can come from, and the trail of where we looked."""

    def __init__(self, cli: Mapping[str, Any], environ: Mapping[str, str], paths: DevicePaths):
        self.cli = cli
        self.environ = environ
        self.defaults = read_env_file(paths.defaults_file)

    def first(
        self,
        flag: str | None,
        env: str | None,
        files: tuple[tuple[str, Callable[[], str | None]], ...] = (),
        *,
        empty_ok: bool = False,
    ) -> tuple[str | None, str, list[str]]:
        """Return (value, place, places looked). Empty strings count as unset unless empty_ok."""
        looked: list[str] = []
        candidates: list[tuple[str, Callable[[], str | None]]] = []
        if flag:
            dest = flag.lstrip("-").replace("-", "_")
            candidates.append((flag, lambda: self.cli.get(dest)))
        if env:
            candidates.append((f"${env}", lambda: self.environ.get(env)))
            candidates.append((f"{env} in {DEFAULTS_FILE}", lambda: self.defaults.get(env)))
        candidates.extend(files)
        for place, get in candidates:
            looked.append(place)
            value = get()
            if value is not None and (empty_ok or value != ""):
                return checked.setting(str(value), place), place, looked
        return None, "", looked

    def machine_path(self, value: str, place: str, paths: DevicePaths) -> Path:
        """A path setting as a path on this machine. The command line and the environment
        are typed for this machine; the default file belongs to the device, so a path in
        it is a device path, resolved under the sysroot (docs/spec.md section 3)."""
        checked.path(value, place)
        if place.endswith(f" in {DEFAULTS_FILE}"):
            return paths.host(value)
        return Path(value)

    def require(self, what: str, flag: str | None, env: str | None, files=()) -> tuple[str, str]:
        value, place, looked = self.first(flag, env, files)
        if value is None:
            raise ConfigError(f"{what} is not set: looked in {', '.join(looked)}")
        return value, place


def _invalid(what: str, place: str, why: str) -> ConfigError:
    return ConfigError(f"{what} from {place} is invalid: {why}")


def resolve_paths(cli: Mapping[str, Any], environ: Mapping[str, str]) -> DevicePaths:
    """The sysroot and the sota dir: enough for ``status`` and the already-registered guard."""
    sysroot, sota_dir = locate(cli, environ)
    return DevicePaths(Path(sysroot), PurePosixPath(sota_dir))


class _Problems:
    """The ConfigErrors of one ``resolve``, gathered so that one run names them all."""

    def __init__(self) -> None:
        self.found: list[ConfigError] = []

    def check(self, get: Callable[[], T], default: T) -> T:
        """``get()``, or (it raised ConfigError) ``default``, the error kept."""
        try:
            return get()
        except ConfigError as e:
            self.found.append(e)
            return default

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise ConfigError(f"{len(self.found)} settings are missing or invalid: "
                              + "; ".join(str(e) for e in self.found))


def resolve(
    cli: Mapping[str, Any], environ: Mapping[str, str], *, terminal: bool = False
) -> Settings:
    """Resolve every setting of docs/spec.md section 3 for a ``register`` run.

    ``cli`` maps argparse destinations (``factory``, ``token_file``, ...) to values, None
    meaning "not given"; ``environ`` is the process environment. ``terminal``: a person
    may be at stdin and stderr, so a development device without a token registers by hand
    through OAuth (docs/spec.md section 9), as it does with ``--oauth``. Every setting that is
    missing or invalid is named in one ``ConfigError`` (after the sysroot and the sota dir,
    which the others are read under: those fail alone).
    """
    paths = resolve_paths(cli, environ)
    src = _Sources(cli, environ, paths)
    os_release = read_env_file(paths.os_release)
    problems = _Problems()
    check = problems.check

    def from_os_release(key: str) -> tuple[str, Callable[[], str | None]]:
        return (f"{key} in {OS_RELEASE}", lambda: os_release.get(key))

    device_api = check(lambda: _device_api(src), None)
    production = _production(cli, src)
    factory = check(lambda: _factory(src, from_os_release("LMP_FACTORY")), "")
    tag = check(lambda: src.require("tag", "--tag", None, (
        (str(SOTA_TAG), lambda: _first_line(paths.sota_tag)),
        from_os_release("LMP_FACTORY_TAG"),
    ))[0], "")
    hardware_id = check(lambda: src.require(
        "hardware id", "--hwid", "HARDWARE_ID", (from_os_release("LMP_MACHINE"),)
    )[0], "")
    name = check(lambda: _name(cli, src, paths), None)
    uuid = check(lambda: _uuid(cli), None)

    apps = check(lambda: _apps(src, paths), None)

    device_group, _, _ = src.first("--device-group", "DEVICE_GROUP")
    no_token: tuple[str | None, str | None] = (None, None)
    by_hand = bool(cli.get("oauth"))
    if by_hand:
        check(lambda: _oauth_alone(cli, production), None)
        token, token_place = no_token
    else:
        token, token_place = check(
            lambda: _token(cli, src, paths, production, by_hand=terminal), no_token)
    piped = token_place == STDIN
    oauth = not production and token is None and not piped and (by_hand or terminal)
    allow_insecure = bool(cli.get("allow_insecure_token"))
    if device_api is not None:
        check(lambda: check_token_transport(device_api,
                                            has_token=token is not None or piped or oauth,
                                            allow_insecure=allow_insecure),
              None)
    oauth_url = check(lambda: _oauth_url(src, oauth=oauth, allow_insecure=allow_insecure),
                      DEFAULT_OAUTH_URL)
    token_header = check(lambda: _token_header(src), DEFAULT_TOKEN_HEADER)
    backend = check(lambda: _backend(src, paths), "native")
    fioconfig = check(lambda: _fioconfig(src), "auto")
    hsm = check(lambda: _hsm(cli, paths), None)
    timeout = check(lambda: _timeout(src), DEFAULT_TIMEOUT)
    cacert = check(lambda: _cacert(src, paths), None)
    lmp_device_register = check(lambda: _binary(src, "--lmp-device-register",
                                                "LMP_DEVICE_REGISTER"), None)
    fioconfig_bin = check(lambda: _binary(src, "--fioconfig-bin", "FIOCONFIG_BIN"), None)
    problems.raise_any()
    assert device_api is not None  # else raise_any raised
    if piped:
        token = token_from_stdin(backend, timeout)

    return Settings(
        paths=paths,
        device_api=device_api,
        production=production,
        factory=factory,
        tag=tag,
        hardware_id=hardware_id,
        name=name,
        uuid=uuid,
        apps=apps,
        device_group=device_group,
        token=token,
        token_place=token_place,
        token_header=token_header,
        hsm=hsm,
        restorable_apps=_restorable_apps(src),
        backend=backend,
        lmp_device_register=lmp_device_register,
        fioconfig=fioconfig,
        fioconfig_bin=fioconfig_bin,
        start=_start(cli, src),
        poweroff=_poweroff(cli, src),
        timeout=timeout,
        cacert=cacert,
        allow_insecure_token=allow_insecure,
        oauth=oauth,
        oauth_url=oauth_url,
        timeout_given=src.first("--timeout", "REGISTRATION_TIMEOUT")[0] is not None,
    )


def _device_api(src: _Sources) -> str:
    device_api, place, _ = src.first("--device-api", "DEVICE_API")
    device_api = device_api or DEFAULT_DEVICE_API
    if not re.match(r"https?://[^/\s]+", device_api):
        raise _invalid("registration URL", place, f"{device_api!r} is not an http(s) URL")
    return device_api


def _factory(src: _Sources, os_release: tuple[str, Callable[[], str | None]]) -> str:
    factory, place = src.require("factory", "--factory", "DEVICE_FACTORY", (os_release,))
    if factory == "lmp":
        raise _invalid("factory", place, "'lmp' is the placeholder of an unconfigured build")
    return factory


def _uuid(cli: Mapping[str, Any]) -> str | None:
    uuid = cli.get("uuid")
    if uuid is None:
        return None
    if not UUID_RE.fullmatch(uuid):
        raise _invalid("uuid", "--uuid", f"{uuid!r} is not of the form 8-4-4-4-12 hex digits")
    return str(uuid).lower()


def _backend(src: _Sources, paths: DevicePaths) -> str:
    backend, place, _ = src.first("--backend", "BACKEND")
    backend = backend or "native"
    if backend not in BACKENDS:
        raise _invalid("backend", place, f"{backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "lmp-device-register" and not paths.is_live:
        raise ConfigError(
            "the lmp-device-register backend cannot register a mounted image "
            f"(--sysroot {paths.sysroot}): use --backend native"
        )
    return backend


def _fioconfig(src: _Sources) -> str:
    fioconfig, place, _ = src.first("--fioconfig", "FIOCONFIG")
    fioconfig = fioconfig or "auto"
    if fioconfig not in FIOCONFIG_MODES:
        raise _invalid("fioconfig", place, f"{fioconfig!r} is not one of auto, on, off")
    return fioconfig


def _production(cli: Mapping[str, Any], src: _Sources) -> bool:
    if cli.get("production") is not None:
        return bool(cli["production"])
    # PRODUCTION set to anything, even empty, means production (as the shell script has it).
    return src.first(None, "PRODUCTION", empty_ok=True)[0] is not None


def _restorable_apps(src: _Sources) -> str:
    """What lmp-device-register's ``-A`` means (docs/spec.md sections 2 and 3): on by default with
    every app (one space), off when given empty, else the names given."""
    value, _, _ = src.first("--restorable-apps", "RESTORABLE_APPS", empty_ok=True)
    if value is None:
        return ALL_RESTORABLE
    if value == "":
        return ""
    return ",".join(a.strip() for a in value.split(",") if a.strip()) or ALL_RESTORABLE


def _apps(src: _Sources, paths: DevicePaths) -> tuple[str, ...] | None:
    value, _, _ = src.first("--apps", "APPS")
    # A list with no names in it (",", " ") counts as not given, like an empty value: both
    # backends then mean the same thing, the apps found on the device, else all apps.
    given = tuple(a.strip() for a in (value or "").split(",") if a.strip())
    return given or list_apps(paths.compose_apps) or None


def _token_header(src: _Sources) -> str:
    value, place, _ = src.first("--api-token-header", "TOKEN_HEADER")
    return DEFAULT_TOKEN_HEADER if value is None else checked.header_name(value, place)


def _binary(src: _Sources, flag: str, env: str) -> str | None:
    value, place, _ = src.first(flag, env)
    return None if value is None else checked.path(value, place)


def _name(cli: Mapping[str, Any], src: _Sources, paths: DevicePaths) -> str | None:
    if cli.get("name"):
        return checked.setting(str(cli["name"]), "--name")
    use_hostname, place, _ = src.first(None, "USE_HOSTNAME")
    if use_hostname is None:
        return None
    hostname = _first_line(paths.hostname)
    if hostname is None:
        raise ConfigError(f"USE_HOSTNAME is set ({place}) but {paths.hostname} is missing or empty")
    return checked.setting(hostname, str(paths.hostname))


def _token(
    cli: Mapping[str, Any], src: _Sources, paths: DevicePaths, production: bool, *,
    by_hand: bool = False,
) -> tuple[str | None, str | None]:
    explicit, place, looked = src.first("--token-file", "TOKEN_FILE")
    if explicit == "-" and place == "--token-file":
        return None, STDIN  # read once every other setting is good (token_from_stdin)
    if explicit is not None:
        path = src.machine_path(explicit, place, paths)
        token = _first_line(path)
        if token is None:
            raise ConfigError(f"API token file {path} (from {place}) is missing or empty")
        return checked.token(token, f"{path} (from {place})"), str(path)
    token = _first_line(paths.token_file)
    if token is not None:
        return checked.token(token, str(paths.token_file)), str(paths.token_file)
    if production or by_hand:
        return None, None
    looked.append(str(paths.token_file))
    raise ConfigError(
        f"API token is not set: looked in {', '.join(looked)} "
        "(only production registrations go without one): put the factory's token in "
        f"{TOKEN_FILE} (or pass --token-file), or register by hand with "
        "--oauth (a person approves the device in a browser)"
    )


def token_from_stdin(backend: str, timeout: float, fd: int = 0) -> str:
    """``--token-file -``: the first line of standard input, read bounded and within the
    deadline, never from a terminal (where it would be echoed as typed)."""
    if backend == "lmp-device-register":
        raise ConfigError("--token-file - keeps the token off every command line, but the "
                          "lmp-device-register backend takes a token only on its command "
                          "line (-T): use the native backend, or a token file")
    if os.isatty(fd):
        raise ConfigError("--token-file -: standard input is a terminal, which would echo "
                          "the token as it is typed: pipe it in instead "
                          "(lmp-device-auto-register --token-file - < token)")
    try:
        line = checked.read_line(fd, checked.MAX_DEVICE_FILE, timeout)
    except OSError as e:
        raise ConfigError(f"cannot read the API token from {STDIN}: {e.strerror or e}") from e
    lines = checked.decode(line).splitlines()
    token = (lines[0].strip() if lines else "") or None
    if token is None:
        raise ConfigError(f"the API token from {STDIN} is missing or empty")
    return checked.token(token, STDIN)


def _oauth_alone(cli: Mapping[str, Any], production: bool) -> None:
    """``--oauth`` is the token's way in: not with a token file, nor in production."""
    if production:
        raise ConfigError("--oauth registers a development device by hand: a production "
                          "registration goes without a token and without OAuth")
    if cli.get("token_file"):
        raise ConfigError("--oauth and --token-file are two ways to authorize the "
                          "registration: give one")


def _oauth_url(src: _Sources, *, oauth: bool, allow_insecure: bool) -> str:
    """The OAuth endpoints' base URL (``OAUTH_BASE``, as lmp-device-register reads it)."""
    url, place, _ = src.first("--oauth-url", "OAUTH_BASE")
    url = url or DEFAULT_OAUTH_URL
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
        raise _invalid("OAuth URL", place, f"{url!r} is not an http(s) URL")
    parts = urlsplit(url)
    if oauth and parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        if not allow_insecure:
            raise ConfigError(
                f"refusing to run the OAuth device flow over plain http to {parts.hostname} "
                "(its device code and access token would travel in clear): use https, or "
                "--allow-insecure-token")
    return url.rstrip("/")


def _hsm(cli: Mapping[str, Any], paths: DevicePaths) -> Hsm | None:
    conf = read_env_file(paths.hsm_config)

    def value(flag: str, key: str, check: Callable[[str, str], str]) -> str | None:
        given = cli.get(flag.lstrip("-").replace("-", "_"))
        if given:
            return check(str(given), flag)
        found = conf.get(key)
        return check(found, f"{key} in {HSM_CONFIG}") if found else None

    values = {
        "module": value("--hsm-module", "HSM_MODULE", checked.path),
        "pin": value("--hsm-pin", "HSM_PIN", checked.secret),
        "so_pin": value("--hsm-so-pin", "HSM_SOPIN", checked.secret),
    }
    if not any(values.values()):
        return None
    missing = [k for k, v in values.items() if v is None]
    if missing:
        names = {"module": "--hsm-module/HSM_MODULE", "pin": "--hsm-pin/HSM_PIN",
                 "so_pin": "--hsm-so-pin/HSM_SOPIN"}
        raise ConfigError(
            "partial HSM setting: "
            + ", ".join(names[k] for k in missing)
            + f" not set (looked on the command line and in {HSM_CONFIG}); "
            "refusing to fall back to a key on disk"
        )
    return Hsm(values["module"], values["pin"], values["so_pin"])  # type: ignore[arg-type]


def _poweroff(cli: Mapping[str, Any], src: _Sources) -> bool:
    if cli.get("poweroff") is not None:  # --poweroff / --no-poweroff
        return bool(cli["poweroff"])
    return src.first(None, "POWEROFF")[0] is not None  # non-empty: on


def _start(cli: Mapping[str, Any], src: _Sources) -> tuple[str, ...]:
    if cli.get("no_start"):
        return ()
    value, _, _ = src.first("--start", "START_SERVICES", empty_ok=True)
    if value is None:
        return DEFAULT_START
    return tuple(s.strip() for s in value.split(",") if s.strip())


def _timeout(src: _Sources) -> float:
    value, place, _ = src.first("--timeout", "REGISTRATION_TIMEOUT")
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise _invalid("timeout", place, f"{value!r} is not a positive number of seconds")
    return timeout


def _cacert(src: _Sources, paths: DevicePaths) -> str | None:
    value, place, _ = src.first("--cacert", "CACERT")
    if value is None:
        return None
    path = src.machine_path(value, place, paths)
    if not path.is_file():
        raise _invalid("CA bundle", place, f"{path} is not a readable file")
    return str(path)
