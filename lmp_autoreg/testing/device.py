"""Lay out the files of an LmP device under a directory, on the real disk or in pyfakefs.

Only ``os`` and ``pathlib`` are used, so everything here works the same inside
pyfakefs's ``fs`` fixture and in a real temporary directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

from ..paths import DEVICE_TREE_SERIAL

# A directory: name -> file content (str), sub-directory (Tree), or empty directory (None).
Tree = Mapping[str, Union[str, "Tree", None]]


def populate(root: str | Path, tree: Tree) -> None:
    """Create the files and directories of ``tree`` under ``root``.

    ``{"etc": {"hostname": "dev\\n"}, "var": {"sota": None}}`` makes ``etc/hostname``
    with that content and an empty ``var/sota``. Parents are created as needed;
    existing files are overwritten.
    """
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    for name, value in tree.items():
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a plain file or directory name: {name!r}")
        target = base / name
        if value is None:
            target.mkdir(parents=True, exist_ok=True)
        elif isinstance(value, str):
            target.write_text(value, encoding="utf-8")
        else:
            populate(target, value)


class FakeDevice:
    """The device files the agent reads, under ``root``.

    ``None`` for ``factory``, ``machine`` or ``tag`` leaves that setting out of
    ``/etc/os-release`` (and ``tag`` out of ``/etc/sota/tag``); ``token=None`` leaves out
    the token file; ``hsm`` is written to ``/etc/sota/hsm`` as ``KEY=VALUE`` lines, e.g.
    ``{"HSM_MODULE": "/usr/lib/softhsm/libsofthsm2.so", "HSM_PIN": "1234",
    "HSM_SOPIN": "5678"}`` (a partial dict makes a partial HSM setting).
    ``board_serial`` is written as the device tree's ``serial-number``
    (``/sys/firmware/devicetree/base/serial-number``, which the agent reports as the board's
    serial, docs/spec.md section 6): text is written NUL-terminated, as the kernel shows it;
    bytes are written as they are (a damaged value); None writes no file.
    Nothing is written before :meth:`build`.
    """

    def __init__(
        self,
        root: str | Path = "/",
        *,
        factory: str | None = "acme",
        machine: str | None = "intel-corei7-64",
        tag: str | None = "main",
        hostname: str | None = "device-1",
        token: str | None = "not-a-real-token",
        apps: Iterable[str] = ("app1", "app2"),
        quote_os_release: bool = True,
        tag_file: bool = True,
        hsm: Mapping[str, str] | None = None,
        sota_dir: str = "/var/sota",
        board_serial: str | bytes | None = None,
    ) -> None:
        self.root = Path(root)
        self.factory = factory
        self.machine = machine
        self.tag = tag
        self.hostname = hostname
        self.token = token
        self.apps = tuple(apps)
        self.quote_os_release = quote_os_release
        self.tag_file = tag_file
        self.hsm = dict(hsm) if hsm is not None else None
        self.sota_dir = sota_dir
        self.board_serial = board_serial

    def path(self, device_path: str) -> Path:
        """The host path of ``device_path`` (e.g. ``/etc/os-release``) under the root."""
        return self.root / device_path.lstrip("/")

    @property
    def sota(self) -> Path:
        """The host path of the sota directory."""
        return self.path(self.sota_dir)

    def os_release(self) -> str:
        """The text :meth:`build` writes to ``/etc/os-release``."""
        entries = [("NAME", "Linux-microPlatform"), ("VERSION_ID", "4.0.20")]
        for key, value in (
            ("LMP_MACHINE", self.machine),
            ("LMP_FACTORY", self.factory),
            ("LMP_FACTORY_TAG", self.tag),
        ):
            if value is not None:
                entries.append((key, value))
        lines = ["ID=lmp"]
        for key, value in entries:
            lines.append(f'{key}="{value}"' if self.quote_os_release else f"{key}={value}")
        return "\n".join(lines) + "\n"

    def build(self) -> FakeDevice:
        """Write the device files; return self."""
        etc: dict[str, str | Tree | None] = {"os-release": self.os_release()}
        sota_etc: dict[str, str | Tree | None] = {}
        if self.hostname is not None:
            etc["hostname"] = self.hostname + "\n"
        if self.token is not None:
            etc["lmp-device-register-token"] = self.token + "\n"
        if self.tag_file and self.tag is not None:
            sota_etc["tag"] = self.tag + "\n"
        if self.hsm is not None:
            sota_etc["hsm"] = "".join(f"{key}={value}\n" for key, value in self.hsm.items())
        if sota_etc:
            etc["sota"] = sota_etc
        populate(self.path("/etc"), etc)
        if self.token is not None:
            # As an image installs it: readable by root only (the agent warns otherwise).
            self.path("/etc/lmp-device-register-token").chmod(0o600)
        apps: dict[str, str | Tree | None] = {
            app: {"docker-compose.yml": _compose_file(app)} for app in self.apps
        }
        populate(self.sota, {"compose-apps": apps})
        if self.board_serial is not None:
            serial = self.board_serial
            data = serial if isinstance(serial, bytes) else serial.encode() + b"\0"
            path = self.path(str(DEVICE_TREE_SERIAL))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return self


def _compose_file(app: str) -> str:
    return f'services:\n  {app}:\n    image: "hub.foundries.io/acme/{app}:latest"\n'
