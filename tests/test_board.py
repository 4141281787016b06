"""The board's serial number (docs/spec.md section 6, "The board"): each source in its
order, none, and values that are not text; in-process on a pyfakefs device, and through
the program."""

import json
import logging
import os

import pytest

from lmp_autoreg import board
from lmp_autoreg.paths import DevicePaths
from lmp_autoreg.testing.device import FakeDevice, populate
from lmp_autoreg.testing.server import Reply

from conftest import device_args, run_cli

DT = "/sys/firmware/devicetree/base/serial-number"
PRODUCT = "/sys/class/dmi/id/product_serial"
BOARD = "/sys/class/dmi/id/board_serial"


def write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def interface(root: str, name: str, address: str, *, kind: str = "1", device: bool = True,
              wireless: str | None = None, assign: str = "0") -> None:
    """``/sys/class/net/<name>`` as the kernel shows an interface (a directory here, where
    the kernel has a link into /sys/devices: the agent follows either)."""
    files: dict = {"address": address + "\n", "type": kind + "\n",
                   "addr_assign_type": assign + "\n"}
    if device:
        files["device"] = None
    if wireless:  # what marks Wi-Fi: "wireless" (a directory), "phy80211" (a link)
        files[wireless] = None
    populate(os.path.join(root, "sys/class/net", name), files)


@pytest.fixture
def device(fs):
    """A device at / in pyfakefs, with no board serial anywhere."""
    return FakeDevice("/").build()


def read() -> dict | None:
    return board.read(DevicePaths())


def test_the_device_tree_comes_first(fs):
    FakeDevice("/", board_serial="SN-0042").build()
    write(PRODUCT, "DMI-1\n")
    interface("/", "eth0", "00:11:22:33:44:55")
    assert read() == {"serial": "SN-0042", "source": DT}
    # The kernel's form: NUL-terminated, no newline.
    with open(DT, "rb") as f:
        assert f.read() == b"SN-0042\0"


def test_then_dmi_product_serial_then_board_serial(device):
    write(BOARD, "BOARD-7\n")
    interface("/", "eth0", "00:11:22:33:44:55")
    assert read() == {"serial": "BOARD-7", "source": BOARD}
    write(PRODUCT, "  PRODUCT-3 \n")
    assert read() == {"serial": "PRODUCT-3", "source": PRODUCT}


@pytest.mark.parametrize("placeholder", ["To Be Filled By O.E.M.", "Default string", "0",
                                         "not specified", ""])
def test_a_firmware_placeholder_is_no_serial(device, placeholder):
    write(PRODUCT, placeholder + "\n")
    write(BOARD, "BOARD-7\n")
    assert read() == {"serial": "BOARD-7", "source": BOARD}


def test_else_the_first_wired_interface_sorted_by_name(device):
    interface("/", "lo", "00:00:00:00:00:00", kind="772", device=False)
    interface("/", "br0", "02:00:00:00:00:01", device=False)  # a bridge: no device
    interface("/", "can0", "", kind="280")  # not Ethernet
    interface("/", "eth1", "00:11:22:33:44:66")
    interface("/", "end0", "00:00:00:00:00:00")  # no address
    interface("/", "enu1", "06:11:22:33:44:77", assign="1")  # random, new at every boot
    interface("/", "eth0", "00:11:22:33:44:55")
    interface("/", "dlan0", "00:11:22:33:44:99", wireless="wireless")  # Wi-Fi
    interface("/", "dlan1", "00:11:22:33:44:98", wireless="phy80211")
    assert read() == {"serial": "00:11:22:33:44:55",
                      "source": "/sys/class/net/eth0/address"}


def test_none(device):
    assert read() is None
    interface("/", "wlan0", "00:11:22:33:44:55", wireless="wireless")
    interface("/", "lo", "00:00:00:00:00:00", kind="772", device=False)
    assert read() is None


