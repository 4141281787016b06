"""HSM mode of the native backend (docs/spec.md section 4), on a real SoftHSM2 token.

The agent runs as a real subprocess against the kit's server, with the token in a private
directory. The key it leaves on the token is then used by OpenSSL, through its PKCS#11
engine, for a real TLS handshake with client-certificate authentication, as aktualizr-lite
uses it.
"""

import os
import socket
import ssl
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from lmp_autoreg import identity
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.server import RegistrationServer, Reply

from conftest import device_args, require_module, require_tool, run_cli
from pausing import AGENT, Paused
from softhsm import MODULE, PIN, SO_PIN, SoftHsm, require_openssl_engine

ANSWER = ["client.chained", "client.pem", "root.crt", "sota.toml"]


@pytest.fixture
def softhsm(tmp_path) -> SoftHsm:
    token = SoftHsm(tmp_path / "softhsm")
    token.init_token()
    return token


@pytest.fixture
def device(tmp_path) -> FakeDevice:
    return FakeDevice(tmp_path / "device", hsm=SoftHsm.settings()).build()


@pytest.fixture
def server():
    with RegistrationServer() as server:
        server.reject_duplicates = True
        yield server


def installed(sota: Path) -> list[str]:
    return sorted(p.name for p in sota.iterdir() if p.is_file() and not p.name.startswith("."))


def token_point(softhsm: SoftHsm) -> str:
    [public] = softhsm.objects()["public_key:tls"]
    return public["point"]


def assert_registered_on_token(softhsm: SoftHsm, sota: Path) -> None:
    """Exactly one key pair and one certificate, with the C++ tool's labels and ids; the
    certificate on the token is client.pem and certifies the token's key."""
    objects = softhsm.objects()
    assert sorted(objects) == ["certificate:client", "private_key:tls", "public_key:tls"]
    [private], [public], [cert] = (objects[n] for n in
                                   ("private_key:tls", "public_key:tls", "certificate:client"))
    assert (private["id"], public["id"], cert["id"]) == ("01", "01", "03")
    assert private["sensitive"] is True and private["extractable"] is False
    assert private["derive"] is True  # fioconfig's ECIES derives with it
    client = identity.load_certificate((sota / "client.pem").read_bytes())
    assert bytes.fromhex(cert["der"]) == client.public_bytes(Encoding.DER)
    point = bytes.fromhex(public["point"])[2:]  # the DER OCTET STRING around the point
    assert client.public_key() == ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), point)


def test_registers_with_the_key_on_the_token(softhsm, device, server):
    run = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert run.returncode == 0, run.stderr
    sota = device.sota
    assert installed(sota) == ANSWER  # no pkey.pem
    assert run.json["files"]["sota.toml"] == "0600"  # it holds the PIN
    assert (sota / "sota.toml").stat().st_mode & 0o777 == 0o600
    config = tomllib.loads((sota / "sota.toml").read_text())
    assert config["p11"] == {"module": MODULE, "pass": PIN, "tls_pkey_id": "01",
                             "tls_clientcert_id": "03"}
    assert_registered_on_token(softhsm, sota)

    [request] = [r for r in server.requests if r.method == "POST"]
    overrides = request.json["overrides"]
    assert overrides["tls"] == {"pkey_source": '"pkcs11"', "cert_source": '"pkcs11"'}
    for section in ("storage", "import"):
        assert overrides[section] == {"tls_pkey_path": "", "tls_clientcert_path": ""}
    csr = x509.load_pem_x509_csr(request.json["csr"].encode())
    assert csr.is_signature_valid  # signed by the token, with its own key
    assert csr.public_key() == identity.load_certificate(
        (sota / "client.pem").read_bytes()).public_key()
    for secret in (PIN, SO_PIN):
        assert secret not in run.stdout + run.stderr
        assert secret.encode() not in request.body
    status = run_cli("status", "--sysroot", str(device.root), "--json", env=softhsm.env)
    assert status.returncode == 0 and status.json["uuid"] == run.json["uuid"]


