"""The device key on a PKCS#11 token as fioconfig uses it, for the stand-in fioconfig.

The real fioconfig (foundriesio/fioconfig 638424812372) reads ``sota.toml``'s ``[p11]``
section when ``tls.pkey_source`` is ``"pkcs11"`` and goes to the token through crypto11
(foundriesio's fork); this does the same through python-pkcs11 (0.7.0 and newer):

- ``module``, ``pass``, ``tls_pkey_id`` and ``tls_clientcert_id`` are required, none of
  them empty; ``label`` (the token's) defaults to ``aktualizr``;
- an id is digits, each one byte of its value, leading zero bytes dropped: ``"01"`` is
  ``b"\\x01"``, as fioconfig's ``IdToBytes`` turns it;
- the key pair is the private key whose ``CKA_ID`` is the key id and the public key of the
  same id and label (crypto11's ``FindKeyPair``); the certificate is the one whose
  ``CKA_ID`` is the certificate id (``FindCertificate``); without either the real one
  panics (exit 2), and so does this (``TokenError.panics``);
- a signature is ``CKM_ECDSA`` over the digest the caller gives (crypto11's ``Sign``);
- the ECDH of ECIES is ``CKM_ECDH1_DERIVE`` with no KDF and the peer's uncompressed point,
  into a session secret (generic, not sensitive, extractable, as long as a coordinate)
  whose value is read back (crypto11's ``ECDH1Derive``): the key must allow ``CKA_DERIVE``.

The PIN is used to log in and kept nowhere else; it is never shown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import NoSuchToken, PKCS11Error
from pkcs11.mechanisms import KDF

DEFAULT_TOKEN = "aktualizr"


class TokenError(Exception):
    """The ``[p11]`` settings or the token do not give a usable key and certificate.
    ``panics``: where the real fioconfig goes on with crypto11's nil key or certificate
    and panics (exit 2), a key pair or a certificate that is not on the token."""

    def __init__(self, message: str, *, panics: bool = False) -> None:
        super().__init__(message)
        self.panics = panics


@dataclass(frozen=True)
class P11:
    """``sota.toml``'s ``[p11]`` section as fioconfig reads it."""

    module: str
    pin: str = field(repr=False)
    key_id: bytes
    cert_id: bytes
    label: str = DEFAULT_TOKEN

    @classmethod
    def from_config(cls, get: Callable[[str], str]) -> P11:
        """From a ``get("p11.<name>")`` of the merged ``sota.toml``; TokenError with
        fioconfig's words when one of the four required settings is missing or empty."""
        module, pin = get("p11.module"), get("p11.pass")
        key_id, cert_id = get("p11.tls_pkey_id"), get("p11.tls_clientcert_id")
        if not (module and pin and key_id and cert_id):
            raise TokenError("missing required p11 configs for: module, pass, tls_pkey_id, "
                             "and/or tls_clientcert_id")
        return cls(module, pin, id_bytes(key_id), id_bytes(cert_id),
                   get("p11.label") or DEFAULT_TOKEN)


def id_bytes(text: str) -> bytes:
    """An object id of ``[p11]``: one byte per decimal digit, leading zeros dropped."""
    if not text.isascii() or not text.isdigit() or not text.strip("0"):
        raise TokenError(f"not an object id of [p11]: {text!r}")
    return bytes(int(digit) for digit in text.lstrip("0"))


def _point(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


class TokenKey:
    """The key pair and certificate ``[p11]`` names, in one logged-in session that lives
    until :meth:`close`."""

    def __init__(self, p11: P11) -> None:
        try:
            token = pkcs11.lib(p11.module).get_token(token_label=p11.label)
        except NoSuchToken as error:
            raise TokenError("unable to load crypto11 config: could not find PKCS#11 "
                             "token") from error
        except (PKCS11Error, OSError, RuntimeError) as error:
            raise TokenError(f"unable to load crypto11 config: {_why(error)}") from error
        try:
            self._session = token.open(user_pin=p11.pin)
        except PKCS11Error as error:
            raise TokenError("unable to load crypto11 config: failed to log into long term "
                             f"session: {_why(error)}") from error
        try:
            self._private, public, cert = self._find(p11)
        except (PKCS11Error, TokenError):
            self.close()
            raise
        self.certificate = cert
        self.public = public

    def _find(self, p11: P11) -> tuple[Any, ec.EllipticCurvePublicKey, x509.Certificate]:
        privates = list(self._session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                                   Attribute.ID: p11.key_id}))
        if not privates:
            raise TokenError("unable to load pkcs11 private key: no key of id "
                             f"{p11.key_id.hex()}", panics=True)
        private = privates[0]
        publics = list(self._session.get_objects({
            Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: p11.key_id,
            Attribute.LABEL: private[Attribute.LABEL]}))
        if not publics:
            raise TokenError("unable to load pkcs11 private key: no public half of id "
                             f"{p11.key_id.hex()}", panics=True)
        certs = list(self._session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                                Attribute.ID: p11.cert_id}))
        if not certs:
            raise TokenError("unable to load pkcs11 client certificate: none of id "
                             f"{p11.cert_id.hex()}", panics=True)
        cert = x509.load_der_x509_certificate(bytes(certs[0][Attribute.VALUE]))
        public = _public(bytes(publics[0][Attribute.EC_POINT]))
        return private, public, cert

    def sign_digest(self, digest: bytes) -> bytes:
        """An ECDSA signature of ``digest`` by the token, DER (X9.62)."""
        raw = self._private.sign(bytes(digest), mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                    int.from_bytes(raw[half:], "big"))

    def shared_x(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """The x coordinate of the ECDH shared point with ``peer``, computed on the token."""
        size = (self.public.curve.key_size + 7) // 8
        secret = self._private.derive_key(
            KeyType.GENERIC_SECRET, size * 8, mechanism=Mechanism.ECDH1_DERIVE,
            mechanism_param=(KDF.NULL, None, _point(peer)),
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
        try:
            return bytes(secret[Attribute.VALUE])
        finally:
            secret.destroy()

    def close(self) -> None:
        try:
            self._session.close()
        except PKCS11Error:
            pass


def _why(error: BaseException) -> str:
    return f"{type(error).__name__} {error}".strip()


def _public(point: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from ``CKA_EC_POINT``: a DER OCTET STRING around the point, or
    (some modules) the bare uncompressed point."""
    if len(point) == 67 and point[:2] == b"\x04\x41":
        point = point[2:]
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
