"""How a partially detached registration server creates a device in the devices API.

The reference server (factory-registration-ref, with ``FIO_API_TOKEN`` and
``DEVICE_REGISTRATION_API``) does it before it answers ``/sign``, and the kit's server
does it the same way (docs/spec.md section 8): a ``PUT`` to the API with the
``OSF-TOKEN`` header and a JSON body of ``client.pem`` (the certificate just signed), the
device's ``name`` when it sent one and the server's ``group`` when it has one. A 409 ends
it at once and the device gets the 409 with the API's text; another failure is tried
again after 0.1, 0.2 and 1 s, and the fourth failure gives the device a 500 with the
API's last text. Unlike the reference server, which crashes (a 500 too) on an API it
cannot reach, the kit counts an unreachable API as one more failure.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import requests

LOG = logging.getLogger(__name__)

#: The waits between tries, as the reference server has them.
WAITS = (0.1, 0.2, 1.0)
#: Seconds one try may take (the reference server sets none).
TIMEOUT = 30.0


@dataclass(frozen=True)
class Refused:
    """The device's answer when the API did not create it: ``status`` and ``text``."""

    status: int
    text: str


def create_device(
    url: str,
    token: str,
    client_pem: str,
    *,
    name: str | None = None,
    group: str | None = None,
    verify: bool | str = True,
    stopping: threading.Event | None = None,
) -> Refused | None:
    """Create the device of ``client_pem`` in the API at ``url``; None once it is created.

    ``verify`` is requests' (a CA bundle for an HTTPS API of the kit's CA); ``stopping``
    ends the waits early (the server is stopping: the last answer stands).
    """
    body: dict[str, str] = {"client.pem": client_pem}
    if group:
        body["group"] = group
    if name:
        body["name"] = name
    headers = {"OSF-TOKEN": token}
    stopping = stopping or threading.Event()
    refused = Refused(500, "")
    for wait in (*WAITS, 0.0):
        try:
            answer = requests.put(url, json=body, headers=headers, verify=verify,
                                  timeout=TIMEOUT)
        except requests.RequestException as error:
            LOG.warning("devices API unreachable: %s", type(error).__name__)
            refused = Refused(500, f"Devices API unreachable: {type(error).__name__}")
        else:
            if answer.status_code == 409:
                LOG.info("devices API: conflict: %s", answer.text)
                return Refused(409, answer.text)
            if answer.ok:
                return None
            LOG.warning("devices API answered HTTP %d", answer.status_code)
            refused = Refused(500, answer.text)
        if wait and stopping.wait(wait):
            break
    return refused
