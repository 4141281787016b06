"""A throwaway two-level certificate authority, shaped like a factory's PKI.

``fioctl keys ca create`` gives a factory a root (``factory_ca``) and an intermediate
(``local-ca``) that the registration server signs devices with; both carry the factory's
name as their organizational unit. :class:`ThrowawayCA` plays that part for tests: it
lives in memory unless it is saved to (or loaded from) a directory, signs device CSRs as
the reference server does (the serial is the device's uuid read as an integer), and makes
TLS server certificates so the loopback server can speak HTTPS to an agent that was given
the root with ``--cacert``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import uuid as uuidlib
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_HASH = hashes.SHA256()
ROOT_CN = "Factory-CA"
INTERMEDIATE_CN = "local-ca"
# The four files of a saved CA, in the order they are written: keys first, and the
# intermediate's certificate last, so its presence means the set is whole.
ROOT_KEY, INTERMEDIATE_KEY = "factory_ca.key", "local-ca.key"
ROOT_CERT, INTERMEDIATE_CERT = "factory_ca.pem", "local-ca.pem"
_SAVED = (ROOT_KEY, INTERMEDIATE_KEY, ROOT_CERT, INTERMEDIATE_CERT)
# A device certificate is valid for 20 years, as the reference server issues them.
DEVICE_DAYS = 7300


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def _name(cn: str, ou: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if ou is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attrs)


def _with_ou(subject: x509.Name, ou: str | None) -> x509.Name:
    """``subject`` with its organizational unit replaced by ``ou`` (unchanged when None)."""
    if ou is None:
        return subject
    kept = [a for a in subject if a.oid != NameOID.ORGANIZATIONAL_UNIT_NAME]
    return x509.Name([*kept, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)])


def subject_value(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    """The first value of ``oid`` in ``name`` as text, or None when it has none."""
    attrs = name.get_attributes_for_oid(oid)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def uuid_serial(uuid: str) -> int:
    """The certificate serial of a device: its uuid's 128 bits as an integer.

    Raises ValueError when ``uuid`` is not a uuid (the reference server refuses it too).
    """
    return uuidlib.UUID(uuid).int


def _ca_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int,
) -> x509.Certificate:
    now = _now()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(sign_certs=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, _HASH)
    )


def _create(path: Path, text: str, mode: int) -> None:
    """Write a new file with ``mode`` from its creation; an existing file is an error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(text)


