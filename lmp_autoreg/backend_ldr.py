"""The ``lmp-device-register`` backend (docs/spec.md section 5): the C++ tool makes the key and CSR,
sends the request and writes the files; the agent does everything around it.

The agent has already resolved the settings, passed the already-registered guard and
chosen the uuid. Here it:

- finds the tool: ``--lmp-device-register``/``LMP_DEVICE_REGISTER``, else ``PATH``, else
  ``/usr/bin/lmp-device-register`` (``ConfigError`` naming each place otherwise);
- runs it once (``attempt``) as ``lmp-device-register --start-daemon 0 --production <1|0>
  -T <token or na> -n <name> -u <uuid> -t <tag> -f <factory> -i <hwid> -d <sota>
  [-a <apps>] [-g <group>] -A <restorable apps> [-H <token header>] [--hsm-module M
  --hsm-pin P --hsm-so-pin S]`` with ``DEVICE_API`` and (only in production mode)
  ``PRODUCTION`` in its environment: a tool built with ``-DPRODUCTION`` defaults to
  production, so ``--production 0`` and no ``PRODUCTION`` are both needed for a
  development device. ``-A`` carries the same restorable apps the native request does.
  Registering by hand (``settings.oauth``, docs/spec.md section 9), there is no ``-T``:
  the agent has run the OAuth flow, and the tool takes the access token from its own
  flow against ``OAUTH_BASE``, which points at the agent's loopback hand-off (``handoff``).
  Otherwise the tool takes an API token and the PINs on its command line and nowhere
  else, so they are there; they are never logged: the command is shown with them redacted, and they
  are cut out of whatever the tool prints before it is shown;
- classifies a failure by the tool's stderr (it exits 255 for every failure), as docs/spec.md
  section 5's table: unreachable or unhealthy endpoint, ``HTTP_5xx``/``HTTP_429``,
  ``HTTP_-1`` -> ``NoAnswer`` (exit 5, retryable); ``HTTP_4xx`` -> ``ServerRefused`` (4),
  with the server's own words only; already registered -> ``AlreadyRegistered`` (3); a
  missing factory or tag, an invalid uuid, an HSM incorrectly configured ->
  ``ConfigError`` (2); sota dir not writable, update client running, and anything else
  it says -> ``LocalFailure`` (6): an unknown failure is most likely local (HSM, options,
  permissions), and retrying it blindly would not help;
- checks what it installed: ``sota.toml`` present and valid TOML, ``client.pem`` a
  certificate for this uuid, and, without an HSM, for the key in ``pkey.pem`` (with one,
  ``sota.toml`` must carry the ``[p11]`` section the tool appends); a failed check is a
  ``BadAnswer`` (exit 5). The tool runs with umask 077, so its ``pkey.pem`` is 0600 from
  the start; the public files it wrote are then made 0644.

Whenever the tool fails, times out or its files fail the check, everything it wrote in
the sota dir is undone (new files removed, changed files restored), so the device never
looks registered when it is not.
"""

import logging
import os
import re
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checked
from .errors import (
    AlreadyRegistered,
    AutoregError,
    BadAnswer,
    ConfigError,
    LocalFailure,
    NoAnswer,
    ServerRefused,
    Unreachable,
)
from .install import FILE_MODE, KEY_MODE, file_modes
from .retry import Deadline, retry
from .settings import DEFAULT_TOKEN_HEADER, Settings
from .util import child_environ, fsync_dir, run, write_atomic

if TYPE_CHECKING:
    from .result import Result

LOG = logging.getLogger(__name__)

TOOL = "lmp-device-register"
DEFAULT_PATH = "/usr/bin/lmp-device-register"
REDACTED = "<redacted>"
HANDOFF_SHOWN = "<the agent's loopback hand-off of the OAuth access token>"
NO_TOKEN = "na"  # what the shell script passes in production mode; "" would start OAuth
# Options whose value is a secret.
SECRET_OPTIONS = ("-T", "--hsm-pin", "--hsm-so-pin")
# How much of the tool's stderr goes into an error message, and of the server's words.
MESSAGE_LINES = 5
MESSAGE_LIMIT = 500

