"""The check-in of a device whose key is on a PKCS#11 token (lmp_autoreg.testing.p11 and
p11tls, the stand-in fioconfig's HSM mode), end to end on a real SoftHSM2 token.

The agent registers the device in HSM mode (a process), then the stand-in fioconfig checks
in (a process) as the real one does with ``tls.pkey_source = "pkcs11"``: it finds the key
and the certificate by the ``[p11]`` section the agent wrote, authenticates the TLS
connection to the kit's device gateway with a signature the token makes, and decrypts each
value with the token's ECDH. There is no key file anywhere to do it instead.
"""

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given

from lmp_autoreg.testing import ThrowawayCA
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.gateway import ConfigFile, DeviceGateway
from lmp_autoreg.testing.server import RegistrationServer

from conftest import any_text, device_args, require_module, run_cli
from fakebin import FakeBin
from softhsm import PIN, SO_PIN, SoftHsm

CONFIG = {"wifi.conf": "ssid=factory\npsk=secret\n",
          "banner": ConfigFile("hello\n", unencrypted=True)}


class Registered:
    """A device registered in HSM mode against a kit server with a device gateway, and
    the stand-in fioconfig that checks it in."""

    def __init__(self, tmp_path: Path, server: RegistrationServer) -> None:
        self.softhsm = SoftHsm(tmp_path / "softhsm")
        self.softhsm.init_token()
        self.device = FakeDevice(tmp_path / "device", hsm=SoftHsm.settings()).build()
        self.server = server
        assert isinstance(server.gateway, DeviceGateway)
        self.gateway = server.gateway
        self.run = run_cli(*device_args(self.device, server, "--json"), env=self.softhsm.env)
        assert self.run.returncode == 0, self.run.stderr
        self.secrets = tmp_path / "secrets"
        self.secrets.mkdir(mode=0o750)
        self.fakes = FakeBin(tmp_path / "bin")
        self.fakes.add("fioconfig")
        self.fakes.set("fioconfig", root=str(self.device.root), retry_delays=[])
        self.extra = tmp_path / "conf.d"
        self.extra.mkdir()

    def check_in(self, **env: str) -> subprocess.CompletedProcess:
        """``fioconfig check-in`` with the device's sota.toml, then conf.d (its files win
        over sota.toml when they rank after it)."""
        return subprocess.run(
            [str(self.fakes.dir / "fioconfig"), "--config", str(self.device.sota / "sota.toml"),
             "--config", str(self.extra), "check-in"],
            env=self.fakes.environ(**self.softhsm.env, SECRETS_DIR=str(self.secrets), **env),
            capture_output=True, text=True, timeout=60)

    def override(self, toml: str) -> None:
        (self.extra / "z-p11.toml").write_text(toml)


@pytest.fixture
def registered(tmp_path):
    require_module("tlslite")
    with RegistrationServer(gateway=DeviceGateway) as server:
        yield Registered(tmp_path, server)


def test_checks_in_and_decrypts_with_the_key_on_the_token(registered):
    registered.gateway.set_config(None, CONFIG)
    assert not list(registered.device.root.rglob("pkey.pem"))  # no key file to use instead
    checkin = registered.check_in()
    assert checkin.returncode == 0, checkin.stderr
    assert (registered.secrets / "wifi.conf").read_text() == "ssid=factory\npsk=secret\n"
    assert (registered.secrets / "banner").read_text() == "hello\n"
    # The gateway knew the device by the certificate the token presented in the handshake.
    [get] = registered.gateway.requests
    assert get.device == registered.run.json["uuid"] and get.request.path == "/config"
    stored = json.loads((registered.device.sota / "config.encrypted").read_text())
    assert stored["wifi.conf"]["Value"] != CONFIG["wifi.conf"]  # it came encrypted
    for secret in (PIN, SO_PIN):
        assert secret not in checkin.stdout + checkin.stderr
    again = registered.check_in()
    assert again.returncode == 0, again.stderr
    assert "Config on server has not changed" in again.stderr


