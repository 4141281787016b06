"""The request on the wire (docs/spec.md section 2), as the test kit's server receives it."""

import http.client

import pytest
import requests
import urllib3
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lmp_autoreg.client import request_failure
from lmp_autoreg.errors import NoAnswer, Unreachable
from lmp_autoreg.identity import name_string
from lmp_autoreg.testing.device import FakeDevice

from conftest import clean_env, device_args, run_cli


def csr_of(request) -> x509.CertificateSigningRequest:
    return x509.load_pem_x509_csr(request.json["csr"].encode())


def test_body_matches_the_spec_example(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "image", token=None).build()
    run = run_cli(*device_args(device, registration_server, "--production"))
    assert run.returncode == 0, run.stderr
    [request] = registration_server.requests
    body = dict(request.json)
    uuid = body.pop("uuid")
    csr = body.pop("csr")
    assert body == {
        "use-ostree-server": "true",
        "sota-config-dir": "/var/sota",
        "hardware-id": "intel-corei7-64",
        "name": uuid,
        "overrides": {
            "pacman": {
                "type": '"ostree+compose_apps"',
                "compose_apps_root": '"/var/sota/compose-apps"',
                "compose_apps": '"app1,app2"',
                "reset_apps_root": '"/var/sota/reset-apps"',
                "reset_apps": '" "',  # restorable apps on, for every app, by default
                "tags": '"main"',
            }
        },
    }
    assert csr.startswith("-----BEGIN CERTIFICATE REQUEST-----\n")
    assert request.headers["Content-Type"] == "application/json"
    assert "OSF-TOKEN" not in request.headers
    parsed = csr_of(request)
    assert parsed.is_signature_valid
    assert name_string(parsed.subject) == f"businessCategory=production,OU=acme,CN={uuid}"
    assert parsed.signature_hash_algorithm is not None
    assert parsed.signature_hash_algorithm.name == "sha256"
    usage = parsed.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_encipherment
    eku = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert parsed.public_key().curve.name == "secp256r1"


def test_optional_fields(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "dev", apps=()).build()
    (device.sota / "reset-apps").mkdir()
    registration_server.accept_group = True  # as the Foundries API does
    run = run_cli(*device_args(device, registration_server, "--device-group", "lab",
                               "--name", "jig-7", "--uuid", "11111111-2222-4333-8444-555555555555",
                               "--api-token-header", "X-Custom-Token"))
    assert run.returncode == 0, run.stderr
    [request] = registration_server.requests
    body = request.json
    assert body["group"] == "lab" and body["name"] == "jig-7"
    assert body["uuid"] == "11111111-2222-4333-8444-555555555555"
    pacman = body["overrides"]["pacman"]
    assert "compose_apps" not in pacman  # no apps found: all apps
    assert pacman["reset_apps"] == '" "'  # the reset-apps directory changes nothing
    assert request.headers["X-Custom-Token"] == "not-a-real-token"
    assert "OSF-TOKEN" not in request.headers
    subject = csr_of(request).subject
    assert subject.get_attributes_for_oid(NameOID.BUSINESS_CATEGORY) == []


def test_restorable_apps_and_quoting(device_root, registration_server):
    run = run_cli(*device_args(device_root, registration_server, "--restorable-apps", "app1",
                               "--tag", 'odd"tag'))
    assert run.returncode == 0, run.stderr
    pacman = registration_server.requests[0].json["overrides"]["pacman"]
    assert pacman["reset_apps"] == '"app1"'
    assert pacman["tags"] == '"odd\\"tag"'


def test_restorable_apps_off(device_root, registration_server):
    run = run_cli(*device_args(device_root, registration_server, "--restorable-apps", ""))
    assert run.returncode == 0, run.stderr
    run = run_cli(*device_args(device_root, registration_server, "--force"),
                  env=clean_env(RESTORABLE_APPS=""))
    assert run.returncode == 0, run.stderr
    for request in registration_server.requests:
        pacman = request.json["overrides"]["pacman"]
        assert "reset_apps" not in pacman and pacman["reset_apps_root"]


URL = "https://192.0.2.1/sign"
REFUSED = ConnectionRefusedError(111, "Connection refused")


@pytest.mark.parametrize(("error", "kind", "message"), [
    (requests.exceptions.ConnectTimeout("t"), Unreachable, f"cannot reach {URL} within 2.5 s"),
    (requests.exceptions.ConnectionError(REFUSED), Unreachable,
     f"cannot reach {URL}: [Errno 111] Connection refused"),
    (requests.exceptions.ReadTimeout("t"), NoAnswer, f"no answer from {URL} within 2.5 s"),
    (requests.exceptions.ConnectionError(urllib3.exceptions.ProtocolError(
        "Connection aborted.", http.client.RemoteDisconnected("Remote end closed"))),
     NoAnswer, f"{URL} hung up without an answer: Remote end closed"),
    (requests.exceptions.SSLError("certificate verify failed"), NoAnswer,
     f"TLS certificate check of {URL} failed: certificate verify failed "
     "(for a private CA, pass --cacert)"),
    (requests.exceptions.ChunkedEncodingError("bad chunk"), NoAnswer,
     f"broken answer from {URL}: bad chunk"),
])
def test_a_request_error_is_unreachable_only_without_a_connection(error, kind, message):
    failure = request_failure(error, URL, 2.5, True)
    assert type(failure) is kind and str(failure) == message


def test_the_cacert_hint_is_left_out_when_a_cacert_is_given():
    error = requests.exceptions.SSLError("certificate verify failed")
    failure = request_failure(error, URL, 2.5, "/etc/ca.pem")
    assert str(failure) == f"TLS certificate check of {URL} failed: certificate verify failed"
