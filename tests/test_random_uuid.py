"""util.random_uuid: what uuid.uuid4() gives, without importing uuid (docs/performance.md)."""

import uuid

from lmp_autoreg.settings import UUID_RE
from lmp_autoreg.util import random_uuid


def test_random_uuid_is_a_version_4_uuid_written_as_uuid_writes_it():
    seen = set()
    for _ in range(200):
        text = random_uuid()
        parsed = uuid.UUID(text)
        assert str(parsed) == text and UUID_RE.fullmatch(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        seen.add(text)
    assert len(seen) == 200
