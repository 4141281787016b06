"""Fake executables on PATH (fioconfig, systemctl, systemd-run, lmp-device-register).

Each fake is a small Python script in a temporary bin directory. Every run appends one
JSON line to ``calls.jsonl`` in that directory (its name, argv, environment and umask), so a test
sees which commands ran, in which order, with what. What a fake does is read at each run
from ``<name>.json`` next to it, so a test can change it between runs:

- ``exit``, ``stdout``, ``stderr``, ``sleep``: the fake's behaviour;
- ``when``: ``{last argument: behaviour}``, e.g. make ``systemctl start fioconfig`` fail
  while ``systemctl start aktualizr-lite`` works.

``systemctl`` answers ``show`` as the real one does (``missing`` and ``active`` knobs) and
fails ``start`` of a unit that does not exist; ``systemd-run`` runs its command in PID 1's
environment plus the ``EnvironmentFile=`` it is given, and returns its exit status.

``fioconfig`` imitates the real ``fioconfig check-in`` against the test kit's device gateway
(see ``_FIOCONFIG``): it decrypts with the device's key, needs its secrets dir, writes the
files 0640, runs handlers; ``exit``/``stderr``/``sleep`` replace that with a scripted run.

``lmp-device-register`` imitates the real tool (foundriesio/lmp-device-register): it parses
its options with the real defaults (``-A`` one space; ``--production`` off, or on with the
``production_build`` knob, a tool built with ``-DPRODUCTION``; ``PRODUCTION`` in the
environment means production whatever the option), refuses a sota dir holding ``sql.db``
or ``client.pem``, sends ``HEAD $DEVICE_API`` first (an answer of 500 or more is "not
healthy"), makes an EC key and a CSR, builds the body as the tool does (the
``reset-apps`` directory rule included), POSTs it (so it really registers with the test
kit's server), and writes ``pkey.pem`` and the answer's files into the ``-d`` directory
(``[p11]`` appended to sota.toml in HSM mode), printing the real tool's messages on
stderr and exiting 255 when it fails. Its ``mode`` knob breaks it on purpose:
``wrong-key`` (leaves a pkey.pem the certificate does not match), ``no-toml`` (leaves no
sota.toml), ``crash`` (writes the files, then fails with an unknown message),
``other-uuid`` (registers and installs a certificate for another uuid), ``hsm-no-p11``
(HSM mode without the ``[p11]`` section); ``stderr``/``exit`` make it fail at once with
that message.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import clean_env

_RECORD = """\
import json, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
NAME = os.path.basename(sys.argv[0])
UMASK = os.umask(0)
os.umask(UMASK)
with open(os.path.join(HERE, "calls.jsonl"), "a") as log:
    log.write(json.dumps({"name": NAME, "argv": sys.argv[1:], "env": dict(os.environ),
                          "umask": UMASK}) + "\\n")
try:
    with open(os.path.join(HERE, NAME + ".json")) as f:
        CONF = json.load(f)
except FileNotFoundError:
    CONF = {}
"""

_SIMPLE = """
rule = CONF.get("when", {}).get(sys.argv[-1] if len(sys.argv) > 1 else "", CONF)
time.sleep(rule.get("sleep", 0))
sys.stdout.write(rule.get("stdout", ""))
sys.stderr.write(rule.get("stderr", ""))
sys.exit(rule.get("exit", 0))
"""

_SYSTEMCTL = r"""
# As the real systemctl: "show" prints the properties asked for, also of a unit that does
# not exist (LoadState=not-found), and exits 0; "start" of such a unit fails with exit 5.
# Knobs: "missing" (unit names that do not exist), "active" (units running already), and
# "when" (last argument -> behaviour) for anything else; a behaviour's "copy" ({src: dst})
# copies files when the command runs.
args = sys.argv[1:]
unit = args[-1] if args else ""
loaded = unit not in CONF.get("missing", [])
if args and args[0] == "show":
    props = {"LoadState": "loaded" if loaded else "not-found",
             "ActiveState": "active" if unit in CONF.get("active", []) else "inactive"}
    for arg in args[1:-1]:
        name = arg.partition("=")[2]
        if name in props:
            print("%s=%s" % (name, props[name]))
    sys.exit(0)
if args and args[0] == "stop":  # a transient unit of the fake systemd-run: end its command
    pidfile = os.path.join(HERE, "units", unit.removesuffix(".service") + ".pid")
    if os.path.exists(pidfile):
        import signal
        os.kill(int(open(pidfile).read()), signal.SIGTERM)
        os.unlink(pidfile)
