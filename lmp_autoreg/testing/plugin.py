"""pytest plugin of the lmp-autoreg test kit (registered through the ``pytest11`` entry point).

Fixtures:

- ``registration_server``: a started HTTP :class:`~lmp_autoreg.testing.RegistrationServer`
  with its device gateway (``.gateway``), which the ``sota.toml`` it sends names.
- ``registration_server_tls``: the same over HTTPS; trust it with ``server.ca_file``.

Both take :class:`~lmp_autoreg.testing.RegistrationServer`'s options from a
``registration_server`` marker, e.g. a partially detached factory with its devices API:
``@pytest.mark.registration_server(partially_detached=True, device_group="line-1")``.
- ``fake_device``: a :class:`~lmp_autoreg.testing.FakeDevice` built at ``/`` in pyfakefs.
- ``device_root``: a :class:`~lmp_autoreg.testing.FakeDevice` built in ``tmp_path/device``.

pytest loads this module in every run, so it imports nothing heavy at module level:
the kit (and ``cryptography``) is imported when a fixture is first used.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from lmp_autoreg.testing.device import FakeDevice
    from lmp_autoreg.testing.server import RegistrationServer


MARKER = "registration_server"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(**options): RegistrationServer options for the "
        "registration_server and registration_server_tls fixtures")


def _serve(request: pytest.FixtureRequest, tls: bool) -> Iterator[RegistrationServer]:
    from lmp_autoreg.testing.gateway import DeviceGateway
    from lmp_autoreg.testing.server import RegistrationServer

    marker = request.node.get_closest_marker(MARKER)
    options = dict(marker.kwargs) if marker is not None else {}
    with RegistrationServer(tls=tls, gateway=DeviceGateway, **options) as server:
        yield server


@pytest.fixture
def registration_server(request: pytest.FixtureRequest) -> Iterator[RegistrationServer]:
    """A loopback HTTP registration server, stopped after the test."""
    yield from _serve(request, tls=False)


@pytest.fixture
def registration_server_tls(request: pytest.FixtureRequest) -> Iterator[RegistrationServer]:
    """A loopback HTTPS registration server; its CA file is ``.ca_file``."""
    yield from _serve(request, tls=True)


@pytest.fixture
def fake_device(request: pytest.FixtureRequest) -> FakeDevice:
    """A device built at ``/`` inside pyfakefs's fake file system (the ``fs`` fixture)."""
    if importlib.util.find_spec("pyfakefs") is None:
        pytest.fail("the fake_device fixture needs pyfakefs: pip install pyfakefs")
    request.getfixturevalue("fs")
    from lmp_autoreg.testing.device import FakeDevice

    return FakeDevice("/").build()


@pytest.fixture
def device_root(tmp_path: Path) -> FakeDevice:
    """A device built under ``tmp_path / "device"`` on the real disk."""
    from lmp_autoreg.testing.device import FakeDevice

    return FakeDevice(tmp_path / "device").build()
