"""The device's identity: its EC P-256 key, its CSR, and checks of the certificate it gets.

The key in a file, ``FileKey`` (of the kind ``FILE_KEYS``), is one ``devicekey.DeviceKey``;
``make_csr`` takes any.

Importing this module imports ``cryptography``: callers that may not need it (the
already-registered guard, ``--help``) import it lazily.
"""

import base64
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

try:  # the enum where x509 has already loaded it, without the serialization package
    from cryptography.hazmat.primitives._serialization import Encoding
except ImportError:  # pragma: no cover - a cryptography release that moved it
    from cryptography.hazmat.primitives.serialization import Encoding

if TYPE_CHECKING:
    from .devicekey import DeviceKey

PrivateKey = ec.EllipticCurvePrivateKey


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# A P-256 private key as unencrypted PKCS#8 DER is a fixed layout around the 32-byte
# secret and the 65-byte public point. ``key_to_pem`` fills it in itself because
# cryptography's ``private_bytes`` imports the whole ``serialization`` package (its SSH
# support, ``dataclasses``, ``inspect``: about 1 MiB, the largest cost of a registration
# beyond its import floor; docs/performance.md). tests/test_identity.py checks that the
# result is byte for byte what ``private_bytes(PEM, PKCS8, NoEncryption())`` gives.
_PKCS8_P256_HEAD = bytes.fromhex(
    "308187020100"  # PrivateKeyInfo, version 0
    "301306072a8648ce3d020106082a8648ce3d030107"  # id-ecPublicKey, prime256v1
    "046d306b0201010420"  # OCTET STRING { ECPrivateKey, version 1, privateKey ...
)
_PKCS8_P256_POINT = bytes.fromhex("a14403420004")  # ... [1] publicKey, uncompressed point


def key_to_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
    if key.curve.name != "secp256r1":
        raise ValueError(f"not a P-256 key: {key.curve.name}")
    numbers = key.private_numbers()
    point = numbers.public_numbers
    der = b"".join((
        _PKCS8_P256_HEAD,
        numbers.private_value.to_bytes(32, "big"),
        _PKCS8_P256_POINT,
        point.x.to_bytes(32, "big"),
        point.y.to_bytes(32, "big"),
    ))
    text = base64.b64encode(der).decode()
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return ("-----BEGIN PRIVATE KEY-----\n" + "\n".join(lines)
            + "\n-----END PRIVATE KEY-----\n").encode()


def key_from_pem(pem: bytes) -> PrivateKey:
    """Parse a PEM private key; ValueError when it is not an EC key."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

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

    def certifies(self, cert: x509.Certificate) -> bool:
        return same_public_key(cert, self.key)

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


def same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    """True when ``cert`` certifies ``key``."""
    return bool(cert.public_key() == key.public_key())


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
