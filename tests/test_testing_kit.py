"""Tests of the public test kit itself: CA, loopback server, fake device, pytest plugin.

The fixtures used here come from the plugin registered by the package's ``pytest11``
entry point; nothing in the test tree registers it again.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lmp_autoreg.testing import (
    FakeDevice,
    RecordedRequest,
    RegistrationServer,
    Reply,
    ThrowawayCA,
    populate,
)

TIMEOUT = 5.0


def make_csr(
    uuid: str, factory: str | None = "acme", production: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, uuid)]
    if factory is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory))
    if production:
        attrs.append(x509.NameAttribute(NameOID.BUSINESS_CATEGORY, "production"))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def make_body(uuid: str | None = None, factory: str | None = "acme", **extra: Any) -> dict:
    uuid = uuid or str(uuidlib.uuid4())
    _, csr = make_csr(uuid, factory)
    body: dict[str, Any] = {
        "use-ostree-server": "true",
        "sota-config-dir": "/var/sota",
        "hardware-id": "intel-corei7-64",
        "name": uuid,
        "uuid": uuid,
        "csr": csr,
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
    body.update(extra)
    return body


def post(server: RegistrationServer, body: dict | None = None, **kwargs: Any) -> requests.Response:
    kwargs.setdefault("timeout", TIMEOUT)
    return requests.post(server.url, json=make_body() if body is None else body, **kwargs)


def public_bytes(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def subject_value(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    value = cert.subject.get_attributes_for_oid(oid)[0].value
    assert isinstance(value, str)
    return value


# -- ThrowawayCA ----------------------------------------------------------------------


def test_ca_has_a_root_and_an_intermediate_of_the_factory(tmp_path: Path) -> None:
    ca = ThrowawayCA("kit")
    root = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    middle = x509.load_pem_x509_certificate(ca.intermediate_pem.encode())
    assert root.subject == root.issuer
    assert subject_value(root, NameOID.COMMON_NAME) == "Factory-CA"
    assert subject_value(middle, NameOID.COMMON_NAME) == "local-ca"
    for cert in (root, middle):
        assert subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == "kit"
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.not_valid_before_utc.timestamp() < time.time() - 3600
        assert cert.not_valid_after_utc.timestamp() > time.time() + 700 * 86400
    root.verify_directly_issued_by(root)
    middle.verify_directly_issued_by(root)
    written = ca.write_ca(tmp_path / "ca.pem")
    assert written.read_text() == ca.cert_pem


def test_ca_signs_csr_with_its_intermediate_and_the_uuid_as_serial() -> None:
    ca = ThrowawayCA()
    uuid = str(uuidlib.uuid4())
    key, csr = make_csr(uuid, "acme", production=True)
    cert = x509.load_pem_x509_certificate(ca.sign_csr(csr).encode())
    cert.verify_directly_issued_by(ca.intermediate)
    assert cert.issuer == ca.intermediate.subject
    assert cert.serial_number == uuidlib.UUID(uuid).int
    assert subject_value(cert, NameOID.COMMON_NAME) == uuid
    assert subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == "acme"
    assert subject_value(cert, NameOID.BUSINESS_CATEGORY) == "production"
    assert public_bytes(cert.public_key()) == public_bytes(key.public_key())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == 7300


def test_ca_sign_csr_can_replace_ou_and_rejects_garbage() -> None:
    ca = ThrowawayCA()
    _, csr = make_csr(str(uuidlib.uuid4()), "acme")
    cert = x509.load_pem_x509_certificate(ca.sign_csr(csr, ou="other").encode())
    assert [
        a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ] == ["other"]
    with pytest.raises(ValueError):
        ca.sign_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"
        )
    with pytest.raises(ValueError, match="not a uuid"):
        ca.sign_csr(make_csr("not-a-uuid")[1])


def test_ca_cert_for_other_key_has_uuid_but_unrelated_key() -> None:
    ca = ThrowawayCA()
    key, _ = make_csr("u-2")
    cert = x509.load_pem_x509_certificate(ca.cert_for_other_key("u-2", ou="acme").encode())
    cert.verify_directly_issued_by(ca.intermediate)
    assert subject_value(cert, NameOID.COMMON_NAME) == "u-2"
    assert subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == "acme"
    assert public_bytes(cert.public_key()) != public_bytes(key.public_key())


def test_ca_cert_for_key_with_other_cn_keeps_the_key() -> None:
    ca = ThrowawayCA()
    key, _ = make_csr("u-3")
    other = str(uuidlib.uuid4())
    cert = x509.load_pem_x509_certificate(
        ca.cert_for_key_with_other_cn(key.public_key(), other).encode()
    )
    cert.verify_directly_issued_by(ca.intermediate)
    assert subject_value(cert, NameOID.COMMON_NAME) == other
    assert cert.serial_number == uuidlib.UUID(other).int
    assert public_bytes(cert.public_key()) == public_bytes(key.public_key())


def test_ca_saved_to_a_directory_is_the_same_ca_when_loaded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ThrowawayCA.load_or_create(state, "acme")
    assert state.stat().st_mode & 0o777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
    assert modes == {
        "factory_ca.key": 0o600,
        "local-ca.key": 0o600,
        "factory_ca.pem": 0o644,
        "local-ca.pem": 0o644,
    }
    again = ThrowawayCA.load_or_create(state, "acme")
    assert again.cert_pem == first.cert_pem == (state / "factory_ca.pem").read_text()
    assert again.intermediate_pem == first.intermediate_pem
    _, csr = make_csr(str(uuidlib.uuid4()))
    cert = x509.load_pem_x509_certificate(again.sign_csr(csr).encode())
    cert.verify_directly_issued_by(first.intermediate)


def test_ca_directory_of_another_factory_or_half_a_ca_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ThrowawayCA.load_or_create(state, "acme")
    with pytest.raises(ValueError, match="factory 'acme', not 'other'"):
        ThrowawayCA.load_or_create(state, "other")
    (state / "local-ca.key").unlink()
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    with pytest.raises(ValueError, match="local-ca.key missing"):
        ThrowawayCA.load_or_create(state, "acme")
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before


def test_ca_server_cert_has_ip_and_dns_names() -> None:
    ca = ThrowawayCA()
    cert_pem, key_pem = ca.server_cert(("127.0.0.1", "localhost", "::1"))
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert public_bytes(cert.public_key()) == public_bytes(key.public_key())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku


# -- the normal answer ----------------------------------------------------------------


def test_201_answer_carries_a_certificate_for_the_csr(
    registration_server: RegistrationServer,
) -> None:
    uuid = str(uuidlib.uuid4())
    key, csr = make_csr(uuid, "acme")
    body = make_body(uuid)
    body["csr"] = csr
    answer = post(registration_server, body)
    assert answer.status_code == 201
    assert answer.headers["Content-Type"] == "application/json"
    files = answer.json()
    ca = registration_server.ca
    assert set(files) == {"root.crt", "client.pem", "client.chained", "sota.toml"}
    assert files["root.crt"] == ca.cert_pem
    assert files["client.chained"] == files["client.pem"] + "\n" + ca.intermediate_pem
    cert = x509.load_pem_x509_certificate(files["client.pem"].encode())
    cert.verify_directly_issued_by(ca.intermediate)
    assert cert.serial_number == uuidlib.UUID(uuid).int
    assert subject_value(cert, NameOID.COMMON_NAME) == uuid
    assert subject_value(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == "acme"
    assert public_bytes(cert.public_key()) == public_bytes(key.public_key())
    assert registration_server.registered == {uuid: files["client.pem"]}


def test_sota_toml_has_the_reference_sections_and_the_overrides(
    registration_server: RegistrationServer,
) -> None:
    body = make_body(**{"hardware-id": "rpi4", "sota-config-dir": "/var/sota"})
    body["overrides"]["extra"] = {"answer": "42"}
    text = post(registration_server, body).json()["sota.toml"]
    toml = tomllib.loads(text)
    assert list(toml) == ["tls", "provision", "uptane", "pacman", "storage", "import", "extra"]
    gateway = registration_server.gateway
    assert gateway is not None  # the fixture's server has one; sota.toml sends devices there
    assert toml["tls"] == {
        "server": gateway.url,
        "ca_source": "file",
        "pkey_source": "file",
        "cert_source": "file",
    }
    assert toml["provision"] == {"server": gateway.url, "primary_ecu_hardware_id": "rpi4"}
    assert toml["uptane"] == {"repo_server": f"{gateway.url}/repo", "key_source": "file"}
    assert toml["pacman"] == {
        "type": "ostree+compose_apps",
        "ostree_server": "https://ostree.foundries.io:8443/ostree",
        "compose_apps_root": "/var/sota/compose-apps",
        "compose_apps": "app1,app2",
        "reset_apps_root": "/var/sota/reset-apps",
        "tags": "main",
    }
    assert toml["storage"] == {"type": "sqlite", "path": "/var/sota/"}
    assert toml["import"] == {
        "tls_cacert_path": "/var/sota/root.crt",
        "tls_pkey_path": "/var/sota/pkey.pem",
        "tls_clientcert_path": "/var/sota/client.pem",
    }
    assert toml["extra"] == {"answer": 42}
    assert "[pacman]\ntype = \"ostree+compose_apps\"\n" in text  # pasted in place, verbatim


def test_sota_toml_empty_override_is_a_comment_and_the_file_stays_toml(
    registration_server: RegistrationServer,
) -> None:
    body = make_body()
    body["overrides"]["tls"] = {"pkey_source": '"pkcs11"', "cert_source": '"pkcs11"'}
    body["overrides"]["storage"] = {"tls_pkey_path": "", "tls_clientcert_path": ""}
    body["overrides"]["import"] = {"tls_pkey_path": "", "tls_clientcert_path": '""'}
    text = post(registration_server, body).json()["sota.toml"]
    toml = tomllib.loads(text)
    assert "# tls_pkey_path is not set\n" in text
    assert "# tls_clientcert_path is not set\n" in text
    assert toml["tls"]["pkey_source"] == toml["tls"]["cert_source"] == "pkcs11"
    assert toml["storage"] == {"type": "sqlite", "path": "/var/sota/"}
    assert toml["import"] == {"tls_cacert_path": "/var/sota/root.crt", "tls_clientcert_path": ""}


def test_sota_toml_without_overrides_in_another_sota_dir(
    registration_server: RegistrationServer,
) -> None:
    body = make_body(**{"use-ostree-server": "false", "sota-config-dir": "/data/sota"})
    del body["overrides"]
    toml = tomllib.loads(post(registration_server, body).json()["sota.toml"])
    assert toml["pacman"]["ostree_server"] == "https://ostree.foundries.io:8443/ostree"
    assert toml["storage"]["path"] == "/data/sota/"
    assert toml["import"]["tls_clientcert_path"] == "/data/sota/client.pem"


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"csr": None}, 400, "Missing required field 'csr'"),
        ({"csr": ""}, 400, "Missing required field 'csr'"),
        ({"csr": ["x"]}, 400, "Invalid data type for 'csr'"),
        ({"hardware-id": None}, 400, "Missing required field 'hardware-id'"),
        ({"hardware-id": ""}, 400, "Missing required field 'hardware-id'"),
        ({"csr": "not a csr"}, 400, "Unable to load PEM file"),
        ({"group": "lab"}, 400, "Registration-reference does not support 'group' field"),
        ({"overrides": {"pacman": {"tags": 1}}}, 500, "Internal Server Error"),
        ({"overrides": ["x"]}, 500, "Internal Server Error"),
    ],
)
def test_malformed_requests_are_refused_in_the_reference_words(
    registration_server: RegistrationServer, change: dict, status: int, message: str
) -> None:
    body = {k: v for k, v in {**make_body(), **change}.items() if v is not None}
    answer = post(registration_server, body)
    assert answer.status_code == status
    assert answer.text.startswith(message)
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert registration_server.registered == {}


def test_uuid_comes_from_the_csr_which_must_name_a_uuid(
    registration_server: RegistrationServer,
) -> None:
    uuid = str(uuidlib.uuid4())
    body = make_body(uuid)
    body["uuid"] = "ignored"  # the reference server reads the uuid from the CSR only
    assert post(registration_server, body).status_code == 201
    assert list(registration_server.registered) == [uuid]
    refused = post(registration_server, make_body("not-a-uuid"))
    assert refused.status_code == 400
    assert "not a uuid" in refused.text


@pytest.mark.parametrize("body", [b"{nope", b"{}", b"[]", b"[1]"])
def test_json_bodies_the_reference_server_cannot_use(
    registration_server: RegistrationServer, body: bytes
) -> None:
    answer = requests.post(
        registration_server.url,
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    expected = {b"{nope": 400, b"{}": 400, b"[]": 400, b"[1]": 500}[body]
    assert answer.status_code == expected
    if body in (b"{}", b"[]"):
        assert answer.text == "Missing request body"


def test_a_request_that_is_not_json_gets_415(registration_server: RegistrationServer) -> None:
    good = json.dumps(make_body()).encode()
    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-json"}):
        for body in (good, b"{nope"):  # the type is checked before the body is read as JSON
            answer = requests.post(registration_server.url, data=body, headers=headers,
                                   timeout=TIMEOUT)
            assert answer.status_code == 415, (headers, body)
    typed = {"Content-Type": "application/json; charset=utf-8"}
    assert requests.post(registration_server.url, data=good, headers=typed, timeout=TIMEOUT).ok
    # A structured type of JSON is JSON (RFC 6839), as the Foundries API takes it.
    suffixed = {"Content-Type": "application/vnd.foundries.device+json"}
    answer = requests.post(registration_server.url, data=json.dumps(make_body()).encode(),
                           headers=suffixed, timeout=TIMEOUT)
    assert answer.status_code == 201, answer.text
    assert len(registration_server.registered) == 2


def test_content_type_check_can_be_turned_off() -> None:
    with RegistrationServer(check_content_type=False) as server:
        answer = requests.post(server.url, data=json.dumps(make_body()), timeout=TIMEOUT)
    assert answer.status_code == 201


def test_head_answers_405_and_is_recorded_but_takes_no_scripted_reply(
    registration_server: RegistrationServer,
) -> None:
    registration_server.enqueue(Reply(status=503))
    head = requests.head(registration_server.url, timeout=TIMEOUT)
    assert head.status_code == 405
    assert head.headers["Allow"] == "POST"
    assert post(registration_server).status_code == 503  # the scripted reply was kept
    assert [r.method for r in registration_server.requests] == ["HEAD", "POST"]
    assert [r.method for r in registration_server.posts] == ["POST"]
    other = registration_server.url.replace("/sign", "/other")
    assert requests.head(other, timeout=TIMEOUT).status_code == 404


def test_head_status_is_a_knob() -> None:
    with RegistrationServer(head_status=503) as server:
        assert requests.head(server.url, timeout=TIMEOUT).status_code == 503
        assert post(server).status_code == 201


def test_wrong_path_and_method(registration_server: RegistrationServer) -> None:
    other = registration_server.url.replace("/sign", "/other")
    assert requests.post(other, json=make_body(), timeout=TIMEOUT).status_code == 404
    assert requests.get(registration_server.url, timeout=TIMEOUT).status_code == 405
    put = requests.put(registration_server.url, json=make_body(), timeout=TIMEOUT)
    assert put.status_code == 405


def test_custom_path() -> None:
    with RegistrationServer(path="/ota/devices/") as server:
        assert server.url.endswith("/ota/devices/")
        assert post(server).status_code == 201


# -- checks -----------------------------------------------------------------------------


def test_token_is_required_when_configured() -> None:
    with RegistrationServer(token="s3cret") as server:
        missing = post(server)
        wrong = post(server, headers={"OSF-TOKEN": "guess"})
        right = post(server, headers={"osf-token": "s3cret"})
    assert missing.status_code == 401
    assert "OSF-TOKEN" in missing.text
    assert wrong.status_code == 401
    assert right.status_code == 201


def test_token_header_name_is_configurable() -> None:
    with RegistrationServer(token="s3cret", token_header="X-Custom") as server:
        assert post(server, headers={"OSF-TOKEN": "s3cret"}).status_code == 401
        assert post(server, headers={"X-Custom": "s3cret"}).status_code == 201


def test_factory_is_the_ou_of_the_csr_by_default(registration_server: RegistrationServer) -> None:
    wrong = post(registration_server, make_body(factory="other"))
    none = post(registration_server, make_body(factory=None))
    right = post(registration_server, make_body(factory="acme"))
    assert (wrong.status_code, wrong.text) == (400, "Invalid factory(other) must be acme")
    assert wrong.headers["Content-Type"].startswith("text/plain")
    assert none.status_code == 500  # the reference server fails on a CSR without OU
    assert right.status_code == 201


def test_factory_check_follows_the_factory_or_can_be_turned_off() -> None:
    with RegistrationServer(factory="other") as server:
        assert post(server, make_body(factory="other")).status_code == 201
        assert post(server, make_body(factory="acme")).text == "Invalid factory(acme) must be other"
    with RegistrationServer(factory=None) as server:
        assert post(server, make_body(factory="anything")).status_code == 201


def test_group_is_accepted_with_the_knob() -> None:
    with RegistrationServer(accept_group=True) as server:
        assert post(server, make_body(group="lab")).status_code == 201
    with RegistrationServer() as server:
        assert post(server, make_body(group="")).status_code == 201  # empty is no group


def test_duplicates_are_rejected_only_when_asked(
    registration_server: RegistrationServer,
) -> None:
    body = make_body()
    assert post(registration_server, body).status_code == 201
    assert post(registration_server, body).status_code == 201
    registration_server.reject_duplicates = True
    again = post(registration_server, body)
    assert again.status_code == 409
    assert again.text == "Device already exists"
    assert post(registration_server, make_body()).status_code == 201


# -- recorded requests -------------------------------------------------------------------


def test_requests_are_recorded(registration_server: RegistrationServer) -> None:
    body = make_body()
    before = time.monotonic()
    post(registration_server, body, headers={"OSF-TOKEN": "t0k"})
    requests.post(registration_server.url, data=b"raw bytes", timeout=TIMEOUT)
    first, second = registration_server.requests
    assert isinstance(first, RecordedRequest)
    assert (first.method, first.path) == ("POST", "/sign")
    assert first.json == body
    assert first.body.startswith(b"{")
    assert first.headers["osf-token"] == "t0k"
    assert first.headers["OSF-Token"] == "t0k"
    assert "OSF-TOKEN" in list(first.headers)
    assert first.headers["content-type"] == "application/json"
    assert before <= first.time <= second.time <= time.monotonic()
    assert second.json is None
    assert second.body == b"raw bytes"


def test_requests_are_recorded_from_parallel_clients(
    registration_server: RegistrationServer,
) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        status = post(registration_server).status_code
        with lock:
            results.append(status)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert results == [201] * 8
    assert len(registration_server.requests) == 8
    assert len(registration_server.registered) == 8


# -- Reply knobs ---------------------------------------------------------------------------


def test_scripted_replies_are_used_once_each_in_order(
    registration_server: RegistrationServer,
) -> None:
    registration_server.enqueue(Reply(status=503), Reply(status=502))
    first, second, third = (post(registration_server) for _ in range(3))
    assert (first.status_code, first.text) == (503, "Service Unavailable")
    assert second.status_code == 502
    assert third.status_code == 201
    assert len(registration_server.requests) == 3


def test_default_reply_can_be_replaced(registration_server: RegistrationServer) -> None:
    registration_server.default = Reply(status=500)
    registration_server.enqueue(Reply())
    assert post(registration_server).status_code == 201
    assert post(registration_server).status_code == 500
    assert post(registration_server).status_code == 500


def test_delay_outlasts_a_client_timeout(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply(delay=600))
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(registration_server, timeout=0.3)
    assert post(registration_server).status_code == 201  # the held answer blocks no other
    assert len(registration_server.posts) == 2


def test_delay_delivers_the_normal_answer_late(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply.hang(0.4))
    started = time.monotonic()
    answer = post(registration_server)
    assert answer.status_code == 201
    assert time.monotonic() - started >= 0.4


def test_raw_body_and_headers(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(
        Reply(status=429, body="slow down", headers={"Retry-After": "7"}),
        Reply(status=201, body=b"\x00\x01", headers={"Content-Type": "application/octet-stream"}),
    )
    limited = post(registration_server)
    binary = post(registration_server)
    assert (limited.status_code, limited.text) == (429, "slow down")
    assert limited.headers["Retry-After"] == "7"
    assert limited.headers["Content-Type"].startswith("text/plain")
    assert binary.content == b"\x00\x01"
    assert binary.headers["Content-Type"] == "application/octet-stream"


def test_files_edit_changes_the_normal_answer(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply(files=lambda f: {**f, "sota.toml": "", "extra.txt": "hi"}))
    files = post(registration_server).json()
    assert files["sota.toml"] == ""
    assert files["extra.txt"] == "hi"
    assert files["client.pem"].startswith("-----BEGIN CERTIFICATE-----")


def test_checks_still_apply_to_a_scripted_2xx_reply() -> None:
    with RegistrationServer(token="s3cret") as server:
        server.enqueue(Reply(files=lambda f: {}))
        assert post(server).status_code == 401


def test_truncate_breaks_the_body(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply(truncate=10))
    with pytest.raises(
        (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)
    ):
        post(registration_server)
    assert post(registration_server).status_code == 201


def test_close_hangs_up_without_an_answer(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply(close=True))
    with pytest.raises(requests.exceptions.ConnectionError):
        post(registration_server)
    assert len(registration_server.requests) == 1
    assert post(registration_server).status_code == 201


# -- Reply presets -------------------------------------------------------------------------


def test_preset_error_is_plain_text(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply.error(400, "Invalid factory(x) must be y"))
    answer = post(registration_server)
    assert (answer.status_code, answer.text) == (400, "Invalid factory(x) must be y")
    with pytest.raises(requests.exceptions.JSONDecodeError):
        answer.json()


def test_preset_html_500(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply.html_500())
    answer = post(registration_server)
    assert answer.status_code == 500
    assert answer.headers["Content-Type"].startswith("text/html")
    assert "<html>" in answer.text


def test_preset_not_json(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply.not_json())
    answer = post(registration_server)
    assert answer.status_code == 201
    assert answer.headers["Content-Type"] == "application/json"
    with pytest.raises(requests.exceptions.JSONDecodeError):
        answer.json()


def test_preset_without(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply.without("client.pem", "client.chained"))
    assert set(post(registration_server).json()) == {"root.crt", "sota.toml"}


def test_preset_bad_name(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply.bad_name("../evil"), Reply.bad_name(".hidden", "x"))
    assert post(registration_server).json()["../evil"] == "x\n"
    files = post(registration_server).json()
    assert files[".hidden"] == "x"
    assert "client.pem" in files


def _answer_to_a_csr(server: RegistrationServer, reply: Reply) -> tuple[str, Any, dict, Any]:
    """(uuid, device key, files, client certificate) of ``reply`` to a real CSR; the
    certificate is checked to be the intermediate's."""
    uuid = str(uuidlib.uuid4())
    key, csr = make_csr(uuid)
    body = make_body(uuid)
    body["csr"] = csr
    server.enqueue(reply)
    files = post(server, body).json()
    cert = x509.load_pem_x509_certificate(files["client.pem"].encode())
    cert.verify_directly_issued_by(server.ca.intermediate)
    assert files["client.chained"].startswith(files["client.pem"] + "\n")
    return uuid, key, files, cert


