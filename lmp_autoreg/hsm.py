"""The device key on a PKCS#11 token (HSM mode, docs/spec.md sections 2 and 4).

Laid out as ``lmp-device-register`` lays it out, so that aktualizr-lite and fioconfig find
it: the token labelled ``aktualizr``; an EC P-256 key pair labelled ``tls`` with id ``01``,
generated on the token, its private half sensitive and never extractable, and allowed to
derive (``CKA_DERIVE``: fioconfig decrypts its configuration with the token's ECDH); the issued
certificate stored on the token as ``client``, id ``03``.

``TokenKey`` and ``TokenKeys`` are the ``devicekey`` interface of such a key, so that an
``attempt.Attempt`` uses it as it uses a key in a file; its record (in the pending identity
and the install journal) names the token, the label and the public key, never a PIN.

One object more than the C++ tool: ``--force`` generates the new key pair as ``tls-next``
(id ``02``) and keeps the old ``tls`` pair until the new certificate is verified, so that a
failed ``--force`` leaves the old registration working; ``TokenKey.store_certificate``
then swaps them. A crash in between is harmless: the key is found again by its public key,
under either label.

The CSR is signed on the token: ``cryptography``'s builder encodes the request and signs
it through the ``sign`` method of the private key it is given, so the key it gets is
``_TokenSigner``, an ``EllipticCurvePrivateKey`` whose ``sign`` has the token sign the
request's SHA-256 digest (a custom signer: cryptography's way for a key it does not hold).
The EC encodings (curve parameters, public point) go
through python-pkcs11's ``pkcs11.util.ec``.

Importing this module imports ``python-pkcs11`` (the ``hsm`` extra): only HSM mode does.
"""

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    NoSuchToken,
    PinExpired,
    PinIncorrect,
    PinInvalid,
    PinLenRange,
    PinLocked,
    PKCS11Error,
)
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from .errors import ConfigError, LocalFailure
from .settings import Hsm

LOG = logging.getLogger(__name__)

TOKEN_LABEL = "aktualizr"
KEY_LABEL, KEY_ID = "tls", b"\x01"
NEXT_LABEL, NEXT_ID = "tls-next", b"\x02"  # --force: the new key until it is certified
CERT_LABEL, CERT_ID = "client", b"\x03"
# What sota.toml's [p11] section names, as the C++ tool writes it.
P11_KEY_ID, P11_CERT_ID = "01", "03"

# A uuid in a slot's description, as the C++ tool looks for it (lower-case hex only).
_SLOT_UUID = re.compile(r"[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}")


def uuid_in(descriptions: list[str]) -> str | None:
    """The first uuid the slot descriptions carry: a secure element may name its slot
    after the device, and the C++ tool then registers the device under that uuid."""
    for description in descriptions:
        found = _SLOT_UUID.search(description)
        if found:
            return found.group(0)
    return None


def slot_uuid(hsm: Hsm) -> str | None:
    """The uuid of the module's slots (``uuid_in``); None when there is none or the slots
    cannot be listed (then the uuid is random, as the C++ tool makes it)."""
    try:
        return uuid_in([slot.slot_description for slot in _load(hsm.module).get_slots()])
    except PKCS11Error as e:
        LOG.warning("cannot read the uuid of the PKCS#11 slots: %s", _why(e))
        return None


def init_hint(module: str) -> str:
    """How a person initialises the token (this agent cannot: python-pkcs11 has no
    C_InitToken). Both commands ask for the PINs instead of taking them on argv."""
    return (
        f"initialise it first, e.g. `softhsm2-util --init-token --free --label {TOKEN_LABEL}` "
        f"(SoftHSM) or `pkcs11-tool --module {module} --init-token --init-pin "
        f"--label {TOKEN_LABEL} --login --login-type so`"
    )


