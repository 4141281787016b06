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

``fioconfig`` is the kit's stand-in (``lmp_autoreg.testing.fioconfig``), which checks in
with the kit's device gateway as the real one does: it decrypts with the device's key,
needs its secrets dir, writes the files 0640, runs handlers; ``exit``/``stderr``/``sleep``
replace that with a scripted run.

``lmp-device-register`` imitates the real tool (foundriesio/lmp-device-register): without
``-T`` it runs the tool's OAuth device flow against ``$OAUTH_BASE`` and records what
``/proc/self/cmdline`` and ``/proc/self/environ`` show of it (as ``lmp-device-register/proc``
calls) first; it parses
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
(HSM mode without the ``[p11]`` section), ``pkcs11-tool-fails`` (HSM mode: fails as the
releases before libp11 support did when the token refused, echoing the ``pkcs11-tool``
command line it ran, PINs included, on stderr, and exiting 1); ``stderr``/``exit`` make
it fail at once with that message.
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
if hsm and CONF.get("mode") == "pkcs11-tool-fails":
    # The tool once ran pkcs11-tool with the PINs on its command line, and printed that
    # command line when it failed.
    sys.stderr.write("Unable to run: pkcs11-tool --module %s --init-pin --token-label aktualizr "
                     "--so-pin %s --pin %s\n" % (opts["--hsm-module"], opts["--hsm-so-pin"],
                                                 opts["--hsm-pin"]))
    sys.stderr.write("STDERR is: error: PKCS11 function C_Login failed: rv = "
                     "CKR_PIN_INCORRECT (0xa0)\nAborting.\n")
    sys.exit(1)
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
else:
    # As the real tool without -T (src/auth.cpp): its own OAuth device flow at $OAUTH_BASE,
    # polling while the answer is 400 authorization_pending; then a bearer token.
    import base64, urllib.parse
    with open("/proc/self/cmdline", "rb") as f:  # what any process on the device can read
        cmdline = f.read().decode(errors="replace").rstrip("\0").split("\0")
    with open("/proc/self/environ", "rb") as f:
        environ = dict(e.partition("=")[::2] for e in f.read().decode(errors="replace")
                       .split("\0") if e)
    with open(os.path.join(HERE, "calls.jsonl"), "a") as log:
        log.write(json.dumps({"name": NAME + "/proc", "argv": cmdline, "env": environ,
                              "umask": UMASK}) + "\n")
    print("Foundries providing auth token ")
    base = os.environ.get("OAUTH_BASE", "https://app.foundries.io/oauth")
    def form_post(path, fields):
        request = urllib.request.Request(base + path, method="POST",
                                         data=urllib.parse.urlencode(fields).encode())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, {}
    scope = opts["-f"] + ":devices:create"
    status, auth = form_post("/authorization/device/", {"client_id": uuid, "scope": scope})
    if status != 200:
        fail("Unable to create device authorization request: HTTP_%d" % status)
    print("Visit the link below in your browser to authorize this new device.")
    print("  User code: %s\n  Browser URL: %s" % (auth["user_code"], auth["verification_uri"]))
    while True:
        status, answer = form_post("/token/", {
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "device_code": auth["device_code"], "client_id": uuid, "scope": scope})
        if status == 200:
            token = answer["access_token"]
            break
        if status != 400:
            print("HTTP(%d) error..." % status)
            time.sleep(2)
        elif answer.get("error") == "authorization_pending":
            time.sleep(int(auth["interval"]))
        else:
            fail("Error authorizing device: HTTP_%d\nerror: %s" % (status, answer.get("error")))
    headers["Authorization"] = "Bearer " + base64.b64encode(token.encode()).decode()
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
# The kit's stand-in for the real "fioconfig check-in" (lmp_autoreg.testing.fioconfig: it
# talks to the kit's device gateway as the real one does). Knobs: "exit"/"stdout"/
# "stderr"/"sleep" replace it with that behaviour; "retry_delays" (seconds) and
# "handlers_dir" stand in for the real schedule and /usr/share/fioconfig/handlers/; "root"
# is the device tree sota.toml's paths are in.
if any(k in CONF for k in ("exit", "stdout", "stderr", "sleep")):
    time.sleep(CONF.get("sleep", 0))
    sys.stdout.write(CONF.get("stdout", ""))
    sys.stderr.write(CONF.get("stderr", ""))
    sys.exit(CONF.get("exit", 0))
from lmp_autoreg.testing import fioconfig
knobs = {k: CONF[k] for k in ("retry_delays", "handlers_dir", "root") if k in CONF}
sys.exit(fioconfig.main(sys.argv[1:], **knobs))
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
