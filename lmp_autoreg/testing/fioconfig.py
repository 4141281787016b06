"""A stand-in for ``fioconfig check-in``, doing what the real one does with a file key.

Checked against the real fioconfig (foundriesio/fioconfig 638424812372, the commit
meta-lmp builds) and the kit's device gateway. Like it, it reads ``sota.toml`` from its
config search path (``--config``/``-c``, else ``SOTA_DIR`` as a comma-separated list, else
``/usr/lib/sota/conf.d``, ``/var/sota/sota.toml``, ``/etc/sota/conf.d/``; files ranked by
name, the last alphabetically first), GETs ``<tls.server>/config`` (``CONFIG_URL``
overrides it) over mTLS with the device's certificate and ``If-Modified-Since`` from the
mtime of ``<storage.path>/config.encrypted``; on a 200 it decrypts each value (ECIES with
the device's key), refuses to go on when the secrets dir (``--secrets-dir``/``-s``,
``SECRETS_DIR``, default ``/var/run/secrets``) is missing, writes each changed file 0640
into it, runs its on-change handler (only under the handlers dir unless
``--unsafe-handlers``/``UNSAFE_CALLBACKS``; a handler's 123 stops it with 123), removes
the files a previous configuration had and this one lacks, and stores the raw answer in
``config.encrypted`` dated by the answer's ``Date``. 204 and 304 are success. A network
error or a 5xx is retried after 1, 2, 5, 13 and 30 s, then it exits 1; other statuses
exit 1 at once. Its log lines look like the real one's (``2006/01/02 15:04:05 LEVEL
message``).

With ``tls.pkey_source = "pkcs11"`` it uses the key and certificate on a PKCS#11 token,
as the real one does through crypto11: ``[p11]`` names them (:mod:`.p11`, python-pkcs11),
the TLS client authentication has the token sign (:mod:`.p11tls`, tlslite-ng), and the
ECDH of each value's ECIES is the token's ``CKM_ECDH1_DERIVE``. The real one, built with
crypto11 and run by hand on a SoftHSM2 token the agent registered, decrypted the kit
gateway's configuration and ended as this one does where ``[p11]`` names what the token
lacks. That mode needs the kit's ``test`` extra (python-pkcs11, tlslite-ng); a file key
needs neither.

Not imitated: the ``PATCH`` of a ``vpn`` build (it needs wireguard's ``wg``; without it the
real one sends none either).
"""

from __future__ import annotations

import base64
import email.utils
import functools
import http.client
import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lmp_autoreg.testing.ecies import DecryptionError, decrypt_with

DEFAULT_CONFIG = ("/usr/lib/sota/conf.d", "/var/sota/sota.toml", "/etc/sota/conf.d/")
DEFAULT_SECRETS = "/var/run/secrets"
HANDLERS_DIR = "/usr/share/fioconfig/handlers/"
DEFAULT_GATEWAY = "https://ota-lite.foundries.io:8443"
RETRY_DELAYS = (1.0, 2.0, 5.0, 13.0, 30.0)
HANDLER_FORCE_EXIT = 123


class Fatal(Exception):
    """fioconfig's ``Fatal``: log the message and exit with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def log(level: str, message: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y/%m/%d %H:%M:%S')} {level} {message}\n")


class Config:
    """The merged sota.toml files of a search path, as fioconfig's ``sotatoml`` reads them."""

    def __init__(self, search_path: Sequence[str], *, root: str = "/") -> None:
        self.search_path = list(search_path)
        self.root = root
        found: dict[str, str] = {}
        for path in search_path:
            if os.path.isdir(path):
                for name in os.listdir(path):
                    if name.endswith(".toml"):
                        found[name] = os.path.join(path, name)
            elif os.path.exists(path):
                found[os.path.basename(path)] = path
        self.trees: list[dict[str, Any]] = []
        for name in sorted(found, reverse=True):
            try:
                with open(found[name], "rb") as handle:
                    self.trees.append(tomllib.load(handle))
            except tomllib.TOMLDecodeError as error:
                raise Fatal(f"unable to parse sota.toml: failed to load {found[name]}; "
                            f"err: {error}") from error

    def path(self, key: str) -> str:
        """A path setting, under ``root`` (for a device tree that is not this machine's)."""
        value = self.get(key)
        return os.path.join(self.root, value.lstrip("/")) if value else ""

    def get(self, key: str, default: str = "") -> str:
        section, _, name = key.partition(".")
        for tree in self.trees:
            value = tree.get(section, {}).get(name, "")
            if isinstance(value, str) and value:
                return value
        return default