def p11_section(hsm: Hsm) -> str:
    """sota.toml's ``[p11]`` section, as the C++ tool writes it (the PIN is in it)."""
    return (
        "[p11]\n"
        f"module = {json.dumps(hsm.module)}\n"
        f"pass = {json.dumps(hsm.pin)}\n"
        f'tls_pkey_id = "{P11_KEY_ID}"\n'
        f'tls_clientcert_id = "{P11_CERT_ID}"\n'
    )


def _load(module: str) -> Any:
    try:
        return pkcs11.lib(module)
    except (PKCS11Error, OSError, RuntimeError) as e:
        raise ConfigError(f"the HSM module {module} does not load (PKCS#11): {e}") from e


def find_token(hsm: Hsm) -> "pkcs11.Token":
    """The ``aktualizr`` token of the module, or ConfigError saying how to make it."""
    lib = _load(hsm.module)
    try:
        return lib.get_token(token_label=TOKEN_LABEL)
    except NoSuchToken:
        raise ConfigError(
            f"the PKCS#11 module {hsm.module} has no token labelled {TOKEN_LABEL!r}: "
            + init_hint(hsm.module)
        ) from None
    except PKCS11Error as e:
        raise LocalFailure(f"cannot list the tokens of {hsm.module}: {_why(e)}") from e


def _why(error: PKCS11Error) -> str:
    return str(error) or type(error).__name__


def _public_key(obj: "pkcs11.PublicKey") -> ec.EllipticCurvePublicKey:
    """The public key of a P-256 public key object on the token. PKCS#11 stores the point
    as a DER OCTET STRING; some modules give the bare uncompressed point (65 bytes)."""
    point = bytes(obj[Attribute.EC_POINT])
    if len(point) == 65:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    key = load_der_public_key(encode_ec_public_key(obj))
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the key on the token is not a P-256 key")
    return key


def _spki_hex(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo).hex()


class _Session:
    """What the key needs of one logged-in session on the ``aktualizr`` token."""

    def __init__(self, session: "pkcs11.Session") -> None:
        self.session = session

    def objects(self, object_class: ObjectClass, label: str) -> list:
        return list(self.session.get_objects({Attribute.CLASS: object_class,
                                              Attribute.LABEL: label}))

    def has(self, object_class: ObjectClass, label: str) -> bool:
        return bool(self.objects(object_class, label))

    def public_key(self, label: str) -> ec.EllipticCurvePublicKey | None:
        keys = self.objects(ObjectClass.PUBLIC_KEY, label)
        if len(keys) != 1 or not self.has(ObjectClass.PRIVATE_KEY, label):
            return None
        return _public_key(keys[0])

    def remove(self, label: str, *classes: ObjectClass) -> None:
        for object_class in classes or (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in self.objects(object_class, label):
                obj.destroy()

    def generate(self, label: str) -> ec.EllipticCurvePublicKey:
        """A new P-256 pair on the token as ``label`` (any older one of that label goes)."""
        self.remove(label)
        params = self.session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        public, _ = params.generate_keypair(
            store=True,
            label=label,
            id=KEY_ID if label == KEY_LABEL else NEXT_ID,
            public_template={Attribute.VERIFY: True, Attribute.PRIVATE: False},
            private_template={
                Attribute.SIGN: True,
                Attribute.DERIVE: True,  # fioconfig's ECIES: CKM_ECDH1_DERIVE on the token
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.PRIVATE: True,
            },
        )
        LOG.info("generated the device key on the token %s as %r", TOKEN_LABEL, label)
        return _public_key(public)

    def sign(self, label: str, data: bytes | bytearray | memoryview) -> bytes:
        """An ECDSA/SHA-256 signature of ``data`` by the token, DER (X9.62)."""
        (key,) = self.objects(ObjectClass.PRIVATE_KEY, label)
        raw = key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                    int.from_bytes(raw[half:], "big"))


