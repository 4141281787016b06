"""The device key and CSR (SPEC section 2), checked against cryptography's own encoders."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lmp_autoreg import identity
from lmp_autoreg.testing.ca import ThrowawayCA


@pytest.mark.parametrize("n", range(20))
def test_key_pem_is_exactly_what_cryptography_writes(n):
    key = identity.new_key()
    expected = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    assert identity.key_to_pem(key) == expected
    loaded = serialization.load_pem_private_key(identity.key_to_pem(key), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()


def test_small_secrets_keep_their_leading_zeros():
    # A secret below 2**248 has a zero first byte: the layout must still be 32 bytes.
    key = ec.derive_private_key(12345, ec.SECP256R1())
    expected = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    assert identity.key_to_pem(key) == expected


def test_other_curves_are_refused():
    with pytest.raises(ValueError, match="P-256"):
        identity.key_to_pem(ec.generate_private_key(ec.SECP384R1()))


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
    cert = identity.load_certificate(ca.sign_csr(csr_pem))
    assert device_key.certifies(cert) and identity.same_public_key(cert, device_key.key)
    other = identity.FileKey.generate()
    assert not other.certifies(cert) and not identity.same_public_key(cert, other.key)
    assert identity.common_name(cert) == uuid
