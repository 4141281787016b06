"""The tiny certificate reader (lmp_autoreg.der) agrees with cryptography on real certificates
made by the test kit's CA, and turns anything malformed into ValueError."""

import base64
import datetime as dt
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lmp_autoreg import der, identity
from lmp_autoreg.testing.ca import ThrowawayCA

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


@pytest.fixture(scope="module")
def ca():
    return ThrowawayCA()


def device_cert(ca, *, production=False, factory="acme"):
    csr = identity.make_csr(identity.FileKey.generate(), UUID, factory, production)
    return ca.sign_csr(csr)


def cert_with(ca, attributes, not_after):
    """A certificate signed by the kit's CA with this subject and expiry."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(1990, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(not_after)
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def expected_subject(pem):
    cert = x509.load_pem_x509_certificate(pem.encode())
    return [(a.oid.dotted_string, a.value) for a in cert.subject]


@pytest.mark.parametrize("production", [False, True])
def test_device_certificate_fields_match_cryptography(ca, production):
    pem = device_cert(ca, production=production)
    data = der.pem_to_der(pem)
    assert der.subject(data) == expected_subject(pem)
    cert = identity.load_certificate(pem)
    assert der.not_after(data) == identity.summary(cert)["not_after"]
    assert der.common_name(pem) == der.common_name(pem.encode()) == UUID
    fields = dict(der.subject(data))
    assert fields[der.ORGANIZATIONAL_UNIT] == "acme"
    assert (fields.get(der.BUSINESS_CATEGORY) == "production") is production


def test_ca_certificate_with_version_and_extensions(ca):
    assert der.common_name(ca.cert_pem) == "Factory-CA"
    assert der.not_after(der.pem_to_der(ca.cert_pem)) == ca.cert.not_valid_after_utc.isoformat()


@pytest.mark.parametrize("year", [1999, 2049, 2050, 2107])  # UTCTime up to 2049, then Generalized
def test_not_after_in_both_time_encodings(ca, year):
    when = dt.datetime(year, 7, 1, 12, 30, 5, tzinfo=dt.UTC)
    pem = cert_with(ca, [x509.NameAttribute(NameOID.COMMON_NAME, UUID)], when)
    assert der.not_after(der.pem_to_der(pem)) == when.isoformat()


def test_string_types_multi_valued_rdns_and_unicode(ca):
    attributes = [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),  # PrintableString
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Gerätebau Müller – 設備"),  # UTF8String
        x509.NameAttribute(NameOID.COMMON_NAME, UUID),
    ]
    name = x509.Name([x509.RelativeDistinguishedName(attributes[:2]),
                      x509.RelativeDistinguishedName(attributes[2:])])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
        .sign(ca.key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    assert sorted(der.subject(der.pem_to_der(pem))) == sorted(expected_subject(pem))
    assert der.common_name(pem) == UUID


def test_no_common_name(ca):
    pem = cert_with(ca, [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "acme")],
                    dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    assert der.common_name(pem) is None


def test_first_certificate_of_a_chain(ca):
    pem = device_cert(ca)
    assert der.common_name("junk before\n" + pem + ca.cert_pem) == UUID
    assert der.common_name(ca.cert_pem + pem) == "Factory-CA"


def pem_of(data: bytes) -> str:
    body = base64.encodebytes(data).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("text", [
    "",
    "not a certificate",
    "-----BEGIN CERTIFICATE-----\nMIIB\n",  # no end line
    "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",  # empty
    "-----BEGIN CERTIFICATE-----\nMIIB!!notbase64\n-----END CERTIFICATE-----\n",
    pem_of(b"\x30\x03\x02\x01\x01"),  # a SEQUENCE holding an INTEGER
    pem_of(b"\x30\x84\xff\xff\xff\xff"),  # a length far past the end
    pem_of(b"\x30\x80\x00\x00"),  # indefinite length (not DER)
    pem_of(b"\x1f\x81\x01\x00"),  # high tag number
])
def test_malformed_input_is_a_value_error(text):
    with pytest.raises(ValueError):
        der.common_name(text)


def test_csr_is_not_a_certificate():
    csr = identity.make_csr(identity.FileKey.generate(), UUID, "acme", False)
    with pytest.raises(ValueError):
        der.common_name(csr)


def test_trailing_bytes_are_refused(ca):
    data = der.pem_to_der(device_cert(ca))
    with pytest.raises(ValueError):
        der.subject(data + b"\x00")


def test_every_truncation_is_refused(ca):
    """A certificate cut short anywhere is malformed: both readers raise ValueError."""
    data = der.pem_to_der(device_cert(ca))
    for n in range(len(data)):
        for read in (der.subject, der.not_after):
            with pytest.raises(ValueError):
                read(data[:n])


def _read_or_none(read, blob):
    """What ``read`` gets from ``blob``, or None where it refuses it (ValueError)."""
    try:
        return read(blob)
    except ValueError:
        return None


def test_every_byte_flip_gives_valueerror_or_well_formed_fields(ca):
    """A flipped byte outside the fields read leaves them as they were; inside, the reader
    refuses it or reads well-formed fields (an OID and text; an ISO date), never crashes."""
    data = der.pem_to_der(device_cert(ca))
    subject, not_after = der.subject(data), der.not_after(data)
    changed = 0
    for i in range(len(data)):
        blob = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        got = _read_or_none(der.subject, blob)
        if got is not None and got != subject:
            changed += 1
            assert all(re.fullmatch(r"\d+(\.\d+)+", oid) and isinstance(v, str) for oid, v in got)
        when = _read_or_none(der.not_after, blob)
        if when is not None and when != not_after:
            changed += 1
            assert dt.datetime.fromisoformat(when).tzinfo is not None
    # The signature's 64-odd bytes lie outside both fields: flipping them changes nothing.
    signature = len(data) - 64
    for i in range(signature, len(data)):
        blob = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        assert der.subject(blob) == subject and der.not_after(blob) == not_after
    assert changed > 0  # some flips land in the fields and are read as other values