def test_preset_other_key(registration_server: RegistrationServer) -> None:
    uuid, key, _, cert = _answer_to_a_csr(registration_server, Reply.other_key())
    assert subject_value(cert, NameOID.COMMON_NAME) == uuid
    assert public_bytes(cert.public_key()) != public_bytes(key.public_key())


def test_preset_other_cn(registration_server: RegistrationServer) -> None:
    uuid, key, _, cert = _answer_to_a_csr(registration_server, Reply.other_cn())
    other = subject_value(cert, NameOID.COMMON_NAME)
    assert other != uuid
    assert cert.serial_number == uuidlib.UUID(other).int
    assert public_bytes(cert.public_key()) == public_bytes(key.public_key())


def test_preset_truncated(registration_server: RegistrationServer) -> None:
    registration_server.enqueue(Reply.truncated())
    with pytest.raises(
        (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)
    ):
        post(registration_server)


# -- life cycle ----------------------------------------------------------------------------


def test_a_server_without_listen_refuses_until_it_is_told() -> None:
    with RegistrationServer(listen_delay=None) as server:
        with pytest.raises(requests.exceptions.ConnectionError):
            post(server, timeout=TIMEOUT)
        assert not server.listening.is_set() and server.listening_since is None
        server.listen()
        assert server.listening.is_set()
        assert post(server).status_code == 201
        server.listen()  # listening already: nothing changes
        assert len(server.requests) == 1