def test_the_token_csr_is_the_file_key_csr_but_for_key_and_signature(softhsm, device, server):
    run = run_cli(*device_args(device, server, "--production", "--json"), env=softhsm.env)
    assert run.returncode == 0, run.stderr
    [request] = [r for r in server.requests if r.method == "POST"]
    csr = x509.load_pem_x509_csr(request.json["csr"].encode())
    reference = x509.load_pem_x509_csr(identity.make_csr(
        identity.FileKey.generate(), run.json["uuid"], "acme", True).encode())
    assert csr.subject == reference.subject
    assert list(csr.extensions) == list(reference.extensions)
    assert csr.signature_algorithm_oid == reference.signature_algorithm_oid
    assert csr.is_signature_valid


class ClientAuthServer:
    """A loopback TLS server that requires a client certificate from ``ca_pem``; it
    records the peer's subject of the one connection it accepts."""

    def __init__(self, kit: RegistrationServer, ca_pem: str, tmp_path: Path) -> None:
        cert, key = kit.ca.server_cert()
        (tmp_path / "srv.crt").write_text(cert)
        (tmp_path / "srv.key").write_text(key)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cadata=ca_pem)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.peer: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with self.context.wrap_socket(conn, server_side=True) as tls:
                self.peer = tls.getpeercert()
                tls.sendall(b"hello device\n")
                tls.unwrap()
        except (OSError, ssl.SSLError) as e:
            self.error = e
        finally:
            self.listener.close()


def test_openssl_hand_shakes_with_the_token_key(softhsm, device, server, tmp_path):
    openssl = require_tool("openssl")
    require_openssl_engine()
    run = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert run.returncode == 0, run.stderr
    sota = device.sota
    # The device gateway trusts the factory's device CA: its root and the local-ca under it.
    tls = ClientAuthServer(server, (sota / "root.crt").read_text() + server.ca.intermediate_pem,
                           tmp_path)
    pin_file = tmp_path / "pin"  # the PIN reaches OpenSSL through a file, not argv
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, PIN.encode())
    os.close(fd)
    key = f"pkcs11:token=aktualizr;id=%01;type=private?pin-source=file:{pin_file}"
    proc = subprocess.run(
        [openssl, "s_client", "-engine", "pkcs11", "-keyform", "engine", "-key", key,
         "-cert", str(sota / "client.pem"), "-CAfile", str(server.ca_file),
         "-connect", f"127.0.0.1:{tls.port}", "-verify_return_error", "-quiet"],
        input=b"", capture_output=True, timeout=60,
        env={**softhsm.env, "PKCS11_MODULE_PATH": MODULE},
    )
    tls.thread.join(30)
    assert tls.error is None, (tls.error, proc.stderr.decode())
    assert b"hello device" in proc.stdout, proc.stderr.decode()
    assert tls.peer is not None
    subject = dict(item for rdn in tls.peer["subject"] for item in rdn)
    assert subject["commonName"] == run.json["uuid"]


def test_an_uninitialised_token_is_refused_with_how_to_initialise_it(tmp_path, device, server):
    softhsm = SoftHsm(tmp_path / "empty")  # no token initialised
    run = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert run.returncode == 2, run.stderr
    assert "softhsm2-util --init-token --free --label aktualizr" in run.stderr
    assert server.requests == []
    assert installed(device.sota) == []


def test_a_token_without_a_user_pin_gets_one_or_says_how_to_set_it(tmp_path, device, server):
    """With SO PIN but no user PIN, as `pkcs11-tool --init-token` leaves it: a python-pkcs11
    with Session.init_pin sets HSM_PIN with HSM_SOPIN and registers; one without (0.7.0,
    meta-python's) refuses with exit 2 and the command that sets it, and that command
    makes the next run register."""
    pkcs11 = require_module("pkcs11")
    softhsm = SoftHsm(tmp_path / "so-only")
    softhsm.init_token_without_user_pin()
    run = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    if not hasattr(pkcs11.Session, "init_pin"):
        assert run.returncode == 2, run.stderr
        command = (f"pkcs11-tool --module {MODULE} --token-label aktualizr --login "
                   "--login-type so --init-pin")
        assert command in run.json["error"]["message"]
        assert "Traceback" not in run.stderr
        assert server.requests == [] and installed(device.sota) == []
        subprocess.run([*command.split(), "--so-pin", SO_PIN, "--new-pin", PIN],
                       env=softhsm.env, check=True, capture_output=True, timeout=30)
        run = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert run.returncode == 0, run.stderr
    assert_registered_on_token(softhsm, device.sota)  # logs in with HSM_PIN