@pytest.mark.parametrize("value", [
    b"\xff\xfeSN\0",  # not UTF-8
    b"SN\x1b[2J\0",  # a control character
    b"SN\0OTHER\0",  # two strings: a NUL inside
    b"S" * 300,  # longer than a serial
    b"\xed\xa0\x80\0",  # a surrogate, in UTF-8's form
])
def test_a_value_that_is_not_text_is_left_out_with_a_warning(fs, caplog, value):
    FakeDevice("/", board_serial=value).build()
    write(BOARD, "BOARD-7\n")
    with caplog.at_level(logging.WARNING, logger="lmp_autoreg"):
        assert read() == {"serial": "BOARD-7", "source": BOARD}
    [warning] = caplog.records
    assert DT in warning.getMessage() and "trying the next source" in warning.getMessage()


def test_something_other_than_a_file_is_left_out(device, caplog):
    os.makedirs(DT)
    with caplog.at_level(logging.WARNING, logger="lmp_autoreg"):
        assert read() is None
    assert "not a regular file" in caplog.text


def test_a_mac_that_is_not_one_tries_the_next_interface(device, caplog):
    interface("/", "eth0", "00:11:22")
    interface("/", "eth1", "00:11:22:33:44:66")
    assert read() == {"serial": "00:11:22:33:44:66", "source": "/sys/class/net/eth1/address"}
    assert "not a MAC address" in caplog.text


def test_read_under_the_sysroot(tmp_path):
    """A mounted image's files, through links as the device resolves them; the machine's
    own /sys is never read."""
    root = tmp_path / "image"
    FakeDevice(root).build()
    (root / "sys/devices/eth").mkdir(parents=True)
    interface(str(root / "sys/devices/eth"), "eth0", "00:11:22:33:44:55")
    (root / "sys/class/net").mkdir(parents=True)
    (root / "sys/class/net/eth0").symlink_to("/sys/devices/eth/sys/class/net/eth0")
    assert board.read(DevicePaths(root)) == {"serial": "00:11:22:33:44:55",
                                             "source": "/sys/class/net/eth0/address"}
    assert board.read(DevicePaths(tmp_path / "empty")) is None


# --- through the program ------------------------------------------------------------------

def test_the_result_carries_the_board_and_the_server_never_sees_it(tmp_path,
                                                                  registration_server):
    device = FakeDevice(tmp_path / "device", board_serial="SN-0042").build()
    run = run_cli(*device_args(device, registration_server, "--json"))
    assert run.returncode == 0, run.stderr
    assert run.json["board"] == {"serial": "SN-0042", "source": DT}
    assert list(run.json)[:6] == ["result", "uuid", "name", "factory", "hardware_id", "board"]
    [post] = registration_server.posts
    assert b"SN-0042" not in post.body and "SN-0042" not in str(post.headers)
    status = run_cli("status", "--sysroot", str(device.root), "--json").json
    assert status["board"] == {"serial": "SN-0042", "source": DT}
    text = run_cli("status", "--sysroot", str(device.root)).stdout
    assert text.splitlines()[1] == f"board serial: SN-0042 (from {DT})"


def test_a_dry_run_and_a_failure_carry_it_too(tmp_path, registration_server):
    device = FakeDevice(tmp_path / "device", board_serial="SN-0042").build()
    dry = run_cli(*device_args(device, registration_server, "--json", "--dry-run"))
    assert dry.json["board"]["serial"] == "SN-0042"
    assert "SN-0042" not in json.dumps(dry.json["request"])
    registration_server.default = Reply.error(400, "Bad thing")
    failed = run_cli(*device_args(device, registration_server, "--json"))
    assert failed.returncode == 4 and failed.json["board"]["serial"] == "SN-0042"


def test_no_board_serial_is_null(device_root, registration_server):
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 0 and run.json["board"] is None
    status = run_cli("status", "--sysroot", str(device_root.root), "--json").json
    assert status["board"] is None


def test_a_board_serial_that_is_not_text_is_left_out_of_a_registration(tmp_path,
                                                                       registration_server):
    device = FakeDevice(tmp_path / "device", board_serial=b"SN\xff\x07\0").build()
    run = run_cli(*device_args(device, registration_server, "--json"))
    assert run.returncode == 0 and run.json["board"] is None
    assert (f"warning: the board serial in {DT} is invalid: 'SN\\xff\\x07': it holds bytes "
            "that are not UTF-8; trying the next source") in run.stderr