def test_listen_delay_starts_listening_later() -> None:
    with RegistrationServer(listen_delay=0.3) as server:
        bound = time.monotonic()
        assert server.listening.wait(30)
        assert server.listening_since is not None
        assert server.listening_since - bound >= 0.3 - 0.05  # bound just before `bound`
        assert post(server).status_code == 201


def test_stop_before_listen_delay_never_listens() -> None:
    server = RegistrationServer(listen_delay=3600).start()
    port = server.port
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5.0  # the wait was ended, not joined to its limit
    assert not server.listening.is_set()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_stop_wakes_a_delayed_handler() -> None:
    server = RegistrationServer().start()
    server.enqueue(Reply(delay=600))
    errors: list[BaseException] = []

    def client() -> None:
        try:
            post(server, timeout=60)
        except requests.exceptions.RequestException as error:
            errors.append(error)

    thread = threading.Thread(target=client)
    thread.start()
    server.wait_for(1)
    server.stop()
    thread.join(30)  # the client's own timeout (60 s) would be far later
    assert not thread.is_alive()
    assert len(errors) == 1
    assert not server.ca_file.exists()


def test_wait_for_gives_up_with_a_timeout_error(registration_server: RegistrationServer) -> None:
    requests.head(registration_server.url, timeout=TIMEOUT)
    assert [r.method for r in registration_server.wait_for(1, method="HEAD")] == ["HEAD"]
    with pytest.raises(TimeoutError, match="0 POST requests, not 1"):
        registration_server.wait_for(1, timeout=0.1)