def test_a_kill_after_key_generation_reuses_the_key(softhsm, device, server, tmp_path):
    args = device_args(device, server, "--json")
    with Paused("before-request", tmp_path / "marker", args, env=softhsm.env) as paused:
        point = token_point(softhsm)  # generated, nothing sent yet
        paused.kill()
    assert installed(device.sota) == []
    run = run_cli(*args, env=softhsm.env)
    assert run.returncode == 0, run.stderr
    assert token_point(softhsm) == point  # the same key, never a second one
    assert_registered_on_token(softhsm, device.sota)


def test_force_replaces_the_key_and_the_certificate(softhsm, device, server):
    first = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert first.returncode == 0, first.stderr
    old = token_point(softhsm)
    again = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert again.returncode == 3, again.stderr
    second = run_cli(*device_args(device, server, "--force", "--json"), env=softhsm.env)
    assert second.returncode == 0, second.stderr
    assert second.json["uuid"] != first.json["uuid"]
    assert token_point(softhsm) != old
    assert_registered_on_token(softhsm, device.sota)  # one key, one certificate: the new


def test_a_failed_force_keeps_the_old_key_and_certificate(softhsm, device, server):
    first = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert first.returncode == 0, first.stderr
    old_point, before = token_point(softhsm), {
        name: (device.sota / name).read_bytes() for name in installed(device.sota)}
    server.default = Reply.error(400, "Invalid factory(acme) must be other")
    run = run_cli(*device_args(device, server, "--force", "--json"), env=softhsm.env)
    assert run.returncode == 4, run.stderr
    assert token_point(softhsm) == old_point
    assert {n: (device.sota / n).read_bytes() for n in installed(device.sota)} == before
    assert_registered_on_token(softhsm, device.sota)
    assert run_cli("status", "--sysroot", str(device.root), env=softhsm.env).returncode == 0


def test_a_key_left_on_the_token_is_replaced_only_with_force(softhsm, device, server):
    first = run_cli(*device_args(device, server), env=softhsm.env)
    assert first.returncode == 0, first.stderr
    for name in installed(device.sota):  # the files are gone; the key is not
        (device.sota / name).unlink()
    run = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert run.returncode == 6, run.stderr
    assert "--force" in run.json["error"]["message"]
    forced = run_cli(*device_args(device, server, "--force"), env=softhsm.env)
    assert forced.returncode == 0, forced.stderr
    assert_registered_on_token(softhsm, device.sota)


def test_the_pin_never_reaches_argv(softhsm, device, server, tmp_path):
    """The agent's own command line holds no PIN: they come from /etc/sota/hsm."""
    args = device_args(device, server)
    with Paused("before-request", tmp_path / "marker", args, env=softhsm.env) as paused:
        cmdline = Path(f"/proc/{paused.pid}/cmdline").read_bytes()
        run = paused.resume()
    assert run.returncode == 0, run.stderr
    assert AGENT[-1].encode() in cmdline
    assert PIN.encode() not in cmdline and SO_PIN.encode() not in cmdline


def test_a_uuid_in_a_slot_description_is_the_device_uuid():
    """As the C++ tool reads it: lower-case hex, the first slot that has one."""
    hsm = require_module("lmp_autoreg.hsm")
    uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert hsm.uuid_in(["SoftHSM slot ID 0x1", f"SE050 {uuid} (secure element)",
                        "0000aaaa-0000-0000-0000-000000000000"]) == uuid
    assert hsm.uuid_in(["SoftHSM slot ID 0x0", uuid.upper()]) is None


def test_a_key_without_a_certificate_is_an_interrupted_attempts_and_replaced(softhsm, device,
                                                                             server):
    """A kill between making the key and saving the identity leaves a bare tls key."""
    tool = require_tool("pkcs11-tool")
    subprocess.run([tool, "--module", MODULE, "--login", "--pin", PIN, "--keypairgen",
                    "--key-type", "EC:prime256v1", "--label", "tls", "--id", "01"],
                   env=softhsm.env, check=True, capture_output=True, timeout=30)
    planted = token_point(softhsm)
    run = run_cli(*device_args(device, server, "--json"), env=softhsm.env)
    assert run.returncode == 0, run.stderr
    assert token_point(softhsm) != planted
    assert_registered_on_token(softhsm, device.sota)
