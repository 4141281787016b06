"""``demo``: a whole registration of a simulated device, with nothing but this machine.

Starts the test kit's HTTPS registration server (a throwaway CA) on 127.0.0.1, lays out a
simulated device in a temporary directory, registers it in production mode through the
same code path a device uses, and shows the result.
"""

import logging
import tempfile
from pathlib import Path

from .output import show_demo
from .register import register
from .settings import resolve

LOG = logging.getLogger(__name__)
DEMO_FACTORY = "demo-factory"


def run_demo(*, keep: str | None, as_json: bool) -> int:
    from .testing.device import FakeDevice
    from .testing.server import RegistrationServer

    with tempfile.TemporaryDirectory(prefix="lmp-autoreg-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp) / "device"
        device = FakeDevice(root, factory=DEMO_FACTORY, token=None, apps=("fiotest", "shellhttpd"))
        device.build()
        with RegistrationServer(tls=True, factory=DEMO_FACTORY) as server:
            settings = resolve(
                {
                    "sysroot": str(root),
                    "device_api": server.url,
                    "production": True,
                    "cacert": str(server.ca_file),
                    "fioconfig": "off",
                    "no_start": True,
                    "timeout": 30,
                },
                {},
            )
            LOG.info("demo server at %s, device root %s", server.url, root)
            result = register(settings)
        show_demo(result, device.sota, kept=root if keep else None, as_json=as_json)
    return 0