_HTTP_RE = re.compile(r"Unable to create device: HTTP_(-?\d+)")
_RAW = "Raw response was: "
# What the tool prints, by exit code (docs/spec.md section 5); the first that matches wins.
_NO_ANSWER = (
    "Unable to reach the device registration endpoint",
    "The device registration endpoint is not healthy",
    "Unable to post to",
)
_ALREADY = "Device already registered"
_CONFIG = ("Missing factory definition", "Missing tag definition", "Invalid UUID",
           "HSM incorrectly configured")


def find_binary(settings: Settings, environ: Mapping[str, str]) -> str:
    """The tool to run, or ``ConfigError`` naming every place looked in."""
    if settings.lmp_device_register:
        path = settings.lmp_device_register
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ConfigError(
                f"{path} (--lmp-device-register or LMP_DEVICE_REGISTER) is not an "
                "executable file"
            )
        return path
    found = shutil.which(TOOL, path=environ.get("PATH", os.defpath))
    if found:
        return found
    if os.path.isfile(DEFAULT_PATH) and os.access(DEFAULT_PATH, os.X_OK):
        return DEFAULT_PATH
    raise ConfigError(
        f"the lmp-device-register backend needs {TOOL}: looked in --lmp-device-register, "
        f"$LMP_DEVICE_REGISTER, PATH ({environ.get('PATH', '')}) and {DEFAULT_PATH}"
    )


def command(settings: Settings, binary: str, uuid: str) -> list[str]:
    """The tool's argv for this device: it carries the token and the PINs."""
    argv = [
        binary,
        "--start-daemon", "0",
        # Always: a tool built with -DPRODUCTION defaults to production.
        "--production", "1" if settings.production else "0",
    ]  # fmt: skip
    if not settings.oauth:  # without -T the tool takes its token from $OAUTH_BASE
        argv += ["-T", settings.token if settings.token is not None else NO_TOKEN]
    argv += [
        "-n", settings.name or uuid,
        "-u", uuid,
        "-t", settings.tag,
        "-f", settings.factory,
        "-i", settings.hardware_id,
        "-d", str(settings.paths.sota),
    ]  # fmt: skip
    if settings.apps:
        argv += ["-a", ",".join(settings.apps)]
    if settings.device_group:
        argv += ["-g", settings.device_group]
    argv += ["-A", settings.restorable_apps]  # always: the tool's own default is the same
    if settings.token_header != DEFAULT_TOKEN_HEADER:
        argv += ["-H", settings.token_header]
    if settings.hsm is not None:
        argv += ["--hsm-module", settings.hsm.module, "--hsm-pin", settings.hsm.pin,
                 "--hsm-so-pin", settings.hsm.so_pin]
    return argv


def redact(argv: list[str]) -> list[str]:
    """``argv`` with the values of the secret options replaced, for showing."""
    shown = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg in SECRET_OPTIONS:
            shown[i + 1] = REDACTED
    return shown


def environment(
    settings: Settings, environ: Mapping[str, str], oauth_base: str | None = None
) -> dict[str, str]:
    """The tool's environment: ours, with DEVICE_API, PRODUCTION only in production mode
    (the tool takes PRODUCTION set to anything as production), and, when the token comes
    from the OAuth device flow, OAUTH_BASE pointing at the agent's hand-off
    (``handoff.TokenHandOff``), so the token is never on the tool's command line."""
    add = {"DEVICE_API": settings.device_api}
    if oauth_base is not None:
        add["OAUTH_BASE"] = oauth_base
    if settings.production:
        add["PRODUCTION"] = "1"
    return child_environ(environ, drop=("PRODUCTION", "NOTIFY_SOCKET", "OAUTH_BASE"), add=add)