class TokenKey:
    """The device key on the token (a ``devicekey.DeviceKey``): the pair ``label``, whose
    public half is ``public``. Every use opens its own session on the token."""

    def __init__(self, hsm: Hsm, label: str, public: ec.EllipticCurvePublicKey) -> None:
        self.hsm = hsm
        self.label = label
        self.public = public

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.public

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        """The builder's request for this key, signed by the token (``_TokenSigner``)."""
        return builder.sign(_TokenSigner(self), hashes.SHA256())

    def record(self) -> dict[str, str]:
        return {"token": TOKEN_LABEL, "label": self.label, "public": _spki_hex(self.public)}

    def files(self) -> dict[str, bytes]:
        return {}  # no pkey.pem: the key never leaves the token

    def config(self) -> str:
        return p11_section(self.hsm)

    def store_certificate(self, cert: x509.Certificate) -> None:
        """The answer is verified: a ``tls-next`` key takes the old ``tls`` key's place
        (the old pair goes), and the certificate is stored as ``client``, id 03."""
        with open_token(self.hsm) as token:
            if self.label == NEXT_LABEL:
                token.remove(KEY_LABEL)
                for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    for obj in token.objects(object_class, NEXT_LABEL):
                        obj[Attribute.ID] = KEY_ID
                        obj[Attribute.LABEL] = KEY_LABEL
                LOG.info("the new key replaced the old one on the token %s", TOKEN_LABEL)
                self.label = KEY_LABEL
            token.remove(CERT_LABEL, ObjectClass.CERTIFICATE)
            token.session.create_object({
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: CERT_LABEL,
                Attribute.ID: CERT_ID,
                Attribute.SUBJECT: cert.subject.public_bytes(),
                Attribute.VALUE: cert.public_bytes(Encoding.DER),
            })
        LOG.info("stored the certificate on the token %s as %r", TOKEN_LABEL, CERT_LABEL)

    def discard(self) -> None:
        """A failed ``--force``: its new key goes, the token is as it was."""
        if self.label == NEXT_LABEL:
            with open_token(self.hsm) as token:
                token.remove(NEXT_LABEL)

    def __repr__(self) -> str:
        return f"TokenKey({TOKEN_LABEL}:{self.label})"


class _TokenSigner(ec.EllipticCurvePrivateKey):
    """The token's private key as cryptography's builders take it: ``sign`` has the token
    sign, the rest is the public half's; the private half never leaves the token."""

    def __init__(self, key: TokenKey) -> None:
        self._key = key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._key.public.curve

    @property
    def key_size(self) -> int:
        return self._key.public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not (isinstance(signature_algorithm, ec.ECDSA)
                and isinstance(signature_algorithm.algorithm, hashes.SHA256)):
            raise TypeError("the token signs with ECDSA over SHA-256 only")
        with open_token(self._key.hsm) as token:
            return token.sign(self._key.label, data)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TypeError("the key on the token only signs")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TypeError("the key on the token is not extractable")

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        raise TypeError("the key on the token is not extractable")

    def __copy__(self) -> "_TokenSigner":
        return self

    def __deepcopy__(self, memo: dict) -> "_TokenSigner":
        return self

    def __repr__(self) -> str:
        return f"_TokenSigner({self._key!r})"