if args and args[0] == "start" and not loaded:
    sys.stderr.write("Failed to start %s.service: Unit %s.service not found.\n" % (unit, unit))
    sys.exit(5)
rule = CONF.get("when", {}).get(unit, CONF)
for src, dst in rule.get("copy", {}).items():  # what a file held when this ran
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.write(f.read())
time.sleep(rule.get("sleep", 0))
sys.stdout.write(rule.get("stdout", ""))
sys.stderr.write(rule.get("stderr", ""))
sys.exit(rule.get("exit", 0))
"""

_SYSTEMD_RUN = r"""
# As the real systemd-run: with --wait --pipe the command runs in PID 1's environment (here:
# PATH only) plus the EnvironmentFile= property's file, and its exit status is returned;
# with --no-block the transient unit is queued and systemd-run returns 0 at once, whatever
# the command later does (here it runs before the return, its status ignored). Knob:
# "when" (the --unit= name -> behaviour, e.g. {"exit": 1, "stderr": ...}): refuse to queue.
# As with the real one, killing it does not end the unit: its command runs on (its pid is
# in units/<unit>.pid until it ends) until "systemctl stop <unit>".
import subprocess
args, env, unit = sys.argv[1:], {"PATH": os.environ.get("PATH", os.defpath)}, ""
options = []
while args and args[0].startswith("-"):
    arg = args.pop(0)
    options.append(arg)
    if arg.startswith("--unit="):
        unit = arg.partition("=")[2]
    if arg.startswith("--property=EnvironmentFile="):
        path = arg.partition("EnvironmentFile=")[2].lstrip("-")
        if os.path.exists(path):
            for line in open(path):
                key, eq, value = line.strip().partition("=")
                if eq and not key.startswith("#"):
                    env[key] = value.strip('"')
rule = CONF.get("when", {}).get(unit)
if rule:
    sys.stderr.write(rule.get("stderr", ""))
    sys.exit(rule.get("exit", 1))
child = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
pidfile = os.path.join(HERE, "units", (unit or "run-u1") + ".pid")
os.makedirs(os.path.dirname(pidfile), exist_ok=True)
with open(pidfile, "w") as f:
    f.write(str(child.pid))
code = child.wait()
if os.path.exists(pidfile):
    os.unlink(pidfile)
sys.exit(0 if "--no-block" in options else code)
"""

_LMP_DEVICE_REGISTER = r"""
def fail(message):
    sys.stderr.write(message + "\n")
    sys.exit(255)

def boolean(value):
    return value.lower() in ("1", "true", "yes", "on")

time.sleep(CONF.get("sleep", 0))
if "stderr" in CONF:
    sys.stderr.write(CONF["stderr"])
    sys.exit(CONF.get("exit", 255))
import re, urllib.error, urllib.request, uuid as uuidlib
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
# Options, with the real tool's defaults; "production_build" is a tool built -DPRODUCTION.
opts = {"-A": " ", "-d": "/var/sota", "-H": "OSF-TOKEN", "--start-daemon": "1",
        "--production": "1" if CONF.get("production_build") else "0"}
args = sys.argv[1:]
while args:
    name = args.pop(0)
    if not args:
        fail("ERROR: the required argument for option '%s' is missing" % name)
    opts[name] = args.pop(0)
if not opts.get("-f") or opts["-f"] == "lmp":
    fail("Missing factory definition")
if not opts.get("-t"):
    fail("Missing tag definition")
hsm = bool(opts.get("--hsm-module"))
if (hsm or opts.get("--hsm-pin") or opts.get("--hsm-so-pin")) and not (
        hsm and opts.get("--hsm-pin") and opts.get("--hsm-so-pin")):
    fail("HSM incorrectly configured")
production = boolean(opts["--production"]) or "PRODUCTION" in os.environ
uuid = opts.get("-u") or str(uuidlib.uuid4())
if not re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", uuid):
    fail("Invalid UUID: %s, aborting" % uuid)
name = opts.get("-n") or uuid
sota = opts["-d"]
try:
    open(os.path.join(sota, ".tmp"), "w").close()
    os.unlink(os.path.join(sota, ".tmp"))
except OSError:
    fail("Unable to write to %s" % sota)
if any(os.path.exists(os.path.join(sota, f)) for f in ("sql.db", "client.pem")):
    fail("ERROR: Device already registered in %s\n"
         "Re-run with --force 1 to remove existing registration data" % sota)