def _safe_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, path)


class CheckIn:
    """One ``fioconfig check-in``."""

    #: The x coordinate of the ECDH shared point of the device's key with a sender's point.
    shared_x: Callable[[ec.EllipticCurvePublicKey], bytes]
    #: An ``http.client`` connection to the gateway, authenticated by the device's key.
    connect: Callable[..., http.client.HTTPConnection]

    def __init__(
        self,
        config: Config,
        secrets: str,
        *,
        unsafe_handlers: bool = False,
        handlers_dir: str = HANDLERS_DIR,
        retry_delays: Sequence[float] = RETRY_DELAYS,
    ) -> None:
        self.config = config
        self.secrets = secrets
        self.unsafe_handlers = unsafe_handlers
        self.handlers_dir = handlers_dir
        self.retry_delays = retry_delays
        if config.get("tls.ca_source") != "file":
            raise Fatal(f'Unable to create TLS config error="invalid tls.ca_source: '
                        f'{config.get("tls.ca_source")}"')
        source = config.get("tls.pkey_source")
        if source not in ("file", "pkcs11"):
            raise Fatal(f'Unable to create TLS config error="invalid tls.pkey_source: {source}"')
        self.storage = config.path("storage.path")
        if not self.storage:
            raise Fatal("Missing required config key: storage.path")
        self.cafile = config.path("import.tls_cacert_path")
        if source == "pkcs11":
            self._token_key()
        else:
            self._file_key()
        self.url = os.environ.get("CONFIG_URL") or (
            config.get("tls.server", DEFAULT_GATEWAY) + "/config")
        self.encrypted = os.path.join(self.storage, "config.encrypted")

    def _file_key(self) -> None:
        key_file = self.config.path("import.tls_pkey_path")
        context = ssl.create_default_context(cafile=self.cafile)
        context.load_cert_chain(self.config.path("import.tls_clientcert_path"), key_file)
        with open(key_file, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise Fatal("Unsupported private key")
        self.shared_x = functools.partial(key.exchange, ec.ECDH())
        self.connect = functools.partial(http.client.HTTPSConnection, context=context)

    def _token_key(self) -> None:
        from lmp_autoreg.testing import p11, p11tls  # python-pkcs11 and tlslite-ng

        try:
            key = p11.TokenKey(p11.P11.from_config(self.config.get))
        except p11.TokenError as error:
            if error.panics:
                raise Fatal(f"panic: {error}", 2) from error
            raise Fatal(f'Unable to create TLS config error="{error}"') from error
        self.shared_x = key.shared_x
        self.connect = functools.partial(p11tls.connection, key, self.cafile)

    def run(self) -> dict[str, str]:
        """Check in; return the files written (name -> content). Raises ``Fatal``."""
        headers = {"User-Agent": "fioconfig-client/3", "Content-Type": "application/json"}
        previous: dict[str, Any] = {}
        try:
            with open(self.encrypted, "rb") as handle:
                previous = json.load(handle)
            stamp = time.gmtime(os.stat(self.encrypted).st_mtime)
            headers["If-Modified-Since"] = time.strftime("%a, %d %b %Y %H:%M:%S UTC", stamp)
        except (OSError, ValueError):
            pass
        log("INFO", "Checking in with server ...")
        status, body, date = self._get(headers)
        if status in (204, 304):
            log("INFO", "Device has no config defined on server" if status == 204
                else "Config on server has not changed")
            return {}
        if status != 200:
            raise Fatal(f"Unable to get {self.url} - HTTP_{status}: "
                        f"{body.decode(errors='replace')}")
        try:
            config = json.loads(body)
        except ValueError as error:
            raise Fatal(f"Unable to parse encrypted json: {error}") from error
        files = {name: self._value(name, item) for name, item in config.items()}
        try:
            mode = os.stat(self.secrets).st_mode & 0o7777
        except OSError as error:
            raise Fatal(f"stat {self.secrets}: {(error.strerror or '').lower()}") from error
        for name, value in files.items():
            log("INFO", f"Extracting file file={name}")
            path = os.path.join(self.secrets, name)
            os.makedirs(os.path.dirname(path), mode, exist_ok=True)
            try:
                with open(path, "rb") as handle:
                    changed = handle.read() != value.encode()
            except OSError:
                changed = True
            if changed:
                _safe_write(path, value.encode())
                self._on_changed(name, path, config[name].get("OnChanged") or [])
        for name, item in previous.items():
            if name not in files:
                path = os.path.join(self.secrets, name)
                if os.path.exists(path):
                    os.unlink(path)
                self._on_changed(name, path, item.get("OnChanged") or [])
        _safe_write(self.encrypted, body)
        try:
            when = email.utils.parsedate_to_datetime(date or "").timestamp()
        except (TypeError, ValueError):
            when = time.time()
        os.utime(self.encrypted, (when, when))
        return files

    def _get(self, headers: dict[str, str]) -> tuple[int, bytes, str | None]:
        parts = urllib.parse.urlsplit(self.url)
        status, error = 0, ""
        for delay in (0.0, *self.retry_delays):
            if delay:
                log("WARN", f'HTTP request failed, retrying url={self.url} delay={delay} '
                    f'status={status} error="{error}"')
                time.sleep(delay)
            try:
                conn = self.connect(parts.hostname or "", parts.port or 443, timeout=30)
                try:
                    conn.request("GET", parts.path or "/", headers=headers)
                    response = conn.getresponse()
                    status, body, error = response.status, response.read(), ""
                    date = response.getheader("Date")
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException) as e:
                status, error = 0, f"Unable to GET: {self.url} - {e}"
            if not error and status < 500:
                return status, body, date
        if error:
            raise Fatal(error)
        return status, body, date

    def _value(self, name: str, item: dict[str, Any]) -> str:
        if item.get("Unencrypted"):
            return str(item.get("Value", ""))
        try:
            raw = base64.b64decode(item.get("Value", ""), validate=True)
            return decrypt_with(self.shared_x, raw).decode()
        except (ValueError, DecryptionError) as error:
            raise Fatal(f"{name}: Unable to ECIES decrypt {error}") from error

    def _on_changed(self, name: str, path: str, argv: Sequence[str]) -> None:
        if not argv:
            return
        if not (self.unsafe_handlers or os.path.normpath(argv[0]).startswith(self.handlers_dir)):
            log("WARN", f"Skipping unsafe on-change command file={name}")
            return
        env = dict(os.environ, CONFIG_FILE=path, STORAGE_DIR=self.storage,
                   SOTA_DIR=",".join(self.config.search_path),
                   FIOCONFIG_BIN=os.path.abspath(sys.argv[0]))
        done = subprocess.run(list(argv), env=env, check=False)
        if done.returncode:
            log("ERROR", f'Unable to run command command={list(argv)} '
                f'error="exit status {done.returncode}"')
            if done.returncode == HANDLER_FORCE_EXIT:
                raise Fatal("a handler asked to stop", HANDLER_FORCE_EXIT)