class TokenKeys:
    """Keys on the ``aktualizr`` token (a ``devicekey.KeyKind``).

    A ``tls`` key with a ``client`` certificate belongs to a registration: only ``force``
    replaces it, as ``tls-next`` until the new certificate is stored. A ``tls`` key without
    one is what an attempt killed before its install left: it is replaced."""

    def __init__(self, hsm: Hsm, *, force: bool) -> None:
        self.hsm = hsm
        self.force = force

    def generate(self) -> TokenKey:
        with open_token(self.hsm) as token:
            label = KEY_LABEL
            if token.has(ObjectClass.PRIVATE_KEY, KEY_LABEL) and token.has(
                ObjectClass.CERTIFICATE, CERT_LABEL
            ):
                if not self.force:
                    raise LocalFailure(
                        f"the token {TOKEN_LABEL} holds the key {KEY_LABEL!r} and the "
                        f"certificate {CERT_LABEL!r} of an earlier registration: run with "
                        "--force to replace them"
                    )
                label = NEXT_LABEL
            else:
                token.remove(NEXT_LABEL)
            return TokenKey(self.hsm, label, token.generate(label))

    def load(self, record: object) -> TokenKey:
        """The key a record names, found by its public key under ``tls-next`` or ``tls``
        (a promoted key changed its label); ValueError when it is not on the token."""
        if not isinstance(record, dict) or record.get("token") != TOKEN_LABEL:
            raise ValueError(f"it is not a key on the token {TOKEN_LABEL}")
        with open_token(self.hsm) as token:
            for label in (NEXT_LABEL, KEY_LABEL):
                public = token.public_key(label)
                if public is not None and _spki_hex(public) == record.get("public"):
                    return TokenKey(self.hsm, label, public)
        raise ValueError(f"its key is no longer on the token {TOKEN_LABEL}")


@contextmanager
def open_token(hsm: Hsm) -> Iterator[_Session]:
    """A session on the ``aktualizr`` token, logged in with the user PIN; ConfigError
    when the module does not load, the token is missing or it refuses the PIN;
    LocalFailure for the rest."""
    token = find_token(hsm)
    if not token.flags & pkcs11.TokenFlag.USER_PIN_INITIALIZED:
        _init_user_pin(token, hsm)
    try:
        session = token.open(rw=True, user_pin=hsm.pin)
    except (PinIncorrect, PinInvalid, PinLenRange) as e:
        raise ConfigError(f"the token {TOKEN_LABEL} refused the login ({type(e).__name__}): "
                          "check HSM_PIN") from e
    except (PinLocked, PinExpired) as e:
        raise LocalFailure(f"the token {TOKEN_LABEL} refused the login: its user PIN is "
                           f"{'locked' if isinstance(e, PinLocked) else 'expired'}") from e
    except PKCS11Error as e:
        raise LocalFailure(f"cannot open the token {TOKEN_LABEL}: {_why(e)}") from e
    try:
        yield _Session(session)
    except PKCS11Error as e:
        raise LocalFailure(f"the token {TOKEN_LABEL} failed: {_why(e)}") from e
    finally:
        try:
            session.close()
        except PKCS11Error as e:
            LOG.debug("closing the session on %s: %s", TOKEN_LABEL, _why(e))


def pin_hint(module: str) -> str:
    """How a person sets the user PIN of a token that has none. The command asks for the
    SO PIN and the new user PIN instead of taking them on argv."""
    return (
        f"set it first, e.g. `pkcs11-tool --module {module} --token-label {TOKEN_LABEL} "
        "--login --login-type so --init-pin`"
    )


def _init_user_pin(token: "pkcs11.Token", hsm: Hsm) -> None:
    """A token that is initialised but has no user PIN yet gets it, with the SO PIN, as
    the C++ tool does after initialising a token. python-pkcs11 before 0.9 (meta-python's
    0.7.0) has no ``Session.init_pin``: then a ConfigError says how to set the PIN."""
    if not hasattr(pkcs11.Session, "init_pin"):
        raise ConfigError(
            f"the token {TOKEN_LABEL} has no user PIN and this python-pkcs11 cannot set one "
            f"(Session.init_pin came with python-pkcs11 0.9): {pin_hint(hsm.module)}"
        )
    LOG.info("setting the user PIN of the token %s with the SO PIN", TOKEN_LABEL)
    try:
        with token.open(rw=True, so_pin=hsm.so_pin) as session:
            session.init_pin(hsm.pin)
    except (PinIncorrect, PinInvalid, PinLenRange) as e:
        raise ConfigError(f"the token {TOKEN_LABEL} refused the SO login "
                          f"({type(e).__name__}): check HSM_SOPIN") from e
    except PKCS11Error as e:
        raise LocalFailure(f"cannot set the user PIN of {TOKEN_LABEL}: {_why(e)}") from e
