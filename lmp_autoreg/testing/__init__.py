"""The public test kit of lmp-autoreg.

- :class:`ThrowawayCA`: an in-memory EC P-256 CA that signs device CSRs.
- :class:`RegistrationServer`, :class:`Reply`, :class:`RecordedRequest`: a loopback
  registration server with scripted faults.
- :class:`FakeDevice`, :func:`populate`: device file trees on disk or in pyfakefs.
- ``lmp_autoreg.testing.plugin``: pytest fixtures, loaded automatically once installed.

Names are imported on first use, so importing this package (as the pytest plugin does)
does not load ``cryptography``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmp_autoreg.testing.ca import ThrowawayCA
    from lmp_autoreg.testing.device import FakeDevice, populate
    from lmp_autoreg.testing.server import RecordedRequest, RegistrationServer, Reply

_HOMES = {
    "ThrowawayCA": "lmp_autoreg.testing.ca",
    "FakeDevice": "lmp_autoreg.testing.device",
    "populate": "lmp_autoreg.testing.device",
    "RecordedRequest": "lmp_autoreg.testing.server",
    "RegistrationServer": "lmp_autoreg.testing.server",
    "Reply": "lmp_autoreg.testing.server",
}

__all__ = [
    "FakeDevice",
    "RecordedRequest",
    "RegistrationServer",
    "Reply",
    "ThrowawayCA",
    "populate",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