def _secrets(settings: Settings) -> list[str]:
    values = [settings.token] if settings.token else []
    if settings.hsm is not None:
        values += [settings.hsm.pin, settings.hsm.so_pin]
    return [v for v in values if v]


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every secret replaced, for showing."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def server_words(stderr: str) -> str:
    """What the server itself said in a failed answer, from the tool's stderr: the raw body
    of an answer that was not JSON, else the fields of a JSON one, without the tool's own
    parse messages."""
    lines = stderr.splitlines()
    said: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith(_RAW):
            said = [line[len(_RAW):]]
            for more in lines[i + 1:]:
                if _HTTP_RE.search(more):
                    break
                said.append(more)
            break
    else:
        for i, line in enumerate(lines):
            if _HTTP_RE.search(line):
                said = lines[i + 1:]
                break
    text = " / ".join(part.strip() for part in said if part.strip())
    return text[:MESSAGE_LIMIT] or "no message"


def classify(returncode: int, stderr: str) -> AutoregError:
    """The agent's error for a failed run of the tool, from what it printed on stderr
    (the table of docs/spec.md section 5)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = " / ".join(lines[-MESSAGE_LINES:]) or "nothing on stderr"
    message = f"{TOOL} failed (exit status {returncode}): {said}"
    http = _HTTP_RE.search(stderr)
    if http and int(http.group(1)) > 0:
        status = int(http.group(1))
        words = server_words(stderr)
        if 400 <= status < 500 and status != 429:
            return ServerRefused(f"{TOOL}: server refused the registration (HTTP {status}): "
                                 f"{words}", status)
        if status == 429 or status >= 500:
            return NoAnswer(f"{TOOL}: server busy or failing (HTTP {status}): {words}")
        return BadAnswer(f"{TOOL}: unexpected answer HTTP {status} (expected 201): {words}")
    for text in _NO_ANSWER:
        if text in stderr:
            if text == _NO_ANSWER[0]:
                return Unreachable(message)  # the network may be coming up: the fast retry
            return NoAnswer(message)
    if http:  # HTTP_-1 or HTTP_0: no answer, without the tool saying why
        return NoAnswer(message)
    if _ALREADY in stderr:
        return AlreadyRegistered(message)
    if any(text in stderr for text in _CONFIG):
        return ConfigError(message)
    # "Unable to write to <sota>", aktualizr-lite running, and what the tool does not
    # explain (HSM, PKCS#11 and file errors): most likely local, and not worth retrying.
    return LocalFailure(message)


def _snapshot(sota: Path) -> dict[str, tuple[bytes, int]]:
    """The top-level regular files of the sota dir: name -> (content, mode)."""
    files = {}
    try:
        entries = list(os.scandir(sota))
    except FileNotFoundError:
        return {}
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            path = Path(entry.path)
            files[entry.name] = (path.read_bytes(), stat.S_IMODE(entry.stat().st_mode))
    return files


def _changed(sota: Path, before: dict[str, tuple[bytes, int]]) -> list[str]:
    """Names of the top-level files that are new or different since ``before``."""
    after = _snapshot(sota)
    return sorted(n for n, (data, _) in after.items() if n not in before or before[n][0] != data)


def _undo(sota: Path, before: dict[str, tuple[bytes, int]]) -> None:
    """Put the sota dir's top-level files back as ``before`` had them; best effort, logged."""
    changed = _changed(sota, before)
    for name in changed:
        path = sota / name
        try:
            if name in before:
                data, mode = before[name]
                write_atomic(path, data, mode)
            else:
                path.unlink()
        except OSError as e:
            LOG.error("could not undo %s: %s", path, e.strerror or e)
    if changed:
        LOG.warning("undid what %s wrote: %s", TOOL, ", ".join(changed))
        try:
            fsync_dir(sota)
        except OSError as e:
            LOG.error("could not sync %s: %s", sota, e.strerror or e)


