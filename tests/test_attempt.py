"""``attempt.Attempt`` with a second kind of device key: the interface of ``devicekey`` is
all an attempt needs, so a key that is not a file plugs in without touching the attempt.

``HeldKeys`` is such a kind, written here as the PKCS#11 one will be: its key is never
installed as a file, and its record names the key instead of holding it. (It holds the
key in a dict of this test, where a token would hold it.) The registration is real:
the test kit's server signs the CSR and the answer is verified and installed on disk.
"""

import json

import pytest

from lmp_autoreg import client, identity
from lmp_autoreg.attempt import Attempt
from lmp_autoreg.result import Result
from lmp_autoreg.settings import resolve

TOKEN = {}  # key id -> FileKey: the "token" of this test
STORED = {}  # key id -> the certificate the attempt stored with its key


class HeldKey:
    def __init__(self, key_id: str, key: identity.FileKey) -> None:
        self.key_id = key_id
        self._key = key

    def public_key(self):
        return self._key.public_key()

    def sign_csr(self, builder):
        return self._key.sign_csr(builder)

    def record(self):
        return {"on": "test-token", "id": self.key_id}

    def files(self):
        return {}

    def config(self):
        return ""

    def store_certificate(self, cert):
        STORED[self.key_id] = cert


class HeldKeys:
    def generate(self) -> HeldKey:
        key_id = f"{len(TOKEN):02x}"
        TOKEN[key_id] = identity.FileKey.generate()
        return HeldKey(key_id, TOKEN[key_id])

    def load(self, record) -> HeldKey:
        if not isinstance(record, dict) or record.get("on") != "test-token":
            raise ValueError("not a key on the test token")
        return HeldKey(record["id"], TOKEN[record["id"]])


@pytest.fixture
def settings(device_root, registration_server):
    return resolve({"sysroot": str(device_root.root), "device_api": registration_server.url,
                    "fioconfig": "off", "no_start": True, "timeout": 10}, {})


def send(settings, attempt: Attempt) -> dict[str, str]:
    csr = identity.make_csr(attempt.key, attempt.uuid, settings.factory, settings.production)
    body = client.request_body(settings, uuid=attempt.uuid, csr=csr)
    http = client.RegistrationClient(settings)
    try:
        return http.post(body, timeout=5)
    finally:
        http.close()


def test_a_key_that_is_not_a_file_registers_through_the_same_attempt(settings, sota):
    result = Result()
    with Attempt.locked(settings, result, HeldKeys(), force=False) as attempt:
        uuid = attempt.take_identity()
        pending = json.loads((sota / ".lmp-autoreg/identity.json").read_text())
        assert pending == {"uuid": uuid, "key": attempt.key.record()}  # no key material
        files = send(settings, attempt)
        attempt.install(files, attempt.verify(files))
    assert result.result == "registered" and result.uuid == uuid
    assert "pkey.pem" not in result.files and not (sota / "pkey.pem").exists()
    cert = identity.load_certificate((sota / "client.pem").read_bytes())
    assert cert.public_key() == TOKEN[pending["key"]["id"]].public_key()
    assert STORED[pending["key"]["id"]] == cert  # stored with the key before sota.toml
    assert sorted(p.name for p in (sota / ".lmp-autoreg").iterdir()) == ["lock"]


def test_the_pending_record_brings_the_same_key_back(settings, sota):
    with Attempt.locked(settings, Result(), HeldKeys(), force=False) as first:
        uuid = first.take_identity()  # then the run dies before sending anything
    with Attempt.locked(settings, Result(), HeldKeys(), force=False) as again:
        assert again.take_identity() == uuid and again.reused
        assert again.key.public_key() == first.key.public_key()


def test_a_record_of_another_kind_is_replaced_by_a_new_identity(settings, sota):
    with Attempt.locked(settings, Result(), identity.FILE_KEYS, force=False) as by_file:
        uuid = by_file.take_identity()
    with Attempt.locked(settings, Result(), HeldKeys(), force=False) as held:
        assert held.take_identity() != uuid and not held.reused
        assert isinstance(held.key, HeldKey)


def test_an_answer_for_another_key_is_refused(settings, sota):
    from lmp_autoreg.errors import BadAnswer

    with Attempt.locked(settings, Result(), HeldKeys(), force=False) as attempt:
        attempt.take_identity()
        files = send(settings, attempt)
        attempt.key = HeldKeys().generate()  # as if the token now held another key
        with pytest.raises(BadAnswer, match="another key"):
            attempt.verify(files)
    assert not (sota / "client.pem").exists()