def test_an_id_is_read_as_fioconfig_reads_it(registered):
    """``IdToBytes``: a digit a byte, leading zeros dropped, so "1" is "01" and "0003" "03"."""
    registered.gateway.set_config(None, CONFIG)
    registered.override('[p11]\ntls_pkey_id = "1"\ntls_clientcert_id = "0003"\n')
    checkin = registered.check_in()
    assert checkin.returncode == 0, checkin.stderr
    assert (registered.secrets / "wifi.conf").read_text() == CONFIG["wifi.conf"]


@pytest.mark.parametrize(("toml", "code", "says"), [
    ('[p11]\ntls_pkey_id = "02"\n', 2, "panic: unable to load pkcs11 private key"),
    ('[p11]\ntls_clientcert_id = "01"\n', 2, "panic: unable to load pkcs11 client certificate"),
    ('[p11]\nlabel = "other"\n', 1, "could not find PKCS#11 token"),
    ('[p11]\npass = "not-the-pin"\n', 1, "failed to log into long term session: PinIncorrect"),
    ('[tls]\npkey_source = "tpm"\n', 1, "invalid tls.pkey_source: tpm"),
], ids=["key-id", "cert-id", "token-label", "pin", "pkey-source"])
def test_what_p11_names_must_be_on_the_token(registered, toml, code, says):
    """As the real fioconfig ends (run by hand): a key pair or a certificate that is not
    on the token is a panic on crypto11's nil answer, exit 2; the rest exit 1."""
    registered.gateway.set_config(None, CONFIG)
    registered.override(toml)
    checkin = registered.check_in()
    assert checkin.returncode == code, checkin.stderr
    assert says in checkin.stderr
    assert registered.gateway.requests == [] and not list(registered.secrets.iterdir())
    assert PIN not in checkin.stderr


def test_without_a_setting_of_p11_it_says_which_are_required(registered, tmp_path):
    toml = (registered.device.sota / "sota.toml").read_text()
    lone = tmp_path / "lone.toml"  # the same sota.toml, without pass
    lone.write_text("\n".join(line for line in toml.splitlines()
                              if not line.startswith("pass =")))
    checkin = subprocess.run(
        [str(registered.fakes.dir / "fioconfig"), "--config", str(lone), "check-in"],
        env=registered.fakes.environ(**registered.softhsm.env,
                                     SECRETS_DIR=str(registered.secrets)),
        capture_output=True, text=True, timeout=60)
    assert checkin.returncode == 1
    assert "missing required p11 configs for: module, pass" in checkin.stderr


def test_a_gateway_of_another_ca_is_refused_before_any_request(registered):
    """The gateway's certificate must lead to the device's root.crt, as Go checks it."""
    stranger = ThrowawayCA("acme")
    with DeviceGateway(stranger, device_ca=registered.server.ca) as other:
        other.set_config(None, CONFIG)
        checkin = registered.check_in(CONFIG_URL=f"{other.url}/config")
    assert checkin.returncode == 1
    assert "certificate signed by unknown authority" in checkin.stderr
    assert other.requests == [] and not list(registered.secrets.iterdir())


def test_a_gateway_that_does_not_trust_the_device_refuses_the_handshake(registered):
    with DeviceGateway(registered.server.ca, device_ca=ThrowawayCA("acme")) as other:
        other.set_config(None, CONFIG)
        checkin = registered.check_in(CONFIG_URL=f"{other.url}/config")
    assert checkin.returncode == 1
    assert "Unable to GET" in checkin.stderr
    assert other.requests == []


def test_ids_are_digits_a_byte_each():
    p11 = require_module("lmp_autoreg.testing.p11")
    assert p11.id_bytes("01") == b"\x01" == p11.id_bytes("1")
    assert p11.id_bytes("0709") == b"\x07\x00\x09"
    for bad in ("", "0", "00", "0x1", "1a", "\u0661"):  # U+0661: an Arabic-Indic one
        with pytest.raises(p11.TokenError):
            p11.id_bytes(bad)


@pytest.mark.props
@given(text=any_text())
def test_an_id_from_a_device_file_is_bytes_or_refused(text):
    p11 = require_module("lmp_autoreg.testing.p11")
    try:
        found = p11.id_bytes(text)
    except p11.TokenError:
        return
    assert found and found[0] != 0 and all(b < 10 for b in found)
    assert "".join(map(str, found)) == text.lstrip("0")
