"""``demo``: a whole registration of a simulated device, with nothing but this machine.

Starts the test kit's HTTPS registration server (a throwaway CA) on 127.0.0.1, lays out a
simulated device in a temporary directory, registers it in production mode through the
same code path a device uses, and shows the result.
"""

import logging
import tempfile
from pathlib import Path

from .errors import ConfigError
from .output import show_demo
from .register import register
from .settings import resolve

LOG = logging.getLogger(__name__)
DEMO_FACTORY = "demo-factory"


def check_keep(keep: str) -> Path:
    """The directory ``--keep`` names, if the demo may build its device there: it must be
    a new or an empty directory (``ConfigError`` saying what to do otherwise)."""
    root = Path(keep)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--keep {keep}: not a directory; name a new directory for the "
                          "demo device (it is created)")
    if root.is_dir() and any(root.iterdir()):
        raise ConfigError(f"--keep {keep}: the directory is not empty (an earlier demo's "
                          "device?); remove it, or name a new or empty directory")
    return root


def run_demo(*, keep: str | None, as_json: bool) -> int:
    from .testing.device import FakeDevice
    from .testing.server import RegistrationServer

    kept = check_keep(keep) if keep else None
    with tempfile.TemporaryDirectory(prefix="lmp-autoreg-demo-") as tmp:
        root = kept or Path(tmp) / "device"
        device = FakeDevice(root, factory=DEMO_FACTORY, token=None, apps=("fiotest", "shellhttpd"))
        try:
            device.build()
        except OSError as e:  # e.g. a file where a parent directory of --keep should be
            raise ConfigError(f"--keep {keep}: cannot build the demo device there "
                              f"({e.strerror or e}); name a directory that can be written") from e
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
        show_demo(result, device.sota, kept=kept, as_json=as_json)
    return 0