def test_stopped_server_refuses_connections_and_cannot_restart() -> None:
    server = RegistrationServer()
    assert server.ca_file.read_text() == server.ca.cert_pem
    with server:
        url = server.url
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(url, json={}, timeout=1.0)
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()


def test_port_is_unknown_before_start() -> None:
    server = RegistrationServer()
    with pytest.raises(RuntimeError):
        server.url  # noqa: B018 - the property raises
    server.stop()


def test_ipv6_loopback() -> None:
    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    finally:
        probe.close()
    with RegistrationServer(host="::1", tls=True) as server:
        assert server.url.startswith("https://[::1]:")
        assert post(server, verify=str(server.ca_file)).status_code == 201


# -- HTTPS ---------------------------------------------------------------------------------


def test_https_with_the_ca_file(registration_server_tls: RegistrationServer) -> None:
    server = registration_server_tls
    assert server.url.startswith("https://127.0.0.1:")
    answer = post(server, verify=str(server.ca_file))
    assert answer.status_code == 201
    assert answer.json()["root.crt"] == server.ca_file.read_text()


def test_https_without_the_ca_file_fails_verification(
    registration_server_tls: RegistrationServer,
) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        post(registration_server_tls)
    other = ThrowawayCA().write_ca(registration_server_tls.ca_file.with_name("other.pem"))
    with pytest.raises(requests.exceptions.SSLError):
        post(registration_server_tls, verify=str(other))
    assert post(registration_server_tls, verify=str(registration_server_tls.ca_file)).ok
    assert len(registration_server_tls.requests) == 1


