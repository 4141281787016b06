"""A real SoftHSM2 token in a private directory (SOFTHSM2_CONF), for the HSM tests.

The token is looked at from a child process: a PKCS#11 module reads its configuration once
per process, so the test process itself never loads it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env, require_module, require_tool

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
# Distinctive, so that a leak shows up in a search of the output and the files.
PIN = "pin-4711-user"
SO_PIN = "pin-0815-officer"

_INSPECT = r"""
import json, sys
import pkcs11
from pkcs11 import Attribute, ObjectClass
module, pin = sys.argv[1], sys.stdin.read()
token = pkcs11.lib(module).get_token(token_label="aktualizr")
found = {}
with token.open(user_pin=pin) as session:
    for obj in session.get_objects():
        cls = obj[Attribute.CLASS]
        entry = {"id": bytes(obj[Attribute.ID]).hex()}
        if cls == ObjectClass.PUBLIC_KEY:
            entry["point"] = bytes(obj[Attribute.EC_POINT]).hex()
        if cls == ObjectClass.PRIVATE_KEY:
            entry["sensitive"] = obj[Attribute.SENSITIVE]
            entry["extractable"] = obj[Attribute.EXTRACTABLE]
            entry["derive"] = obj[Attribute.DERIVE]
        if cls == ObjectClass.CERTIFICATE:
            entry["der"] = bytes(obj[Attribute.VALUE]).hex()
        name = f"{cls.name.lower()}:{obj[Attribute.LABEL]}"
        found.setdefault(name, []).append(entry)
print(json.dumps(found))
"""


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_openssl_engine() -> None:
    """OpenSSL's PKCS#11 engine (Debian libengine-pkcs11-openssl); fails in CI if missing."""
    if not list(Path("/usr/lib").glob("*/engines-3/pkcs11.so")):
        _missing("OpenSSL's pkcs11 engine is missing (Debian libengine-pkcs11-openssl)")


class SoftHsm:
    """A SoftHSM2 configuration whose tokens live under ``directory``."""

    def __init__(self, directory: Path) -> None:
        require_module("pkcs11")
        self.util = require_tool("softhsm2-util")
        if not Path(MODULE).exists():
            _missing(f"SoftHSM2's module {MODULE} is missing (Debian package softhsm2)")
        tokens = directory / "tokens"
        tokens.mkdir(parents=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                             "log.level = ERROR\n")
        self.env = clean_env(SOFTHSM2_CONF=str(self.conf))

    def init_token(self, label: str = "aktualizr") -> None:
        subprocess.run([self.util, "--init-token", "--free", "--label", label,
                        "--pin", PIN, "--so-pin", SO_PIN],
                       env=self.env, check=True, capture_output=True, timeout=30)

    def init_token_without_user_pin(self, label: str = "aktualizr") -> None:
        """A token with its SO PIN only, as `pkcs11-tool --init-token` leaves it."""
        subprocess.run([require_tool("pkcs11-tool"), "--module", MODULE, "--init-token",
                        "--label", label, "--so-pin", SO_PIN],
                       env=self.env, check=True, capture_output=True, timeout=30)

    @staticmethod
    def settings(module: str = MODULE, pin: str = PIN) -> dict[str, str]:
        """The /etc/sota/hsm of a device using this token."""
        return {"HSM_MODULE": module, "HSM_PIN": pin, "HSM_SOPIN": SO_PIN}

    def objects(self) -> dict[str, list[dict]]:
        """``"<class>:<label>" -> [attributes]`` of every object on the aktualizr token."""
        proc = subprocess.run([sys.executable, "-c", _INSPECT, MODULE], input=PIN,
                              env=self.env, capture_output=True, text=True, timeout=30,
                              check=True)
        return json.loads(proc.stdout)

    def counts(self) -> dict[str, int]:
        return {name: len(found) for name, found in self.objects().items()}
