"""The device's file layout, and how device paths map onto the machine running the agent.

Every device path (``/etc/os-release``, ``/var/sota``, ``<sota>/.lmp-autoreg``, ...) goes
through ``DevicePaths.host``: on a device the sysroot is ``/``; on a mounted image it is
wherever the image is mounted, and the path is resolved inside it as the device itself
would resolve it (``guard.host_path``, one component at a time, the way ``chroot`` or
``openat2(RESOLVE_IN_ROOT)`` would): an absolute link starts again at the sysroot, ``..``
never climbs above it. A link in an image never leads onto the machine running the
agent, whatever directory it names, the state directory and ``compose-apps`` included.
Paths a person types for the machine running the agent (``--token-file``, ``--cacert``,
binaries) never come here.
"""

from pathlib import Path, PurePosixPath
from typing import NamedTuple

from .guard import STATE_DIR, host_path

DEFAULT_SOTA_DIR = PurePosixPath("/var/sota")
DEFAULTS_FILE = PurePosixPath("/etc/default/lmp-device-auto-register")
OS_RELEASE = PurePosixPath("/etc/os-release")
SOTA_TAG = PurePosixPath("/etc/sota/tag")
HSM_CONFIG = PurePosixPath("/etc/sota/hsm")
HOSTNAME = PurePosixPath("/etc/hostname")
TOKEN_FILE = PurePosixPath("/etc/lmp-device-register-token")
AKLITE_LOCK = PurePosixPath("/var/lock/aklite.lock")
# Where the board's serial number is looked for (``board``), in this order: the device
# tree's ``serial-number`` (``/proc/device-tree`` is a link to the same directory), DMI's
# serials, the network interfaces.
DEVICE_TREE_SERIAL = PurePosixPath("/sys/firmware/devicetree/base/serial-number")
DMI_SERIALS = (PurePosixPath("/sys/class/dmi/id/product_serial"),
               PurePosixPath("/sys/class/dmi/id/board_serial"))
NET_DIR = PurePosixPath("/sys/class/net")

# Files a registration leaves in the sota dir; --force removes exactly these.
REGISTRATION_FILES = ("sql.db", "client.pem", "pkey.pem", "root.crt", "client.chained", "sota.toml")


class DevicePaths(NamedTuple):
    """Host paths of the device files, for a device whose root is ``sysroot``."""

    sysroot: Path = Path("/")
    sota_device: PurePosixPath = DEFAULT_SOTA_DIR

    def host(self, device_path: PurePosixPath | str) -> Path:
        """Where ``device_path`` (an absolute path on the device) lives on this machine;
        links inside a mounted image stay inside it (``guard.host_path``)."""
        return Path(host_path(str(self.sysroot), str(device_path)))

    @property
    def is_live(self) -> bool:
        """True when the agent runs on the device itself (sysroot ``/``)."""
        return self.sysroot.resolve() == Path("/")

    @property
    def sota(self) -> Path:
        return self.host(self.sota_device)

    @property
    def compose_apps(self) -> Path:
        return self.host(self.sota_device / "compose-apps")

    @property
    def state_dir(self) -> Path:
        """The agent's own state (lock, pending identity): ``<sota>/.lmp-autoreg``."""
        return self.host(self.sota_device / STATE_DIR)

    @property
    def defaults_file(self) -> Path:
        return self.host(DEFAULTS_FILE)

    @property
    def os_release(self) -> Path:
        return self.host(OS_RELEASE)

    @property
    def sota_tag(self) -> Path:
        return self.host(SOTA_TAG)

    @property
    def hsm_config(self) -> Path:
        return self.host(HSM_CONFIG)

    @property
    def hostname(self) -> Path:
        return self.host(HOSTNAME)

    @property
    def token_file(self) -> Path:
        return self.host(TOKEN_FILE)

    @property
    def aklite_lock(self) -> Path:
        return self.host(AKLITE_LOCK)
