"""The device key interface: what a registration needs of the key its certificate is for.

A device identity is a uuid and a key. The key may be one of several kinds: a key in a
file (``identity.FileKey``, installed as ``pkey.pem`` beside the certificate), or a key
that never leaves a PKCS#11 token. ``attempt.Attempt`` gets keys from a ``KeyKind`` and
uses them only through ``DeviceKey``; a new kind of key is a new pair of classes with
these methods, and nothing else changes.

``DeviceKey``:

- ``public_key()``: the public key, a ``cryptography`` EC public key;
- ``sign_csr(builder)``: the CSR ``builder`` (subject and extensions set) signed with the
  key (``identity.make_csr`` calls it);
- ``record()``: what the pending identity and the install journal keep of the key, a
  JSON value: a file key keeps its PEM text; a key on a token would keep where it is
  (say ``{"token": ..., "id": ...}``), never a PIN;
- ``files()``: the files to install with the answer, name to content, each mode 0600:
  ``{"pkey.pem": ...}`` for a file key, ``{}`` for a key on a token;
- ``config()``: TOML the device adds to the server's ``sota.toml`` (a token key's
  ``[p11]`` section, with the PIN: ``sota.toml`` is then 0600); ``""`` for a file key;
- ``store_certificate(cert)``: the answer is verified and about to be installed: a token
  key stores the certificate on the token; a file key has nothing to do.

``KeyKind``:

- ``generate()``: a new key (a file key lives in memory until ``record()`` is saved; a
  token key is made on the token);
- ``load(record)``: the key a ``record()`` names; ``ValueError`` when the record is not of
  this kind or the key cannot be used (the attempt then drops the identity and makes a
  new one).

Only type checkers import this module.
"""

from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

# A JSON value: what ``json.loads`` gives back of what ``record()`` returned.
KeyRecord = str | dict[str, Any]


class DeviceKey(Protocol):
    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest: ...

    def record(self) -> KeyRecord: ...

    def files(self) -> dict[str, bytes]: ...

    def config(self) -> str: ...

    def store_certificate(self, cert: x509.Certificate) -> None: ...


class KeyKind(Protocol):
    def generate(self) -> DeviceKey: ...

    def load(self, record: KeyRecord) -> DeviceKey: ...
