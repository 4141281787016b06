"""``status``: is this device registered, and as what? Reads files only; sends nothing."""

from typing import Any

from .install import is_registered
from .paths import DevicePaths
from .state import State


def device_status(paths: DevicePaths) -> dict[str, Any]:
    """SPEC section 6's status object for the device at ``paths``."""
    registered = is_registered(paths.sota)
    status: dict[str, Any] = {
        "registered": registered,
        "uuid": None,
        "factory": None,
        "production": None,
        "not_after": None,
        "sota_dir": str(paths.sota_device),
        # An interrupted attempt waits (its identity, or an unfinished install).
        "pending": not registered and State(paths).has_pending(),
    }
    try:
        pem = paths.in_sota("client.pem").read_bytes()
    except OSError:
        return status
    from . import identity

    try:
        info = identity.describe(identity.load_certificate(pem))
    except ValueError:
        return status
    status.update(
        uuid=info.common_name,
        factory=info.organizational_unit,
        production=info.production,
        not_after=info.not_after,
    )
    return status