def test_https_localhost_name(registration_server_tls: RegistrationServer) -> None:
    url = registration_server_tls.url.replace("127.0.0.1", "localhost")
    verify = str(registration_server_tls.ca_file)
    assert requests.post(url, json=make_body(), verify=verify, timeout=TIMEOUT).status_code == 201


# -- fake devices --------------------------------------------------------------------------


def test_device_root_fixture_builds_on_the_real_disk(
    device_root: FakeDevice, tmp_path: Path
) -> None:
    assert device_root.root == tmp_path / "device"
    os_release = device_root.path("/etc/os-release").read_text()
    assert "ID=lmp\n" in os_release
    assert 'LMP_FACTORY="acme"\n' in os_release
    assert 'LMP_FACTORY_TAG="main"\n' in os_release
    assert 'LMP_MACHINE="intel-corei7-64"\n' in os_release
    assert device_root.path("etc/sota/tag").read_text() == "main\n"
    assert device_root.path("/etc/hostname").read_text() == "device-1\n"
    assert device_root.path("/etc/lmp-device-register-token").read_text() == "not-a-real-token\n"
    assert device_root.path("/etc/lmp-device-register-token").stat().st_mode & 0o777 == 0o600
    assert device_root.sota == tmp_path / "device" / "var" / "sota"
    apps = device_root.sota / "compose-apps"
    assert sorted(p.name for p in apps.iterdir()) == ["app1", "app2"]
    assert "services:" in (apps / "app1" / "docker-compose.yml").read_text()
    assert not device_root.path("/etc/sota/hsm").exists()


