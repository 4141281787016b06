"""HTTPS with client authentication by a key on a PKCS#11 token, for the stand-in fioconfig.

The real fioconfig hands Go's TLS a ``crypto.Signer`` whose ``Sign`` has the token sign
(crypto11): the TLS library builds the handshake and asks the key for one signature, the
client's CertificateVerify. Python's ``ssl`` cannot do that: it takes a key as a file or
not at all, and OpenSSL's PKCS#11 engine or provider cannot be reached through it. So this
uses tlslite-ng, a TLS implementation in Python that takes the private key as an object
and calls its ``sign`` with the digest to sign. :class:`TokenSigner` is that object; its
``sign`` has the token sign through python-pkcs11 (:class:`~.p11.TokenKey`). The private
key never leaves the token, and the gateway verifies the signature as it does any
client's: a token that does not hold the certificate's key fails the handshake.

The server is checked as Go checks it for fioconfig: its chain must lead to a certificate
of the CA file (``import.tls_cacert_path``) and name the host, before the request is sent.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from tlslite.errors import TLSAuthenticationError, TLSError
from tlslite.handshakesettings import HandshakeSettings
from tlslite.integration.clienthelper import ClientHelper
from tlslite.integration.httptlsconnection import HTTPTLSConnection
from tlslite.tlsconnection import TLSConnection
from tlslite.utils.ecdsakey import ECDSAKey
from tlslite.x509 import X509
from tlslite.x509certchain import X509CertChain

from lmp_autoreg.testing.p11 import TokenKey

_HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


class TokenSigner(ECDSAKey):
    """The token's key as tlslite-ng takes a private key: ``sign`` gets the digest of
    what is to be signed and has the token sign it; the rest is the public half's."""

    def __init__(self, key: TokenKey) -> None:  # ECDSAKey.__init__ only raises
        self.key = key
        self.key_type = "ecdsa"
        self.curve_name = "NIST256p"

    def __len__(self) -> int:
        return self.key.public.curve.key_size

    def hasPrivateKey(self) -> bool:  # noqa: N802 (tlslite's name)
        return True

    def _sign(self, data: Any, hash_alg: str) -> bytearray:
        return bytearray(self.key.sign_digest(bytes(data)))

    def _verify(self, signature: Any, hash_bytes: Any) -> bool:
        return self.verify(signature, hash_bytes, None, "sha256")

    def verify(self, signature: Any, digest: Any, padding: Any = None,
               hash_name: Any = None, salt_len: Any = None) -> bool:
        algorithm = _HASHES.get(str(hash_name).lower())
        if algorithm is None:
            return False
        try:
            self.key.public.verify(bytes(signature), bytes(digest),
                                   ec.ECDSA(utils.Prehashed(algorithm)))
        except InvalidSignature:
            return False
        return True

    def acceptsPassword(self) -> bool:  # noqa: N802 (tlslite's name)
        return False

    def write(self, password: Any = None) -> str:
        raise TypeError("the key on the token is not extractable")


class _ServerCheck:
    """tlslite-ng's ``checker``: called once the handshake is done, before any request;
    raises when the server's chain does not lead to the CA file or does not name ``host``."""

    def __init__(self, cafile: str, host: str) -> None:
        with open(cafile, "rb") as handle:
            self.roots = x509.load_pem_x509_certificates(handle.read())
        self.host = host

    def __call__(self, connection: Any) -> None:
        chain = connection.session.serverCertChain
        if chain is None or not chain.x509List:
            raise TLSAuthenticationError("the server sent no certificate")
        certs = [x509.load_der_x509_certificate(bytes(c.bytes)) for c in chain.x509List]
        try:
            name: x509.IPAddress | x509.DNSName = x509.IPAddress(ipaddress.ip_address(self.host))
        except ValueError:
            name = x509.DNSName(self.host)
        verifier = (PolicyBuilder().store(Store(self.roots))
                    .time(dt.datetime.now(dt.UTC)).build_server_verifier(name))
        try:
            verifier.verify(certs[0], certs[1:])
        except VerificationError as error:
            raise TLSAuthenticationError(
                f"x509: certificate signed by unknown authority or not for {self.host}: "
                f"{error}") from error


class _Socket(TLSConnection):
    """tlslite-ng's socket emulation, reading as a socket does: its ``recv_into`` gives
    None for no data, which ``http.client`` takes for "no data yet", and asked for no
    bytes it waits for one (an empty 304 or 204 body)."""

    def recv_into(self, buffer: Any) -> int:
        return (super().recv_into(buffer) or 0) if len(buffer) else 0


class _Connection(HTTPTLSConnection):
    """tlslite-ng's HTTPS connection on :class:`_Socket`, its handshake failures
    ``OSError`` as ``ssl``'s are (a peer that hangs up reads as an end of file)."""

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = _Socket(self.sock)  # type: ignore[has-type]
        self.sock.ignoreAbruptClose = True
        try:
            ClientHelper._handshake(self, self.sock)
        except TLSError as error:
            raise OSError(f"tls: {error}") from error


def connection(key: TokenKey, cafile: str, host: str, port: int,
               timeout: float) -> http.client.HTTPConnection:
    """An ``http.client`` connection to ``host:port`` over TLS 1.3, the client
    authenticated by the certificate and key on the token.

    TLS 1.3 only: tlslite-ng's TLS 1.2 client authentication reaches into python-ecdsa's
    key object. No certificate compression: tlslite-ng (0.8) compresses the client's
    certificate when its own ClientHello offers compression, whether or not the server
    asked for it, and OpenSSL then ends the handshake (unexpected message)."""
    cert = X509()
    cert.parseBinary(key.certificate.public_bytes(Encoding.DER))
    settings = HandshakeSettings()
    settings.minVersion = (3, 4)
    settings.certificate_compression_send = []
    settings.certificate_compression_receive = []
    return _Connection(host, port, timeout=timeout, certChain=X509CertChain([cert]),
                       privateKey=TokenSigner(key), checker=_ServerCheck(cafile, host),
                       settings=settings)
