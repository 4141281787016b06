"""A throwaway certificate authority that lives in memory for the length of a test.

It plays the part of the factory's device CA: it signs device CSRs the way a
registration server does, and it can make a TLS server certificate so the loopback
server can speak HTTPS to an agent that was given the CA file with ``--cacert``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_HASH = hashes.SHA256()


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


def _with_ou(subject: x509.Name, ou: str | None) -> x509.Name:
    """``subject`` with its organizational unit replaced by ``ou`` (unchanged when None)."""
    if ou is None:
        return subject
    kept = [a for a in subject if a.oid != NameOID.ORGANIZATIONAL_UNIT_NAME]
    return x509.Name([*kept, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)])


class ThrowawayCA:
    """An EC P-256 root CA held in memory; nothing touches the disk unless asked."""

    def __init__(self, name: str = "lmp-autoreg test CA") -> None:
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        public = self.key.public_key()
        self.cert: x509.Certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=730))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, _HASH)
        )

    @property
    def cert_pem(self) -> str:
        """The root certificate, PEM text."""
        return _pem(self.cert)

    def write_ca(self, path: str | Path) -> Path:
        """Write the root certificate to ``path`` (e.g. for ``--cacert``); return the path."""
        target = Path(path)
        target.write_text(self.cert_pem, encoding="ascii")
        return target

    def _issue(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        *,
        days: int,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName] | None = None,
    ) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, _HASH)

    def sign_csr(self, csr_pem: str, *, ou: str | None = None) -> str:
        """Issue a one-year client certificate for a device CSR; return its PEM.

        The subject is the CSR's (CN=uuid, OU=factory, businessCategory when present);
        ``ou`` replaces the organizational unit. Raises ValueError when the CSR cannot be
        parsed, its signature is wrong, or its key is not an EC key.
        """
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        if not csr.is_signature_valid:
            raise ValueError("CSR signature is not valid")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValueError("CSR key is not an EC key")
        cert = self._issue(
            _with_ou(csr.subject, ou), public, days=365, usage=ExtendedKeyUsageOID.CLIENT_AUTH
        )
        return _pem(cert)

    def cert_for_subject_with_other_key(self, subject: x509.Name) -> str:
        """A client certificate for ``subject`` whose key is a fresh, unrelated key."""
        other = ec.generate_private_key(ec.SECP256R1()).public_key()
        cert = self._issue(subject, other, days=365, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        return _pem(cert)

    def cert_for_other_key(self, uuid: str, *, ou: str | None = None) -> str:
        """A client certificate with CN=``uuid`` (and OU=``ou``) for an unrelated key."""
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, uuid)]
        if ou is not None:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        return self.cert_for_subject_with_other_key(x509.Name(attrs))

    def server_cert(
        self, hosts: Iterable[str] = ("127.0.0.1", "localhost", "::1")
    ) -> tuple[str, str]:
        """A TLS server certificate for ``hosts`` (IP and DNS SANs); return (cert, key) PEM."""
        names = list(hosts)
        if not names:
            raise ValueError("server_cert needs at least one host")
        sans: list[x509.GeneralName] = []
        for host in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = self._issue(
            subject, key.public_key(), days=30, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans
        )
        return _pem(cert), _key_pem(key)