def test_fake_device_fixture_builds_in_pyfakefs(fake_device: FakeDevice, fs: Any) -> None:
    assert fake_device.root == Path("/")
    assert fs.exists("/etc/lmp-device-register-token")
    assert Path("/etc/sota/tag").read_text() == "main\n"
    assert sorted(os.listdir("/var/sota/compose-apps")) == ["app1", "app2"]
    assert fake_device.sota == Path("/var/sota")


def test_fake_device_options(tmp_path: Path) -> None:
    hsm = {"HSM_MODULE": "/usr/lib/softhsm/libsofthsm2.so", "HSM_PIN": "1234", "HSM_SOPIN": "5"}
    device = FakeDevice(
        tmp_path,
        factory=None,
        machine="rpi4",
        tag=None,
        hostname=None,
        token=None,
        apps=(),
        quote_os_release=False,
        hsm=hsm,
        sota_dir="/data/sota",
    ).build()
    os_release = device.path("/etc/os-release").read_text()
    assert "LMP_MACHINE=rpi4\n" in os_release
    assert "LMP_FACTORY" not in os_release
    assert '"' not in os_release
    assert not device.path("/etc/sota/tag").exists()
    assert not device.path("/etc/hostname").exists()
    assert not device.path("/etc/lmp-device-register-token").exists()
    assert device.path("/etc/sota/hsm").read_text() == (
        "HSM_MODULE=/usr/lib/softhsm/libsofthsm2.so\nHSM_PIN=1234\nHSM_SOPIN=5\n"
    )
    assert device.sota == tmp_path / "data" / "sota"
    assert list((device.sota / "compose-apps").iterdir()) == []