headers = {"Content-type": "application/json"}
if opts.get("-T"):
    headers[opts["-H"]] = opts["-T"]
url = os.environ.get("DEVICE_API", "https://api.foundries.io/ota/devices/")
print("Using DEVICE_API: %s" % url)
try:
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
        health = r.status
except urllib.error.HTTPError as e:
    health = e.code
except (urllib.error.URLError, OSError) as e:
    fail("Unable to reach the device registration endpoint %s; err: %s" % (url, e))
if health >= 500:
    fail("The device registration endpoint is not healthy%s; status code: %d" % (url, health))
mode = CONF.get("mode")
cn = str(uuidlib.uuid4()) if mode == "other-uuid" else uuid  # a certificate for another uuid
key = ec.generate_private_key(ec.SECP256R1())
subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn),
           x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, opts["-f"])]
if production:
    subject.append(x509.NameAttribute(NameOID.BUSINESS_CATEGORY, "production"))
usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, key_cert_sign=False,
                      crl_sign=False, encipher_only=False, decipher_only=False)
csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
       .add_extension(usage, critical=True)
       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True)
       .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
# The body as the tool's property tree writes it: every value a string.
q = lambda v: '"%s"' % v
body = {"use-ostree-server": "true", "sota-config-dir": sota, "hardware-id": opts.get("-i", ""),
        "name": name, "uuid": cn, "csr": csr}
overrides = {}
if hsm:
    overrides["tls"] = {"pkey_source": q("pkcs11"), "cert_source": q("pkcs11")}
    for section in ("storage", "import"):
        overrides[section] = {"tls_pkey_path": "", "tls_clientcert_path": ""}
pacman = {"type": q("ostree+compose_apps"), "compose_apps_root": q(sota + "/compose-apps")}
if opts.get("-a"):
    pacman["compose_apps"] = q(opts["-a"])
pacman["reset_apps_root"] = q(sota + "/reset-apps")
if opts["-A"]:
    pacman["reset_apps"] = q(opts["-A"])
elif os.path.exists(os.path.join(sota, "reset-apps")):
    print("Device is preloaded with Restorable Apps, turning their usage ON")
    pacman["reset_apps"] = q("")
overrides["pacman"] = pacman
body["overrides"] = overrides
if opts.get("-g"):
    body["group"] = opts["-g"]
pacman["tags"] = q(opts["-t"])
print("Registering device %s with factory %s" % (name, opts["-f"]))
request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers=headers)
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        status, raw = response.status, response.read()
except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
except (urllib.error.URLError, OSError) as e:
    sys.stderr.write("Unable to post to %s: %s\n" % (url, e))
    fail("Unable to create device: HTTP_-1")
try:
    files = json.loads(raw)
except ValueError as e:
    files = {}
    sys.stderr.write("Unable to parse response from: %s Error is:\n %s\nRaw response was: %s\n"
                     % (url, e, raw.decode(errors="replace")))
if status != 201:
    fail("Unable to create device: HTTP_%d" % status + "".join(
        "\n%s: %s" % item for item in (files.items() if isinstance(files, dict) else ())))
print("Populate sota directory.")
if mode == "wrong-key":
    key = ec.generate_private_key(ec.SECP256R1())
if mode == "no-toml":
    del files["sota.toml"]
if not hsm:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with open(os.path.join(sota, "pkey.pem"), "wb") as f:
        f.write(pem)
for fname, content in files.items():
    if hsm and fname == "sota.toml" and mode != "hsm-no-p11":
        content += ('\n[p11]\nmodule = "%s"\npass = "%s"\ntls_pkey_id = "01"\n'
                    'tls_clientcert_id = "03"\n' % (opts["--hsm-module"], opts["--hsm-pin"]))
    with open(os.path.join(sota, fname), "w") as f:
        f.write(content)
if mode == "crash":
    fail("Could not store certificate")
