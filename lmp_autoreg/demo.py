"""``demo``: a whole registration of a simulated device, with nothing but this machine.

Starts the test kit's HTTPS registration server (a throwaway CA) and its device gateway on
127.0.0.1, lays out a simulated device in a temporary directory, registers it in
production mode through the same code path a device uses, checks in with the gateway as
``fioconfig check-in`` would (the kit's stand-in: the demo has no fioconfig binary), and
shows the result and the configuration files that arrived, decrypted with the device's
key.
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
# What the demo's device gateway gives every device: (content, sent in clear).
DEMO_CONFIG = {
    "wifi.conf": ("ssid=factory-floor\npsk=not-a-real-secret\n", False),
    "motd": ("Configured by the lmp-autoreg demo's device gateway.\n", True),
}
SECRETS_DIR = "var/run/secrets"


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
    from .testing.fioconfig import CheckIn, Config, Fatal
    from .testing.gateway import ConfigFile, DeviceGateway
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
        with RegistrationServer(tls=True, factory=DEMO_FACTORY, gateway=DeviceGateway) as server:
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
            assert isinstance(server.gateway, DeviceGateway)
            server.gateway.set_config(None, {name: ConfigFile(text, unencrypted=plain)
                                             for name, (text, plain) in DEMO_CONFIG.items()})
            secrets = root / SECRETS_DIR
            secrets.mkdir(mode=0o750, parents=True, exist_ok=True)
            try:
                config = Config([str(device.sota / "sota.toml")], root=str(root))
                arrived = CheckIn(config, str(secrets)).run()
                result.fioconfig = "ok"
            except (Fatal, OSError) as e:  # shown, not fatal: the registration stands
                LOG.warning("the demo's check-in with its device gateway failed: %s", e)
                arrived, result.fioconfig = {}, f"failed: {e}"
        files = {name: f"{(secrets / name).stat().st_mode & 0o777:04o}" for name in arrived}
        show_demo(result, device.sota, kept=kept, as_json=as_json,
                  config=(secrets if kept else None, files))
    return 0
