"""The board's own serial number: which physical board a registration gave its identity.

A factory jig reads the agent's result and must tie the board on its bench to the uuid it
got; the uuid is random, the board's serial is not. ``read(paths)`` looks, in this order
(docs/spec.md section 6), and takes the first usable value:

1. the device tree's ``serial-number`` (``paths.DEVICE_TREE_SERIAL``; a NUL-terminated
   string, which ``/proc/device-tree/serial-number`` shows too);
2. DMI's ``product_serial``, then ``board_serial`` (``/sys/class/dmi/id/``);
3. the MAC address of the first wired network interface: the entries of
   ``/sys/class/net`` sorted by name, the first with a ``device`` link (hardware, not a
   bridge, a tunnel or ``lo``), ``type`` 1 (ARPHRD_ETHER), neither ``wireless`` nor
   ``phy80211`` (not Wi-Fi), an address the kernel did not make up at random
   (``addr_assign_type`` not 1) and not all zeros.

Each file is read under ``--sysroot`` through ``paths``, with ``checked.read_file`` (a
regular file only, never blocking) and at most ``SERIAL_BYTES``; its value is taken as a
setting is (``checked.setting``: UTF-8 without control characters). A value that cannot
be read or is not text is left out with a warning, a firmware placeholder ("To Be Filled
By O.E.M.") with a note, and the next source is tried. The serial goes into the result,
the logs and the journal (``LMP_BOARD_SERIAL``), never to the server.
"""

from __future__ import annotations

import logging
import os
import re

from . import checked
from .errors import ConfigError
from .paths import DEVICE_TREE_SERIAL, DMI_SERIALS, NET_DIR

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (about 4 ms)
if TYPE_CHECKING:
    from pathlib import PurePosixPath

    from .paths import DevicePaths

LOG = logging.getLogger(__name__)

# A serial number is a few dozen characters; a file that holds more is not one.
SERIAL_BYTES = 256
# What firmware writes into DMI when the maker filled in nothing (compared casefolded).
PLACEHOLDERS = frozenset(s.casefold() for s in (
    "To Be Filled By O.E.M.", "Default string", "Not Specified", "Not Applicable",
    "System Serial Number", "Base Board Serial Number", "None", "N/A", "0", "00000000",
    "0123456789", "123456789",
))
ARPHRD_ETHER = "1"
NET_ADDR_RANDOM = "1"  # addr_assign_type: a new address at every boot
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
NO_MAC = "00:00:00:00:00:00"


def read(paths: DevicePaths) -> dict[str, str] | None:
    """``{"serial": ..., "source": DEVICE_PATH}`` of the first source that has a usable
    serial, or None when none has."""
    for source in (DEVICE_TREE_SERIAL, *DMI_SERIALS):
        serial = _value(paths, source)
        if serial is not None and serial.casefold() in PLACEHOLDERS:
            LOG.info("board serial: %s holds %s, a placeholder: trying the next source",
                     source, checked.shown(serial))
        elif serial:
            return {"serial": serial, "source": str(source)}
    return _wired_mac(paths)


def _value(paths: DevicePaths, source: PurePosixPath) -> str | None:
    """The text in ``source`` (one trailing NUL and surrounding white space off); None
    when there is none, or it cannot be read or is not text (warned)."""
    try:
        data = checked.read_file(paths.host(source), SERIAL_BYTES)
    except (OSError, ConfigError) as e:  # ConfigError: a loop of links in the image
        # DMI's serials are root's alone: a person's `status` is not warned about them.
        level = logging.INFO if isinstance(e, PermissionError) else logging.WARNING
        LOG.log(level, "board serial: cannot read %s: %s; trying the next source", source,
                getattr(e, "strerror", None) or e)
        return None
    if data is None:
        return None
    value = checked.decode(data.removesuffix(b"\0")).strip()
    try:
        return checked.setting(value, f"the board serial in {source}")
    except ConfigError as e:
        LOG.warning("%s; trying the next source", e)
        return None


def _wired_mac(paths: DevicePaths) -> dict[str, str] | None:
    """The MAC address of the first wired interface (the module's docstring says which
    that is), or None."""
    try:
        names = sorted(os.listdir(paths.host(NET_DIR)))
    except (OSError, ConfigError):  # no /sys/class/net: an image, a container
        return None
    for name in names:
        try:
            checked.setting(name, "an interface name")
        except ConfigError:  # not text: not a name the kernel gave
            continue
        interface = NET_DIR / name
        if not _is_wired(paths, interface):
            continue
        address = _value(paths, interface / "address")
        if address is not None and MAC_RE.fullmatch(address) and address != NO_MAC:
            return {"serial": address, "source": str(interface / "address")}
        if address is not None:
            LOG.warning("board serial: %s holds %s, not a MAC address: trying the next "
                        "interface", interface / "address", checked.shown(address))
    return None


def _is_wired(paths: DevicePaths, interface: PurePosixPath) -> bool:
    def has(name: str) -> bool:
        try:
            return os.path.exists(paths.host(interface / name))
        except (OSError, ConfigError):
            return False

    if not has("device") or has("wireless") or has("phy80211"):
        return False
    if _value(paths, interface / "type") != ARPHRD_ETHER:
        return False
    if _value(paths, interface / "addr_assign_type") == NET_ADDR_RANDOM:
        LOG.info("board serial: %s has a random MAC address, new at every boot: not a serial",
                 interface)
        return False
    return True
