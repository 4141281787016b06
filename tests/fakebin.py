"""Fake executables on PATH (fioconfig, systemctl, lmp-device-register) for tests.

Each fake is a small Python script in a temporary bin directory. Every run appends one
JSON line to ``calls.jsonl`` in that directory (its name, argv, environment and umask), so a test
sees which commands ran, in which order, with what. What a fake does is read at each run
from ``<name>.json`` next to it, so a test can change it between runs:

- ``exit``, ``stdout``, ``stderr``, ``sleep``: the fake's behaviour;
- ``when``: ``{last argument: behaviour}``, e.g. make ``systemctl start fioconfig`` fail
  while ``systemctl start aktualizr-lite`` works.

``lmp-device-register`` imitates the real tool: it parses the tool's options, makes an EC
key and a CSR, POSTs the request to ``$DEVICE_API`` (so it really registers with the test
kit's server) and writes ``pkey.pem`` and the answer's files into the ``-d`` directory,
printing the real tool's messages and exiting 255 when it fails. Its ``mode`` knob breaks
it on purpose: ``wrong-key`` (leaves a pkey.pem the certificate does not match),
``no-toml`` (leaves no sota.toml), ``crash`` (writes the files, then fails with an unknown
message); ``stderr``/``exit`` make it fail at once with that message.
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

_LMP_DEVICE_REGISTER = """
import urllib.error, urllib.request
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

def fail(message):
    sys.stderr.write(message + "\\n")
    sys.exit(255)

time.sleep(CONF.get("sleep", 0))
if "stderr" in CONF:
    sys.stderr.write(CONF["stderr"])
    sys.exit(CONF.get("exit", 255))
opts, args = {}, sys.argv[1:]
while args:
    name = args.pop(0)
    if not args:
        fail("ERROR: the required argument for option '%s' is missing" % name)
    opts[name] = args.pop(0)
sota = opts.get("-d", "/var/sota")
if os.path.exists(os.path.join(sota, "sql.db")):
    fail("ERROR: Device appears to already be registered in %s/sql.db" % sota)
uuid, hsm = opts["-u"], "--hsm-module" in opts
key = ec.generate_private_key(ec.SECP256R1())
subject = [x509.NameAttribute(NameOID.COMMON_NAME, uuid),
           x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, opts["-f"])]
if "PRODUCTION" in os.environ:
    subject.append(x509.NameAttribute(NameOID.BUSINESS_CATEGORY, "production"))
csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True)
       .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
q = lambda v: '"%s"' % v
pacman = {"type": q("ostree+compose_apps"), "compose_apps_root": q(sota + "/compose-apps"),
          "reset_apps_root": q(sota + "/reset-apps"), "tags": q(opts["-t"])}
if "-a" in opts:
    pacman["compose_apps"] = q(opts["-a"])
body = {"name": opts["-n"], "uuid": uuid, "csr": csr, "hardware-id": opts["-i"],
        "sota-config-dir": sota, "use-ostree-server": "true", "overrides": {"pacman": pacman}}
if "-g" in opts:
    body["group"] = opts["-g"]
url = os.environ["DEVICE_API"]
request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
    "Content-type": "application/json", opts.get("-H", "OSF-TOKEN"): opts["-T"]})
try:
    with urllib.request.urlopen(request, timeout=10) as response:
        files = json.load(response)
except urllib.error.HTTPError as e:
    fail("Unable to create device: HTTP_%d\\n%s" % (e.code, e.read().decode(errors="replace")))
except (urllib.error.URLError, OSError) as e:
    fail("Unable to reach the device registration endpoint %s; err: %s" % (url, e))
mode = CONF.get("mode")
if mode == "wrong-key":
    key = ec.generate_private_key(ec.SECP256R1())
if mode == "no-toml":
    del files["sota.toml"]
if not hsm:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with open(os.path.join(sota, "pkey.pem"), "wb") as f:
        f.write(pem)
for name, content in files.items():
    if hsm and name == "sota.toml":
        content += '\\n[p11]\\nmodule = "%s"\\npass = "%s"\\n' % (opts["--hsm-module"],
                                                               opts["--hsm-pin"])
    with open(os.path.join(sota, name), "w") as f:
        f.write(content)
if mode == "crash":
    fail("Could not store certificate")
print("Device is now registered.")
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
        body = _LMP_DEVICE_REGISTER if name == "lmp-device-register" else _SIMPLE
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
