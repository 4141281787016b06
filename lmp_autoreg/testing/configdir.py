"""A configuration directory served by the kit's device gateway (``--config-dir DIR``):
the files of DIR go to every device, those of ``DIR/groups/G/`` to the devices the
devices API holds in group G too."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmp_autoreg.testing.gateway import DeviceGateway

GROUPS = "groups"


def config_files(directory: Path, skip: Path | None = None) -> dict[str, str]:
    """The files of ``directory`` (and below it, but not below ``skip``) by relative name."""
    return {
        str(path.relative_to(directory)): path.read_text(encoding="utf-8")
        for path in sorted(directory.rglob("*"))
        if path.is_file() and (skip is None or not path.is_relative_to(skip))
    }


def serve_config(gateway: DeviceGateway, directory: Path) -> None:
    """Every device gets the files of ``directory`` but ``groups/``; the devices of group G
    those of ``groups/G/`` too."""
    groups = directory / GROUPS
    gateway.set_config(None, config_files(directory, skip=groups))
    if groups.is_dir():
        for group in sorted(p for p in groups.iterdir() if p.is_dir()):
            gateway.set_group_config(group.name, config_files(group))