class ThrowawayCA:
    """A factory PKI: root ``factory_ca`` and intermediate ``local-ca``, EC P-256.

    ``factory`` is the organizational unit of both certificates (None: no OU). Build a new
    one with ``ThrowawayCA(factory)``; keep one across runs with :meth:`load_or_create`.
    """

    def __init__(self, factory: str | None = "acme") -> None:
        self.factory = factory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name(ROOT_CN, factory)
        #: The root certificate (``factory_ca``): what ``root.crt`` and ``--cacert`` hold.
        self.cert: x509.Certificate = _ca_cert(root_name, self.key, root_name, self.key, 1)
        #: The intermediate certificate (``local-ca``) that signs the devices.
        self.intermediate: x509.Certificate = _ca_cert(
            _name(INTERMEDIATE_CN, factory), self.intermediate_key, root_name, self.key, 0
        )

    # -- keeping it on disk -------------------------------------------------------------

    @classmethod
    def load_or_create(cls, directory: str | Path, factory: str | None = "acme") -> ThrowawayCA:
        """The CA saved in ``directory``, or a new one saved there (directory made 0700).

        Raises ValueError when the directory holds part of a CA, or the CA of another
        factory: nothing there is overwritten.
        """
        base = Path(directory)
        present = [name for name in _SAVED if (base / name).exists()]
        if not present:
            ca = cls(factory)
            ca.save(base)
            return ca
        if len(present) != len(_SAVED):
            missing = sorted(set(_SAVED) - set(present))
            raise ValueError(f"{base} holds part of a CA: {', '.join(missing)} missing")
        keys = []
        for name in (ROOT_KEY, INTERMEDIATE_KEY):
            key = serialization.load_pem_private_key((base / name).read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{base / name} is not an EC private key")
            keys.append(key)
        certs = [
            x509.load_pem_x509_certificate((base / name).read_bytes())
            for name in (ROOT_CERT, INTERMEDIATE_CERT)
        ]
        ca = cls.__new__(cls)
        ca.factory = factory
        ca.key, ca.intermediate_key = keys
        ca.cert, ca.intermediate = certs
        saved_factory = subject_value(ca.intermediate.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
        if saved_factory != factory:
            raise ValueError(f"{base} holds the CA of factory {saved_factory!r}, not {factory!r}")
        return ca

    def save(self, directory: str | Path) -> None:
        """Write the four files of the CA into ``directory``; keys are created 0600."""
        base = Path(directory)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        texts = {
            ROOT_KEY: _key_pem(self.key),
            INTERMEDIATE_KEY: _key_pem(self.intermediate_key),
            ROOT_CERT: self.cert_pem,
            INTERMEDIATE_CERT: self.intermediate_pem,
        }
        for name in _SAVED:
            tmp = base / f".{name}.tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            _create(tmp, texts[name], 0o600 if name.endswith(".key") else 0o644)
            tmp.replace(base / name)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- what a server hands out ----------------------------------------------------------

    @property
    def cert_pem(self) -> str:
        """The root certificate, PEM text (``root.crt``)."""
        return _pem(self.cert)

    @property
    def intermediate_pem(self) -> str:
        """The intermediate certificate, PEM text (the tail of ``client.chained``)."""
        return _pem(self.intermediate)

    def write_ca(self, path: str | Path) -> Path:
        """Write the root certificate to ``path`` (e.g. for ``--cacert``); return the path."""
        target = Path(path)
        target.write_text(self.cert_pem, encoding="ascii")
        return target

    def _device_cert(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, serial: int
    ) -> str:
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.intermediate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=DEVICE_DAYS))
            .add_extension(_key_usage(sign_certs=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=True
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.intermediate_key.public_key()
                ),
                critical=False,
            )
            .sign(self.intermediate_key, _HASH)
        )
        return _pem(cert)

    def sign_csr(self, csr_pem: str, *, ou: str | None = None) -> str:
        """Issue a device certificate for a CSR, signed by the intermediate; return its PEM.

        The subject is the CSR's (CN=uuid, OU=factory, businessCategory when present);
        ``ou`` replaces the organizational unit. The serial is the uuid as an integer.
        Raises ValueError when the CSR cannot be parsed, its signature is wrong, its key
        is not an EC key, or its CN is not a uuid.
        """
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        if not csr.is_signature_valid:
            raise ValueError("CSR signature is not valid")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValueError("CSR key is not an EC key")
        cn = subject_value(csr.subject, NameOID.COMMON_NAME) or ""
        try:
            serial = uuid_serial(cn)
        except ValueError as error:
            raise ValueError(f"CSR common name {cn!r} is not a uuid") from error
        return self._device_cert(_with_ou(csr.subject, ou), public, serial)

    def cert_for_subject_with_other_key(self, subject: x509.Name) -> str:
        """A device certificate for ``subject`` whose key is a fresh, unrelated key."""
        other = ec.generate_private_key(ec.SECP256R1()).public_key()
        cn = subject_value(subject, NameOID.COMMON_NAME) or ""
        try:
            serial = uuid_serial(cn)
        except ValueError:
            serial = x509.random_serial_number()
        return self._device_cert(subject, other, serial)

    def cert_for_other_key(self, uuid: str, *, ou: str | None = None) -> str:
        """A device certificate with CN=``uuid`` (and OU=``ou``) for an unrelated key."""
        return self.cert_for_subject_with_other_key(_name(uuid, ou))

    def cert_for_key_with_other_cn(self, public_key: ec.EllipticCurvePublicKey, cn: str) -> str:
        """A device certificate for ``public_key`` (the device's own) but CN=``cn``."""
        try:
            serial = uuid_serial(cn)
        except ValueError:
            serial = x509.random_serial_number()
        return self._device_cert(_name(cn, self.factory), public_key, serial)

    def server_cert(
        self, hosts: Iterable[str] = ("127.0.0.1", "localhost", "::1")
    ) -> tuple[str, str]:
        """A TLS server certificate for ``hosts`` (IP and DNS SANs), signed by the root.

        Returns (certificate, key) PEM.
        """
        names = list(dict.fromkeys(hosts))
        if not names:
            raise ValueError("server_cert needs at least one host")
        sans: list[x509.GeneralName] = []
        for host in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0], None))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign_certs=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, _HASH)
        )
        return _pem(cert), _key_pem(key)