print("Device is now registered.")
"""


_FIOCONFIG = r"""
# As the real fioconfig (foundriesio/fioconfig 638424812372, what meta-lmp builds) does
# "check-in": read sota.toml from its config search path, GET <tls.server>/config over
# mTLS with the device's certificate (CONFIG_URL overrides the URL), If-Modified-Since
# from config.encrypted's mtime; on 200 decrypt each value (ECIES with the device's file
# key), refuse when the secrets dir is missing, write the files 0640 into it, run the
# on-change handler of each changed file (123 from one: exit 123 at once), store the raw
# answer in <storage>/config.encrypted with the answer's Date; 204 and 304 exit 0; a
# network error or 5xx is retried after 1, 2, 5, 13, 30 s, then exit 1; any other status
# is exit 1 at once. Not imitated: the PATCH of a "vpn" build (it needs wireguard's "wg",
# which devices without a VPN lack: then the real one sends none either) and PKCS#11 keys
# (the real one does the TLS and the ECDH on the token; this one exits 1 saying so).
# Knobs: "exit"/"stdout"/"stderr"/"sleep" replace all this with that behaviour;
# "retry_delays" (seconds) and "handlers_dir" stand in for the real schedule and
# /usr/share/fioconfig/handlers/.
if any(k in CONF for k in ("exit", "stdout", "stderr", "sleep")):
    time.sleep(CONF.get("sleep", 0))
    sys.stdout.write(CONF.get("stdout", ""))
    sys.stderr.write(CONF.get("stderr", ""))
    sys.exit(CONF.get("exit", 0))
import base64, email.utils, http.client, ssl, subprocess, tomllib, urllib.parse
from cryptography.hazmat.primitives import serialization
from lmp_autoreg.testing import ecies

def log(level, msg):
    sys.stderr.write("%s %s %s\n" % (time.strftime("%Y/%m/%d %H:%M:%S"), level, msg))

def fatal(msg):
    log("ERROR", msg)
    sys.exit(1)

args = sys.argv[1:]
configs, secrets = [], os.environ.get("SECRETS_DIR", "/var/run/secrets")
unsafe = os.environ.get("UNSAFE_CALLBACKS", "") in ("1", "true")
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag in ("--config", "-c"):
        configs.append(args.pop(0))
    elif flag in ("--secrets-dir", "-s"):
        secrets = args.pop(0)
    elif flag == "--unsafe-handlers":
        unsafe = True
    else:
        fatal("flag provided but not defined: " + flag)
if args != ["check-in"]:
    fatal("the stand-in knows only check-in, not %s" % args)
if not configs:
    configs = (os.environ["SOTA_DIR"].split(",") if os.environ.get("SOTA_DIR") else
               ["/usr/lib/sota/conf.d", "/var/sota/sota.toml", "/etc/sota/conf.d/"])
found = {}
for path in configs:
    if os.path.isdir(path):
        for name in os.listdir(path):
            if name.endswith(".toml"):
                found[name] = os.path.join(path, name)
    elif os.path.exists(path):
        found[os.path.basename(path)] = path
trees = []
for name in sorted(found, reverse=True):  # the most significant first
    try:
        trees.append(tomllib.load(open(found[name], "rb")))
    except tomllib.TOMLDecodeError as e:
        fatal("unable to parse sota.toml: failed to load %s; err: %s" % (found[name], e))

def get(key, default=""):
    section, _, name = key.partition(".")
    for tree in trees:
        value = tree.get(section, {}).get(name, "")
        if isinstance(value, str) and value:
            return value
    return default

if get("tls.ca_source") != "file":
    fatal("Unable to create TLS config error=\"invalid tls.ca_source: %s\"" % get("tls.ca_source"))
if get("tls.pkey_source") == "pkcs11":
    fatal("stand-in fioconfig: PKCS#11 keys are not imitated")
if get("tls.pkey_source") != "file":
    fatal("Unable to create TLS config error=\"invalid tls.pkey_source: %s\""
          % get("tls.pkey_source"))
storage = get("storage.path")
if not storage:
    fatal("Missing required config key: storage.path")
context = ssl.create_default_context(cafile=get("import.tls_cacert_path"))
context.load_cert_chain(get("import.tls_clientcert_path"), get("import.tls_pkey_path"))
with open(get("import.tls_pkey_path"), "rb") as f:
    key = serialization.load_pem_private_key(f.read(), None)
url = (os.environ.get("CONFIG_URL")
       or get("tls.server", "https://ota-lite.foundries.io:8443") + "/config")
encrypted = os.path.join(storage, "config.encrypted")
headers, prev = {"User-Agent": "fioconfig-client/3", "Content-Type": "application/json"}, None
try:
    prev = json.load(open(encrypted, "rb"))
    stamp = time.gmtime(os.stat(encrypted).st_mtime)
    headers["If-Modified-Since"] = time.strftime("%a, %d %b %Y %H:%M:%S UTC", stamp)
except (OSError, ValueError):
    pass
