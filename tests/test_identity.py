"""The device key and CSR (docs/spec.md section 2), checked against cryptography's own encoders."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lmp_autoreg import identity
from lmp_autoreg.errors import BadAnswer
from lmp_autoreg.testing.ca import ThrowawayCA


def test_key_pem_is_unencrypted_pkcs8_of_the_key():
    key = identity.new_key()
    pem = identity.key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, not SEC1
    loaded = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()


def test_file_key_round_trip_and_repr():
    device_key = identity.FileKey.generate()
    again = identity.FileKey.from_pem(device_key.pem)
    assert again.key.private_numbers() == device_key.key.private_numbers()
    assert "PRIVATE" not in repr(device_key) and device_key.pem.decode() not in repr(device_key)
    with pytest.raises(ValueError):
        identity.FileKey.from_pem(b"not a key")


def test_file_key_record_round_trip():
    """What the pending identity keeps of a file key is its PEM, and it reads back."""
    device_key = identity.FILE_KEYS.generate()
    record = device_key.record()
    assert record == device_key.pem.decode("ascii")
    again = identity.FILE_KEYS.load(record)
    assert again.key.private_numbers() == device_key.key.private_numbers()
    assert again.files() == {"pkey.pem": device_key.pem}
    for bad in ("not a key", {"token": "t", "id": "01"}, "caf\u00e9"):
        with pytest.raises(ValueError):
            identity.FILE_KEYS.load(bad)


def test_csr_is_signed_by_the_key_and_the_certificate_checked_against_it():
    ca = ThrowawayCA()
    device_key = identity.FileKey.generate()
    uuid = "11111111-2222-4333-8444-555555555555"
    csr_pem = identity.make_csr(device_key, uuid, "acme", False)
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid and csr.public_key() == device_key.public_key()
    cert_pem = ca.sign_csr(csr_pem)
    cert = identity.check_client_certificate(cert_pem, uuid=uuid,
                                             public_key=device_key.public_key())
    assert identity.common_name(cert) == uuid
    assert identity.check_client_certificate(cert_pem, uuid=uuid, public_key=None) == cert
    other = identity.FileKey.generate()
    with pytest.raises(BadAnswer, match="certifies another key than this device's"):
        identity.check_client_certificate(cert_pem, uuid=uuid, public_key=other.public_key())
    with pytest.raises(BadAnswer, match=r"is for '11111111-.*', not this device \(other\)"):
        identity.check_client_certificate(cert_pem, uuid="other", public_key=None)
    with pytest.raises(BadAnswer, match="not an X.509 certificate"):
        identity.check_client_certificate("not a certificate", uuid=uuid, public_key=None)


@pytest.mark.parametrize("production", [False, True])
def test_csr_is_what_the_device_gateway_expects(production):
    """docs/spec.md section 2: CN uuid, OU factory (and businessCategory=production), two
    critical extensions, keyUsage digitalSignature and extendedKeyUsage clientAuth."""
    uuid = "11111111-2222-4333-8444-555555555555"
    csr = x509.load_pem_x509_csr(
        identity.make_csr(identity.FileKey.generate(), uuid, "acme", production).encode())
    expected = f"OU=acme,CN={uuid}"
    assert identity.name_string(csr.subject) == (
        f"businessCategory=production,{expected}" if production else expected)
    usage = csr.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_encipherment or usage.value.key_cert_sign
                or usage.value.content_commitment or usage.value.key_agreement)
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert len(csr.extensions) == 2
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