def attempt(
    settings: Settings, binary: str, uuid: str, *, timeout: float, environ: Mapping[str, str],
    oauth_base: str | None = None,
) -> list[str]:
    """Run the tool once and check what it installed; return the names it wrote.

    Raises ``NoAnswer`` (worth retrying), ``ServerRefused``, ``AlreadyRegistered``,
    ``BadAnswer`` or ``LocalFailure``; after any of them the sota dir is as it was.
    """
    sota = settings.paths.sota
    argv = command(settings, binary, uuid)
    secrets = _secrets(settings)
    try:
        sota.mkdir(parents=True, exist_ok=True)
        before = _snapshot(sota)
    except OSError as e:
        raise LocalFailure(f"cannot read {sota}: {e.strerror or e}") from e
    LOG.debug("running %s", " ".join(redact(argv)))
    try:
        try:
            # umask 077: the key the tool writes is never readable by others, not even for
            # a moment; the public files are opened up to 0644 below.
            done = run(argv, timeout=timeout, env=environment(settings, environ, oauth_base),
                       umask=0o077)
        except TimeoutError as e:
            raise NoAnswer(f"{TOOL} did not finish within {timeout:.1f} s") from e
        except OSError as e:
            raise ConfigError(f"cannot run {binary}: {e.strerror or e}") from e
        for line in scrub(done.stdout, secrets).splitlines():
            LOG.debug("%s: %s", TOOL, line)
        if done.returncode != 0:
            raise classify(done.returncode, scrub(done.stderr, secrets))
        written = _changed(sota, before)
        check_installed(sota, uuid=uuid, hsm=settings.hsm is not None)
        for name in written:
            path = sota / name
            try:
                os.chmod(path, KEY_MODE if name == "pkey.pem" else FILE_MODE)
            except OSError as e:
                raise LocalFailure(f"cannot set the mode of {path}: {e.strerror or e}") from e
    except BaseException:
        _undo(sota, before)
        raise
    return written


def check_installed(sota: Path, *, uuid: str, hsm: bool) -> None:
    """Check the files the tool left in ``sota``; ``BadAnswer`` when they are not usable."""
    from . import identity

    def read(name: str) -> bytes:
        try:
            return (sota / name).read_bytes()
        except OSError as e:
            raise BadAnswer(f"{TOOL} succeeded but left no usable {name}: "
                            f"{e.strerror or e}") from e

    toml = checked.toml_document(read("sota.toml").decode("utf-8", "replace"),
                                 f"the sota.toml {TOOL} left")
    if hsm and "p11" not in toml:
        raise BadAnswer(f"{TOOL} left a sota.toml without the [p11] section of the HSM")
    public_key = None  # HSM: the key is on the token
    if not hsm:
        try:
            public_key = identity.key_from_pem(read("pkey.pem")).public_key()
        except ValueError as e:
            raise BadAnswer(f"{TOOL} left a pkey.pem that is not an EC private key: {e}") from e
    identity.check_client_certificate(read("client.pem"), uuid=uuid, public_key=public_key,
                                      where=f"{TOOL} succeeded, but client.pem")


def dry_run_request(
    settings: Settings, uuid: str, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What ``--dry-run`` shows for this backend: the command (redacted) and environment."""
    binary = find_binary(settings, os.environ if environ is None else environ)
    return {
        "command": redact(command(settings, binary, uuid)),
        "environment": environment(settings, {}, HANDOFF_SHOWN if settings.oauth else None),
    }


def register(
    settings: Settings,
    result: "Result",
    *,
    deadline: Deadline,
    environ: Mapping[str, str] | None = None,
    oauth_base: str | None = None,
) -> "Result":
    """The backend's part of ``register.register``: run the tool until it succeeds or the
    deadline passes (retrying what ``classify`` calls ``NoAnswer``), then fill ``result``
    like the native backend. The caller holds the lock and has chosen the uuid."""
    from . import identity

    environ = os.environ if environ is None else environ
    uuid = result.uuid
    assert uuid is not None
    binary = find_binary(settings, environ)
    if settings.cacert:
        LOG.warning("--cacert is not passed to %s: it uses the system's CA certificates", TOOL)
    what = f"running {TOOL} for {uuid} with factory {settings.factory}"
    LOG.info("%s", what)
    written = retry(
        lambda budget: attempt(settings, binary, uuid, timeout=budget, environ=environ,
                               oauth_base=oauth_base),
        deadline,
        what=what,
    )
    sota = settings.paths.sota
    result.files = file_modes(sota, written)
    result.certificate = identity.summary(
        identity.load_certificate((sota / "client.pem").read_bytes())
    )
    result.result = "registered"
    LOG.info("registered: %s installed %s into %s", TOOL, ", ".join(written), sota)
    return result