log("INFO", "Checking in with server ...")
parts = urllib.parse.urlsplit(url)
status, body, date, error = 0, b"", None, None
for delay in [0, *CONF.get("retry_delays", [1, 2, 5, 13, 30])]:
    if delay:
        log("WARN", "HTTP request failed, retrying url=%s delay=%s status=%d error=\"%s\""
            % (url, delay, status, error))
        time.sleep(delay)
    try:
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=30,
                                           context=context)
        conn.request("GET", parts.path or "/", headers=headers)
        response = conn.getresponse()
        status, body, error = response.status, response.read(), None
        date = response.getheader("Date")
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        status, error = 0, "Unable to GET: %s - %s" % (url, e)
    if error is None and status < 500:
        break
if error is not None:
    fatal(error)
if status in (204, 304):
    log("INFO", "Device has no config defined on server" if status == 204 else
        "Config on server has not changed")
    sys.exit(0)
if status != 200:
    fatal("Unable to get %s - HTTP_%d: %s" % (url, status, body.decode(errors="replace")))
try:
    config = json.loads(body)
except ValueError as e:
    fatal("Unable to parse encrypted json: %s" % e)
for name, item in config.items():
    if not item.get("Unencrypted"):
        try:
            item["Value"] = ecies.decrypt(key, base64.b64decode(item["Value"])).decode()
        except (ValueError, ecies.DecryptionError) as e:
            fatal("%s: Unable to ECIES decrypt %s" % (name, e))
try:
    mode = os.stat(secrets).st_mode & 0o7777
except OSError as e:
    fatal("stat %s: %s" % (secrets, e.strerror.lower()))
handlers = CONF.get("handlers_dir", "/usr/share/fioconfig/handlers/")

def safe_write(path, data):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, path)

def on_changed(name, path, argv):
    if not argv:
        return
    if not (unsafe or os.path.normpath(argv[0]).startswith(handlers)):
        log("WARN", "Skipping unsafe on-change command file=%s" % name)
        return
    env = dict(os.environ, CONFIG_FILE=path, STORAGE_DIR=storage, SOTA_DIR=",".join(configs),
               FIOCONFIG_BIN=os.path.abspath(sys.argv[0]))
    done = subprocess.run(argv, env=env)
    if done.returncode:
        log("ERROR", "Unable to run command command=%s error=\"exit status %d\""
            % (argv, done.returncode))
        if done.returncode == 123:
            sys.exit(123)

for name, item in config.items():
    log("INFO", "Extracting file file=%s" % name)
    path = os.path.join(secrets, name)
    os.makedirs(os.path.dirname(path), mode, exist_ok=True)
    data = item["Value"].encode()
    try:
        changed = open(path, "rb").read() != data
    except OSError:
        changed = True
    if changed:
        safe_write(path, data)
        on_changed(name, path, item.get("OnChanged") or [])
for name, item in (prev or {}).items():
    if name not in config:
        path = os.path.join(secrets, name)
        if os.path.exists(path):
            os.unlink(path)
        on_changed(name, path, item.get("OnChanged") or [])
safe_write(encrypted, body)
try:
    stamp = email.utils.parsedate_to_datetime(date).timestamp()
except (TypeError, ValueError):
    stamp = time.time()
os.utime(encrypted, (stamp, stamp))
"""


@dataclass
class Call:
    name: str
    argv: list[str]
    env: dict[str, str]
    umask: int


class FakeBin:
    """A bin directory of fakes; ``environ()`` puts it first on PATH."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "calls.jsonl"

    def add(self, name: str, **behaviour: Any) -> Path:
        """Create the fake ``name`` (lmp-device-register gets the imitation of the tool)."""
        body = {"lmp-device-register": _LMP_DEVICE_REGISTER, "systemctl": _SYSTEMCTL,
                "systemd-run": _SYSTEMD_RUN, "fioconfig": _FIOCONFIG}.get(name, _SIMPLE)
        path = self.dir / name
        path.write_text(f"#!{sys.executable}\n{_RECORD}{body}")
        path.chmod(0o755)
        self.set(name, **behaviour)
        return path

    def set(self, name: str, **behaviour: Any) -> None:
        (self.dir / f"{name}.json").write_text(json.dumps(behaviour))

    def calls(self, name: str | None = None) -> list[Call]:
        if not self.log.exists():
            return []
        calls = [Call(**json.loads(line)) for line in self.log.read_text().splitlines()]
        return [c for c in calls if name is None or c.name == name]

    def environ(self, **extra: str) -> dict[str, str]:
        env = clean_env(**extra)
        env["PATH"] = f"{self.dir}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env
