"""The device's identity: its EC P-256 key, its CSR, and checks of the certificate it gets.

The key in a file, ``FileKey`` (of the kind ``FILE_KEYS``), is one ``devicekey.DeviceKey``;
``make_csr`` takes any.

Importing this module imports ``cryptography``: callers that may not need it (the
already-registered guard, ``--help``) import it lazily.
"""

from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import checked
from .errors import BadAnswer

if TYPE_CHECKING:
    from .devicekey import DeviceKey

PrivateKey = ec.EllipticCurvePrivateKey


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def key_from_pem(pem: bytes) -> PrivateKey:
    """Parse a PEM private key; ValueError when it is not an EC key."""
    key = load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


class FileKey:
    """A device key kept in a file, ``pkey.pem`` in the sota dir: both the key object (to
    sign and compare) and its PEM (to store). A ``devicekey.DeviceKey``."""

    __slots__ = ("key", "pem")

    def __init__(self, key: PrivateKey, pem: bytes) -> None:
        self.key = key
        self.pem = pem

    @classmethod
    def generate(cls) -> "FileKey":
        key = new_key()
        return cls(key, key_to_pem(key))

    @classmethod
    def from_pem(cls, pem: bytes) -> "FileKey":
        return cls(key_from_pem(pem), pem)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        return builder.sign(self.key, hashes.SHA256())

    def record(self) -> str:
        return self.pem.decode("ascii")

    def files(self) -> dict[str, bytes]:
        return {"pkey.pem": self.pem}

    def config(self) -> str:
        return ""

    def store_certificate(self, cert: x509.Certificate) -> None:
        return None  # pkey.pem is installed with the answer

    def __repr__(self) -> str:
        return "FileKey(<private>)"


class FileKeys:
    """The kind of ``FileKey`` (a ``devicekey.KeyKind``): its record is the PEM text."""

    def generate(self) -> FileKey:
        return FileKey.generate()

    def load(self, record: object) -> FileKey:
        if not isinstance(record, str):
            raise ValueError("it is not a key in a file")
        return FileKey.from_pem(record.encode("ascii"))  # UnicodeError is a ValueError


FILE_KEYS = FileKeys()


def make_csr(key: "DeviceKey", uuid: str, factory: str, production: bool) -> str:
    """A CSR as the device gateway expects it (docs/spec.md section 2), signed by ``key``; PEM
    text."""
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
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(subject))
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True)
    )
    csr = key.sign_csr(builder)
    return csr.public_bytes(Encoding.PEM).decode()


def load_certificate(pem: str | bytes) -> x509.Certificate:
    """Parse one PEM certificate; ValueError when it is not one."""
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(data)


def check_client_certificate(
    pem: str | bytes,
    *,
    uuid: str,
    public_key: ec.EllipticCurvePublicKey | None,
    where: str = "client.pem",
) -> x509.Certificate:
    """``client.pem`` as the device may use it, whoever installed it: a certificate whose
    fields all read (checked.certificate), whose CN is ``uuid`` and which certifies
    ``public_key`` (None: a key on a token that the caller does not open). BadAnswer saying
    what is wrong with ``where``."""
    cert = checked.certificate(pem, where)
    name = common_name(cert)
    if name != uuid:
        raise BadAnswer(f"{where} is for {name!r}, not this device ({uuid})")
    if public_key is not None and cert.public_key() != public_key:
        raise BadAnswer(f"{where} certifies another key than this device's")
    return cert


def common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


# rfc4514_string() knows only the common attribute names; docs/spec.md speaks of businessCategory.
_NAMES = {NameOID.BUSINESS_CATEGORY: "businessCategory"}


def name_string(name: x509.Name) -> str:
    return name.rfc4514_string(_NAMES)


def summary(cert: x509.Certificate) -> dict[str, str]:
    """The ``certificate`` object of the JSON result (docs/spec.md section 6), with its issuer."""
    return {
        "subject": name_string(cert.subject),
        "issuer": name_string(cert.issuer),
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),  # ISO 8601, UTC
    }