def main(
    argv: Sequence[str],
    *,
    handlers_dir: str = HANDLERS_DIR,
    retry_delays: Sequence[float] = RETRY_DELAYS,
    root: str = "/",
) -> int:
    """``fioconfig [global options] check-in``; the exit status. ``root``: where the
    paths of ``sota.toml`` are (a device tree that is not this machine's)."""
    args = list(argv)
    search: list[str] = []
    secrets = os.environ.get("SECRETS_DIR") or DEFAULT_SECRETS
    unsafe = os.environ.get("UNSAFE_CALLBACKS", "") in ("1", "true")
    try:
        while args and args[0].startswith("-"):
            flag = args.pop(0)
            if flag in ("--config", "-c") and args:
                search.append(args.pop(0))
            elif flag in ("--secrets-dir", "-s") and args:
                secrets = args.pop(0)
            elif flag == "--unsafe-handlers":
                unsafe = True
            else:
                raise Fatal(f"flag provided but not defined: {flag}")
        if args != ["check-in"]:
            raise Fatal(f"the stand-in knows only check-in, not {args}")
        if not search:
            env_path = os.environ.get("SOTA_DIR")
            search = env_path.split(",") if env_path else list(DEFAULT_CONFIG)
        CheckIn(Config(search, root=root), secrets, unsafe_handlers=unsafe,
                handlers_dir=handlers_dir, retry_delays=retry_delays).run()
    except Fatal as error:
        if error.code == HANDLER_FORCE_EXIT:
            return HANDLER_FORCE_EXIT
        log("ERROR", str(error))
        return error.code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
