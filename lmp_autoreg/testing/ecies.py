"""ECIES on P-256 as fioconfig and the device gateway use it (foundriesio/go-ecies v0.3.0).

A message is ``R || IV || C || T``: ``R`` the sender's ephemeral public point (65 bytes,
uncompressed; a compressed 33-byte point is accepted on decryption, as go-ecies does),
``IV`` 16 random bytes, ``C`` the message under AES-128-CTR, ``T`` an HMAC-SHA256 tag
(32 bytes) over ``IV || C``. With ``z`` the x coordinate of the ECDH shared point,
``K = SHA-256(00000001 || z)`` (NIST SP 800-56C concatenation KDF, no shared info), the
encryption key is ``K[:16]`` and the MAC key ``SHA-256(K[16:32])``. The gateway sends
``base64(message)`` as a config file's ``Value``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_LEN = 16
IV_LEN = 16
TAG_LEN = 32
POINT_LEN = 65
COMPRESSED_LEN = 33


class DecryptionError(ValueError):
    """The message is not an ECIES message for this key (bad point, length or tag)."""


def _keys(shared_x: bytes) -> tuple[bytes, bytes]:
    k = hashlib.sha256(b"\x00\x00\x00\x01" + shared_x).digest()
    return k[:KEY_LEN], hashlib.sha256(k[KEY_LEN : 2 * KEY_LEN]).digest()


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return cipher.update(data) + cipher.finalize()


def encrypt(
    public_key: ec.EllipticCurvePublicKey,
    message: bytes,
    *,
    ephemeral: ec.EllipticCurvePrivateKey | None = None,
    iv: bytes | None = None,
) -> bytes:
    """``message`` encrypted to ``public_key`` (P-256). ``ephemeral`` and ``iv`` are for
    known-answer tests only; left out, they are fresh random values."""
    if not isinstance(public_key.curve, ec.SECP256R1):
        raise ValueError(f"ECIES needs a P-256 key, not {public_key.curve.name}")
    ephemeral = ephemeral or ec.generate_private_key(ec.SECP256R1())
    iv = os.urandom(IV_LEN) if iv is None else iv
    if len(iv) != IV_LEN:
        raise ValueError(f"the IV must be {IV_LEN} bytes")
    enc_key, mac_key = _keys(ephemeral.exchange(ec.ECDH(), public_key))
    body = iv + _ctr(enc_key, iv, message)
    point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return point + body + hmac.new(mac_key, body, hashlib.sha256).digest()


def decrypt(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """The message in ``data``; ``DecryptionError`` when it is not one for this key."""
    return decrypt_with(lambda point: private_key.exchange(ec.ECDH(), point), data)


def decrypt_with(
    shared_x: Callable[[ec.EllipticCurvePublicKey], bytes], data: bytes
) -> bytes:
    """``decrypt`` for a key that only its holder can use (a key on a PKCS#11 token):
    ``shared_x`` gives the x coordinate of the ECDH shared point with the sender's point."""
    if not data or data[0] not in (2, 3, 4):
        raise DecryptionError("no ephemeral public point at the start")
    start = POINT_LEN if data[0] == 4 else COMPRESSED_LEN
    if len(data) < start + IV_LEN + TAG_LEN:
        raise DecryptionError("too short for an ECIES message")
    try:
        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data[:start])
    except ValueError as error:
        raise DecryptionError(f"bad ephemeral public point: {error}") from error
    enc_key, mac_key = _keys(shared_x(point))
    sealed, tag = data[start:-TAG_LEN], data[-TAG_LEN:]
    if not hmac.compare_digest(hmac.new(mac_key, sealed, hashlib.sha256).digest(), tag):
        raise DecryptionError("the tag does not match: not encrypted to this key")
    return _ctr(enc_key, sealed[:IV_LEN], sealed[IV_LEN:])
