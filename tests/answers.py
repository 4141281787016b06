"""Server answers that are damaged the way a broken or hostile server damages them, for
tests/test_answer.py and tests/test_answer_props.py: a certificate whose public key is
damaged, JSON nested deeper than any answer, and how a run's sysroot looks."""

import base64
import os
from pathlib import Path

# The DER of a P-256 key's SubjectPublicKeyInfo, up to the point: the algorithm OID
# id-ecPublicKey, the curve OID prime256v1, then the BIT STRING with an uncompressed point.
EC_PUBLIC_KEY_OID = bytes.fromhex("2a8648ce3d0201")
P256_POINT_HEAD = bytes.fromhex("06082a8648ce3d030107034200")
# An OID no library knows as a public key algorithm (1.2.840.10045.2.9, unassigned), as long
# as id-ecPublicKey (1.2.840.10045.2.1) so that no length around it changes.
UNKNOWN_OID = bytes.fromhex("2a8648ce3d0209")


def _der(pem: str) -> bytes:
    lines = pem.strip().splitlines()
    return base64.b64decode("".join(lines[1:-1]))


def _pem(der: bytes) -> str:
    text = base64.b64encode(der).decode()
    return ("-----BEGIN CERTIFICATE-----\n"
            + "\n".join(text[i:i + 64] for i in range(0, len(text), 64))
            + "\n-----END CERTIFICATE-----\n")


def flip_point_byte(pem: str, index: int = 10, mask: int = 0x01) -> str:
    """``pem`` with one byte of its public EC point's x coordinate changed: the point is no
    longer on the curve, so the key cannot be loaded (the signature is not checked)."""
    der = bytearray(_der(pem))
    at = der.index(P256_POINT_HEAD) + len(P256_POINT_HEAD) + 1 + index % 64  # past the 04
    der[at] ^= mask or 0x01
    return _pem(bytes(der))


def unknown_algorithm(pem: str) -> str:
    """``pem`` with its public key's algorithm OID replaced by one nobody knows."""
    der = _der(pem)
    assert len(UNKNOWN_OID) == len(EC_PUBLIC_KEY_OID)
    return _pem(der.replace(EC_PUBLIC_KEY_OID, UNKNOWN_OID, 1))


def nested(depth: int, opening: str = "[") -> bytes:
    """JSON (or what looks like it) nested ``depth`` levels deep."""
    closing = {"[": "]", "{": "}"}[opening]
    inner = '"x"' if opening == "[" else ""
    if opening == "{":
        return ('{"a":' * depth + "1" + "}" * depth).encode()
    return (opening * depth + inner + closing * depth).encode()


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under ``root`` (but ``skip``): its kind and content (a link's target)."""
    found: dict[str, tuple[str, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if skip is not None:
            dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            path = here / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = ("dir", "")
            else:
                found[key] = ("file", path.read_bytes())
    return found


def bad_version(pem: str) -> str:
    """``pem`` claiming X.509 version 4, which does not exist (cryptography raises
    ``InvalidVersion``, not a ``ValueError``)."""
    der = _der(pem)
    return _pem(der.replace(bytes.fromhex("a003020102"), bytes.fromhex("a003020103"), 1))
