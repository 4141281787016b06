"""Read the subject and the expiry of a PEM certificate, without ``cryptography``.

The already-registered guard and ``status`` only *show* what ``client.pem`` says (its CN
is the device's uuid); loading ``cryptography`` for that would triple their start-up time.
This module walks the DER encoding (X.690) just far enough:

    Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    tbsCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
                                  issuer, validity SEQUENCE { notBefore, notAfter },
                                  subject, ... }
    Name ::= SEQUENCE OF SET OF SEQUENCE { type OBJECT IDENTIFIER, value ANY }

It checks nothing a signature would prove: certificates are verified with ``cryptography``
when they are installed (``install.verify_answer``). Anything that is not a well-formed
certificate raises ``ValueError``.
"""

import binascii

COMMON_NAME = "2.5.4.3"
ORGANIZATIONAL_UNIT = "2.5.4.11"
BUSINESS_CATEGORY = "2.5.4.15"

_SEQUENCE = 0x30
_SET = 0x31
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_VERSION = 0xA0  # [0] EXPLICIT
# Tags of the string types a Name may use, and how their bytes are encoded.
_STRINGS = {
    0x0C: "utf-8",  # UTF8String
    0x12: "ascii",  # NumericString
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString (T.61; latin-1 is how OpenSSL shows it)
    0x16: "ascii",  # IA5String
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}
_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"


def pem_to_der(pem: bytes | str) -> bytes:
    """The DER bytes of the first ``CERTIFICATE`` block of ``pem``."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    start = data.find(_BEGIN)
    end = data.find(_END, start + len(_BEGIN))
    if start < 0 or end < 0:
        raise ValueError("no PEM certificate block")
    body = b"".join(data[start + len(_BEGIN) : end].split())
    try:
        return binascii.a2b_base64(body, strict_mode=True)
    except binascii.Error as e:
        raise ValueError(f"bad base64 in the certificate: {e}") from e


def _elements(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The (tag, value start, value end) of each DER element in ``data[start:end]``."""
    elements = []
    pos = start
    while pos < end:
        if pos + 2 > end:
            raise ValueError("truncated DER element")
        tag, length = data[pos], data[pos + 1]
        if tag & 0x1F == 0x1F:
            raise ValueError("unexpected high tag number")
        pos += 2
        if length & 0x80:  # long form: the next (length & 0x7f) bytes are the length
            size = length & 0x7F
            if not 0 < size <= 4 or pos + size > end:
                raise ValueError("bad DER length")
            length = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        if pos + length > end:
            raise ValueError("DER element runs past its container")
        elements.append((tag, pos, pos + length))
        pos += length
    return elements


def _inside(data: bytes, element: tuple[int, int, int], tag: int) -> list[tuple[int, int, int]]:
    """The elements inside ``element``, which must have tag ``tag``."""
    found, start, end = element
    if found != tag:
        raise ValueError(f"expected DER tag {tag:#04x}, found {found:#04x}")
    return _elements(data, start, end)


def _tbs(der: bytes) -> list[tuple[int, int, int]]:
    """serialNumber, signature, issuer, validity, subject, ... of the tbsCertificate."""
    outer = _elements(der, 0, len(der))
    if len(outer) != 1:
        raise ValueError("not exactly one DER element")
    certificate = _inside(der, outer[0], _SEQUENCE)
    if not certificate:
        raise ValueError("empty certificate")
    tbs = _inside(der, certificate[0], _SEQUENCE)
    if tbs and tbs[0][0] == _VERSION:
        tbs = tbs[1:]
    if len(tbs) < 5:
        raise ValueError("truncated tbsCertificate")
    return tbs


def _oid(value: bytes) -> str:
    if not value or value[-1] & 0x80:
        raise ValueError("bad object identifier")
    arcs = []
    arc = 0
    for byte in value:
        arc = arc << 7 | byte & 0x7F
        if not byte & 0x80:
            arcs.append(arc)
            arc = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def subject(der: bytes) -> list[tuple[str, str]]:
    """The subject's attributes as (dotted OID, text), in certificate order."""
    attributes = []
    for rdn in _inside(der, _tbs(der)[4], _SEQUENCE):
        for atv in _inside(der, rdn, _SET):
            parts = _inside(der, atv, _SEQUENCE)
            if len(parts) != 2 or parts[0][0] != _OID:
                raise ValueError("bad attribute in the subject")
            (_, oid_start, oid_end), (tag, start, end) = parts
            encoding = _STRINGS.get(tag)
            if encoding is None:
                raise ValueError(f"unexpected string type {tag:#04x} in the subject")
            text = der[start:end].decode(encoding)  # UnicodeDecodeError is a ValueError
            attributes.append((_oid(der[oid_start:oid_end]), text))
    return attributes


def not_after(der: bytes) -> str:
    """The end of the validity, ISO 8601 in UTC (``2027-11-27T21:55:00+00:00``)."""
    validity = _inside(der, _tbs(der)[3], _SEQUENCE)
    if len(validity) != 2:
        raise ValueError("bad validity")
    tag, start, end = validity[1]
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME and len(text) == 13:  # YYMMDDHHMMSSZ; RFC 5280: 50-99 are 19xx
        text = ("19" if text[:2] >= "50" else "20") + text
    elif tag != _GENERALIZED_TIME or len(text) != 15:  # YYYYMMDDHHMMSSZ
        raise ValueError("bad notAfter time")
    if not (text.endswith("Z") and text[:-1].isdigit()):
        raise ValueError("bad notAfter time")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}T{text[8:10]}:{text[10:12]}:{text[12:14]}+00:00"


def first(attributes: list[tuple[str, str]], oid: str) -> str | None:
    """The first value of ``oid`` among ``subject()``'s attributes (None when absent)."""
    return next((value for key, value in attributes if key == oid), None)


def common_name(pem: bytes | str) -> str | None:
    """The CN of the certificate in ``pem`` (None when it has none)."""
    return first(subject(pem_to_der(pem)), COMMON_NAME)
