"""The kit's device gateway (lmp_autoreg.testing.gateway): real HTTPS on 127.0.0.1, the
kit's CA, and a real client certificate signed by it."""

import base64
import email.utils
import http.client
import json
import ssl
import subprocess
import sys
import time

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from lmp_autoreg.testing import RegistrationServer, Reply, ThrowawayCA, ecies
from lmp_autoreg.testing.gateway import ConfigFile, DeviceGateway, not_modified

from conftest import clean_env

UUID = "d0c0ffee-0000-4000-8000-000000000001"


def make_device(ca: ThrowawayCA, uuid: str, tmp_path) -> tuple[ec.EllipticCurvePrivateKey,
                                                                 ssl.SSLContext]:
    """A device key, its certificate from ``ca``, and a TLS context that presents them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uuid),
                                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                       "acme")]))
           .sign(key, hashes.SHA256()))
    cert = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM).decode())
    (tmp_path / f"{uuid}.pem").write_text(cert)
    (tmp_path / f"{uuid}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return key, context(ca, tmp_path, uuid)


def context(ca: ThrowawayCA, tmp_path, uuid: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.cert_pem)
    if uuid is not None:
        ctx.load_cert_chain(tmp_path / f"{uuid}.pem", tmp_path / f"{uuid}.key")
    return ctx


def request(gateway: DeviceGateway, ctx: ssl.SSLContext, method: str = "GET",
            headers: dict | None = None, body: bytes | None = None, timeout: float = 30):
    conn = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=ctx, timeout=timeout)
    try:
        conn.request(method, "/config", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


@pytest.fixture
def ca() -> ThrowawayCA:
    return ThrowawayCA("acme")


@pytest.fixture
def gateway(ca):
    with DeviceGateway(ca) as gw:
        yield gw


def test_config_is_encrypted_to_the_certificates_key(gateway, ca, tmp_path):
    key, ctx = make_device(ca, UUID, tmp_path)
    gateway.set_config(UUID, {"secret": "s3cret\n",
                              "plain": ConfigFile("p\n", ("/usr/share/fioconfig/handlers/x",),
                                                  unencrypted=True)})
    status, body, response = request(gateway, ctx)
    assert status == 200 and response.getheader("Content-Type") == "application/json"
    assert response.getheader("Date")  # fioconfig dates config.encrypted with it
    answer = json.loads(body)
    assert set(answer) == {"secret", "plain"}
    secret = answer["secret"]
    assert secret["Unencrypted"] is False and secret["OnChanged"] == []
    assert "s3cret" not in secret["Value"]
    assert ecies.decrypt(key, base64.b64decode(secret["Value"])) == b"s3cret\n"
    assert answer["plain"] == {"Value": "p\n", "OnChanged": ["/usr/share/fioconfig/handlers/x"],
                               "Unencrypted": True}
    [seen] = gateway.requests
    assert seen.device == UUID and seen.request.method == "GET"


def test_each_device_gets_its_own_config_and_others_the_default(gateway, ca, tmp_path):
    other = "d0c0ffee-0000-4000-8000-000000000002"
    _, mine = make_device(ca, UUID, tmp_path)
    key, theirs = make_device(ca, other, tmp_path)
    gateway.set_config(UUID, {"a": ConfigFile("mine", unencrypted=True)})
    assert request(gateway, theirs)[0] == 204  # no config for it, no default
    gateway.set_config(None, {"b": "default"})
    assert json.loads(request(gateway, mine)[1])["a"]["Value"] == "mine"
    value = json.loads(request(gateway, theirs)[1])["b"]["Value"]
    assert ecies.decrypt(key, base64.b64decode(value)) == b"default"


def test_a_groups_files_go_on_top_of_the_common_ones_to_its_devices(ca, tmp_path):
    grouped, other, own = (f"d0c0ffee-0000-4000-8000-00000000001{i}" for i in range(3))
    groups = {grouped: "line-1", own: "line-1"}
    with DeviceGateway(ca, group_of=groups.get) as gateway:
        plain = {uuid: make_device(ca, uuid, tmp_path)[1] for uuid in (grouped, other, own)}
        gateway.set_group_config("line-1", {"g": ConfigFile("group", unencrypted=True),
                                            "c": ConfigFile("group's c", unencrypted=True)})
        assert set(json.loads(request(gateway, plain[grouped])[1])) == {"g", "c"}
        assert request(gateway, plain[other])[0] == 204
        gateway.set_config(None, {"c": ConfigFile("common", unencrypted=True),
                                  "d": ConfigFile("common d", unencrypted=True)})
        gateway.set_config(own, {"o": ConfigFile("own", unencrypted=True)})

        def values(uuid):
            answer = json.loads(request(gateway, plain[uuid])[1])
            return {name: file["Value"] for name, file in answer.items()}

        assert values(grouped) == {"g": "group", "c": "group's c", "d": "common d"}
        assert values(other) == {"c": "common", "d": "common d"}
        assert values(own) == {"o": "own"}  # a device's own configuration is all it gets


def test_serve_gives_the_devices_of_a_group_its_config_dir(tmp_path):
    """`serve --config-dir D`: D's files to every device, D/groups/G/'s to the devices the
    devices API holds in group G (created here by a PUT, as /sign would)."""
    config = tmp_path / "config"
    (config / "groups" / "line-1").mkdir(parents=True)
    (config / "groups" / "line-2").mkdir(parents=True)
    (config / "common").write_text("every device\n")
    (config / "groups" / "line-1" / "l1").write_text("line 1\n")
    (config / "groups" / "line-2" / "l2").write_text("line 2\n")
    proc = subprocess.Popen([sys.executable, "-m", "lmp_autoreg.testing", "serve", "--port",
                             "0", "--gateway", "--config-dir", str(config), "--state-dir",
                             str(tmp_path / "state"), "--devices-api", "--api-token", "t"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), stdin=subprocess.DEVNULL)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        assert lines[2].startswith("api: http://") and lines[3].startswith("gateway: https://")
        api, port = lines[2][5:].strip(), int(lines[3].rsplit(":", 1)[1])
        served = ThrowawayCA.load_or_create(tmp_path / "state", "acme")
        key, ctx = make_device(served, UUID, tmp_path)
        put = requests.put(api, json={"client.pem": (tmp_path / f"{UUID}.pem").read_text(),
                                      "group": "line-1"}, headers={"OSF-TOKEN": "t"}, timeout=30)
        assert put.status_code == 201
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
        conn.request("GET", "/config")
        answer = json.loads(conn.getresponse().read())
        assert sorted(answer) == ["common", "l1"]
        assert ecies.decrypt(key, base64.b64decode(answer["l1"]["Value"])) == b"line 1\n"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_304_when_if_modified_since_is_not_older(gateway, ca, tmp_path):
    _, ctx = make_device(ca, UUID, tmp_path)
    gateway.set_config(UUID, {"a": "b"})
    now = time.time()
    later = email.utils.formatdate(now + 5, usegmt=True).replace("GMT", "UTC")
    older = email.utils.formatdate(now - 5, usegmt=True).replace("GMT", "UTC")
    assert request(gateway, ctx, headers={"If-Modified-Since": later})[0] == 304
    assert request(gateway, ctx, headers={"If-Modified-Since": older})[0] == 200
    assert request(gateway, ctx, headers={"If-Modified-Since": "garbage"})[0] == 200


def test_patch_is_recorded_and_answered_201(gateway, ca, tmp_path):
    _, ctx = make_device(ca, UUID, tmp_path)
    data = {"reason": "Set initial fioconfig device data",
            "files": [{"name": "wireguard-client", "value": "enabled=0", "unencrypted": True}]}
    status, _, _ = request(gateway, ctx, "PATCH", {"Content-Type": "application/json"},
                           json.dumps(data).encode())
    assert status == 201
    [patch] = gateway.patches
    assert patch.device == UUID and patch.request.json == data


def test_a_device_without_a_certificate_or_of_another_ca_is_refused(gateway, ca, tmp_path):
    # Refused in the handshake (TLS 1.3: the alert arrives with the first read, or the
    # connection is closed before it is read).
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(gateway, context(ca, tmp_path, None))
    _, stranger = make_device(ThrowawayCA("acme"), UUID, tmp_path)
    stranger.load_verify_locations(cadata=ca.cert_pem)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(gateway, stranger)
    assert gateway.requests == []


def test_fault_knobs(gateway, ca, tmp_path):
    _, ctx = make_device(ca, UUID, tmp_path)
    gateway.enqueue(Reply.error(503, "busy"), Reply(close=True), Reply.hang(30))
    assert request(gateway, ctx)[:2] == (503, b"busy")
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        request(gateway, ctx)
    with pytest.raises(TimeoutError):
        request(gateway, ctx, timeout=0.5)
    assert request(gateway, ctx)[0] == 204  # the queue is spent
    assert len(gateway.wait_for(4)) == 4


def test_not_listening_refuses_connections(ca, tmp_path):
    _, ctx = make_device(ca, UUID, tmp_path)
    with DeviceGateway(ca, listening=False) as gone, pytest.raises(ConnectionRefusedError):
        request(gone, ctx)


def test_registration_names_the_gateway_in_sota_toml(tmp_path):
    import tomllib
    import urllib.request

    with RegistrationServer(gateway=DeviceGateway) as server:
        key = ec.generate_private_key(ec.SECP256R1())
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, UUID),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                           "acme")]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
        body = json.dumps({"csr": csr, "hardware-id": "hw"}).encode()
        post = urllib.request.Request(server.url, data=body, method="POST",
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=30) as answer:
            files = json.load(answer)
        assert tomllib.loads(files["sota.toml"])["tls"]["server"] == server.gateway.url
        # ... and that gateway takes the certificate the registration gave.
        (tmp_path / f"{UUID}.pem").write_text(files["client.pem"])
        (tmp_path / f"{UUID}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        assert request(server.gateway, context(server.ca, tmp_path, UUID))[0] == 204


def test_serve_gateway_prints_its_url_and_serves_the_config_dir(tmp_path, ca):
    config = tmp_path / "config"
    (config / "sub").mkdir(parents=True)
    (config / "sub" / "f").write_text("from the dir\n")
    proc = subprocess.Popen([sys.executable, "-m", "lmp_autoreg.testing", "serve", "--port",
                             "0", "--gateway", "--config-dir", str(config), "--state-dir",
                             str(tmp_path / "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(), stdin=subprocess.DEVNULL)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("url: ") and lines[2].startswith("gateway: https://")
        port = int(lines[2].rsplit(":", 1)[1])
        served = ThrowawayCA.load_or_create(tmp_path / "state", "acme")
        key, ctx = make_device(served, UUID, tmp_path)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
        conn.request("GET", "/config")
        answer = json.loads(conn.getresponse().read())
        value = base64.b64decode(answer["sub/f"]["Value"])
        assert ecies.decrypt(key, value) == b"from the dir\n"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.props
@given(offset=st.integers(-10**6, 10**6))
def test_not_modified_compares_whole_seconds(offset):
    modified = 1_700_000_000.7
    header = email.utils.formatdate(1_700_000_000 + offset, usegmt=True).replace("GMT", "UTC")
    assert not_modified(header, modified) == (offset >= 0)


@pytest.mark.props
@given(header=st.text(max_size=40))
def test_not_modified_never_crashes_on_a_header(header):
    assert not_modified(header, 0.0) in (True, False)
