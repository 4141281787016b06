"""``status``: is this device registered, and as what? Reads files only; sends nothing."""

from typing import Any

from . import board, checked, der
from .guard import client_cert, is_registered
from .paths import DevicePaths
from .state import State


def device_status(paths: DevicePaths) -> dict[str, Any]:
    """docs/spec.md section 6's status object for the device at ``paths``."""
    registered = is_registered(paths.sota, str(paths.sota_device))
    status: dict[str, Any] = {
        "registered": registered,
        "uuid": None,
        "factory": None,
        "production": None,
        "not_after": None,
        "sota_dir": str(paths.sota_device),
        # An interrupted attempt waits (its identity, or an unfinished install).
        "pending": not registered and State(paths).has_pending(),
        "board": board.read(paths),
    }
    # The small DER reader, not cryptography: status only shows these fields (they were
    # verified when the certificate was installed), and cryptography triples its start-up.
    try:
        pem = checked.read_file(client_cert(paths.sota, str(paths.sota_device)))
        if pem is None:
            return status
        data = der.pem_to_der(pem)
        subject = der.subject(data)
        not_after = der.not_after(data)
    except (OSError, ValueError):
        return status
    status.update(
        uuid=der.first(subject, der.COMMON_NAME),
        factory=der.first(subject, der.ORGANIZATIONAL_UNIT),
        production=(der.BUSINESS_CATEGORY, "production") in subject,
        not_after=not_after,
    )
    return status