def test_fake_device_without_tag_file_keeps_tag_in_os_release(tmp_path: Path) -> None:
    device = FakeDevice(tmp_path, tag="devel", tag_file=False).build()
    assert not device.path("/etc/sota/tag").exists()
    assert 'LMP_FACTORY_TAG="devel"' in device.path("/etc/os-release").read_text()


def test_populate_builds_a_tree(tmp_path: Path) -> None:
    populate(tmp_path / "r", {"a": {"b": {"c.txt": "C"}, "empty": None}, "top": "T"})
    assert (tmp_path / "r/a/b/c.txt").read_text() == "C"
    assert (tmp_path / "r/a/empty").is_dir()
    assert list((tmp_path / "r/a/empty").iterdir()) == []
    assert (tmp_path / "r/top").read_text() == "T"
    populate(tmp_path / "r", {"top": "again"})
    assert (tmp_path / "r/top").read_text() == "again"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_populate_rejects_path_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        populate(tmp_path, {name: "x"})


def test_populate_works_in_pyfakefs(fs: Any) -> None:
    populate("/srv/x", {"f": "1", "d": None})
    assert fs.exists("/srv/x/f")
    assert Path("/srv/x/d").is_dir()


# -- servers and pyfakefs together ----------------------------------------------------------


def test_https_server_inside_pyfakefs_needs_the_ca_file_added(
    fake_device: FakeDevice, registration_server_tls: RegistrationServer, fs: Any
) -> None:
    server = registration_server_tls
    fs.add_real_file(server.ca_file)
    answer = post(server, verify=str(server.ca_file))
    assert answer.status_code == 201
    assert fake_device.path("/etc/os-release").exists()


def test_server_created_while_pyfakefs_is_active(fs: Any) -> None:
    with RegistrationServer(tls=True) as server:
        ca_file = server.ca_file
        assert not fs.exists(ca_file)
        fs.pause()
        try:
            assert ca_file.read_text() == server.ca.cert_pem
            assert post(server, verify=str(ca_file)).status_code == 201
        finally:
            fs.resume()
    fs.pause()
    try:
        assert not ca_file.exists()
    finally:
        fs.resume()


