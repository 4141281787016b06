"""The device's identity: its EC P-256 key, its CSR, and checks of the certificate it gets.

Importing this module imports ``cryptography``: callers that may not need it (the
already-registered guard, ``--help``) import it lazily.
"""

from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


def make_csr(key: PrivateKey, uuid: str, factory: str, production: bool) -> str:
    """A CSR as the device gateway expects it (SPEC section 2), PEM text."""
    subject = [
        x509.NameAttribute(NameOID.COMMON_NAME, uuid),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, factory),
    ]
    if production:
        subject.append(x509.NameAttribute(NameOID.BUSINESS_CATEGORY, "production"))
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(subject))
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_certificate(pem: str | bytes) -> x509.Certificate:
    """Parse one PEM certificate; ValueError when it is not one."""
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data)


def same_public_key(cert: x509.Certificate, key_pem: bytes) -> bool:
    """True when ``cert`` certifies the private key in ``key_pem``."""
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    public = key_from_pem(key_pem).public_key()
    return cert.public_key().public_bytes(der, spki) == public.public_bytes(der, spki)


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class CertInfo(NamedTuple):
    subject: str
    issuer: str
    serial: str
    not_after: str  # ISO 8601, UTC
    common_name: str | None
    organizational_unit: str | None
    production: bool


# rfc4514_string() knows only the common attribute names; SPEC speaks of businessCategory.
_NAMES = {NameOID.BUSINESS_CATEGORY: "businessCategory"}


def name_string(name: x509.Name) -> str:
    return name.rfc4514_string(_NAMES)


def describe(cert: x509.Certificate) -> CertInfo:
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    category = cert.subject.get_attributes_for_oid(NameOID.BUSINESS_CATEGORY)
    return CertInfo(
        subject=name_string(cert.subject),
        issuer=name_string(cert.issuer),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc.isoformat(),
        common_name=common_name(cert),
        organizational_unit=str(ou[0].value) if ou else None,
        production=any(a.value == "production" for a in category),
    )


def summary(cert: x509.Certificate) -> dict[str, str]:
    """The ``certificate`` object of the JSON result (SPEC section 6)."""
    info = describe(cert)
    return {
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": info.serial,
        "not_after": info.not_after,
    }
