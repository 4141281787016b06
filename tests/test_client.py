"""The request on the wire (SPEC section 2), as the test kit's server receives it."""

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lmp_autoreg.identity import name_string
from lmp_autoreg.testing.device import FakeDevice

from conftest import device_args, run_cli


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
    assert pacman["reset_apps"] == '""'
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