# -- plugin ----------------------------------------------------------------------------------


def test_plugin_import_does_not_load_cryptography() -> None:
    code = (
        "import sys, lmp_autoreg.testing.plugin, lmp_autoreg.testing;"
        "assert 'cryptography' not in sys.modules, 'cryptography loaded';"
        "lmp_autoreg.testing.RegistrationServer;"
        "assert 'cryptography' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_plugin_is_registered_by_entry_point(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("lmp_autoreg")
    assert plugin is not None
    assert plugin.__name__ == "lmp_autoreg.testing.plugin"


# -- faithful to the reference server: what the agent sends, what a device gets ---------


def _override_cases() -> list[tuple[str, dict[str, Any]]]:
    apps = {"all-apps": None, "one-app": ("app1",), "two-apps": ("app1", "app2")}
    restorable = {"restorable-default": None, "restorable-off": "", "restorable-all": " ",
                  "restorable-list": "app1,app2"}
    cases = []
    for (a, a_value), (r, r_value), hsm in itertools.product(
        apps.items(), restorable.items(), (False, True)
    ):
        name = "-".join([a, r, "hsm" if hsm else "file-key"])
        cases.append((name, {"apps": a_value, "restorable_apps": r_value, "hsm": hsm}))
    return cases


OVERRIDE_CASES = _override_cases()


@pytest.mark.parametrize("case", [c for _, c in OVERRIDE_CASES], ids=[n for n, _ in OVERRIDE_CASES])
def test_every_override_combination_gives_a_sota_toml_that_parses(
    registration_server: RegistrationServer, device_root: FakeDevice, case: dict[str, Any]
) -> None:
    from lmp_autoreg import client
    from lmp_autoreg.settings import Hsm, resolve

    settings = resolve({"sysroot": str(device_root.root), "device_api": registration_server.url},
                       {})._replace(
        apps=case["apps"],
        restorable_apps=case["restorable_apps"],
        hsm=Hsm("/usr/lib/softhsm/libsofthsm2.so", "1234", "5678") if case["hsm"] else None,
    )
    uuid = str(uuidlib.uuid4())
    body = client.request_body(settings, uuid=uuid, csr=make_csr(uuid)[1])
    answer = requests.post(registration_server.url, json=body,
                           headers=client.request_headers(settings), timeout=TIMEOUT)
    assert answer.status_code == 201, answer.text
    toml = tomllib.loads(answer.json()["sota.toml"])
    assert toml["provision"]["primary_ecu_hardware_id"] == "intel-corei7-64"
    for section, values in body["overrides"].items():
        for key, literal in values.items():
            if literal == "":
                assert key not in toml[section], (section, key)  # "not set": a comment
            else:
                assert toml[section][key] == tomllib.loads(f"v = {literal}")["v"], (section, key)
    if case["hsm"]:
        assert "tls_pkey_path" not in toml["import"]
        assert (toml["tls"]["pkey_source"], toml["tls"]["cert_source"]) == ("pkcs11", "pkcs11")


def test_openssl_verifies_the_installed_chain_against_root_crt(
    tmp_path: Path, registration_server: RegistrationServer, device_root: FakeDevice
) -> None:
    from conftest import device_args, require_tool, run_cli

    openssl = require_tool("openssl")
    run = run_cli(*device_args(device_root, registration_server))
    assert run.returncode == 0, run.stderr
    sota = device_root.sota

    def verify(cafile: Path, *untrusted: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [openssl, "verify", "-CAfile", str(cafile), *untrusted, str(sota / "client.pem")],
            capture_output=True, text=True, timeout=60,
        )

    good = verify(sota / "root.crt", "-untrusted", str(sota / "client.chained"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert good.stdout.strip() == f"{sota / 'client.pem'}: OK"
    # Two levels: the root alone cannot vouch for the device, nor can another factory's root.
    assert verify(sota / "root.crt").returncode != 0
    other = ThrowawayCA().write_ca(tmp_path / "other-root.pem")
    assert verify(other, "-untrusted", str(sota / "client.chained")).returncode != 0


@pytest.mark.parametrize("broken", ["part of a CA", "a devices store that is not JSON"])
def test_a_server_that_cannot_be_made_leaves_no_files_behind(tmp_path, monkeypatch, broken):
    import tempfile

    from lmp_autoreg.testing.ca import ROOT_CERT, ThrowawayCA
    from lmp_autoreg.testing.devices_api import STORE

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    state = tmp_path / "state"
    if broken == "part of a CA":
        state.mkdir()
        (state / ROOT_CERT).write_text("a certificate without its key\n")
    else:
        ThrowawayCA.load_or_create(state)
        (state / STORE).write_text("{not json")
    with pytest.raises(ValueError):
        RegistrationServer(state_dir=state, devices_api=True)
    assert list(temp.iterdir()) == []
