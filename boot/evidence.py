"""What one boot left in the results directory, read on the host."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AGENT = "lmp-device-auto-register.service"
SERVER = "boot-test-server.service"


@dataclass
class Boot:
    returncode: int | None  # nspawn's or qemu's; None when stopped after its timeout
    seconds: float
    out: Path | None  # the collector's directory; None when it collected nothing
    show: dict[str, dict[str, str]] = field(default_factory=dict)
    collected: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, returncode: int | None, seconds: float, out: Path | None) -> Boot:
        boot = cls(returncode, seconds, out)
        if out is not None and (out / "collected.json").is_file():
            boot.show = json.loads((out / "show.json").read_text())
            boot.collected = json.loads((out / "collected.json").read_text())
        return boot

    @property
    def complete(self) -> bool:
        return bool(self.collected)

    def unit(self, name: str = AGENT) -> dict[str, str]:
        return self.show.get(name, {})

    def journal(self) -> list[dict[str, Any]]:
        assert self.out is not None
        entries = []
        for line in (self.out / "journal.json").read_text().splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return entries

    def text(self, name: str) -> str:
        assert self.out is not None
        return (self.out / name).read_text()

    def file(self, path: str) -> Path:
        assert self.out is not None
        return self.out / "files" / path.strip("/")

    def var_sota(self) -> list[str] | None:
        assert self.out is not None
        names: list[str] | None = json.loads((self.out / "var-sota.json").read_text())
        return names


def message(entry: dict[str, Any]) -> str:
    value = entry.get("MESSAGE", "")
    if isinstance(value, list):  # journalctl's JSON for a message that is not UTF-8
        return bytes(value).decode(errors="replace")
    return str(value)


def by_systemd(entry: dict[str, Any]) -> bool:
    """A line of systemd's: PID 1's, or of the unit's process before it executes the command
    (``(name)`` as its command name; systemd 252 gives it ``UNIT``, 262's systemd-executor
    only ``_SYSTEMD_UNIT``)."""
    return "UNIT" in entry or str(entry.get("_COMM", "")).startswith("(")


def of_unit(entries: list[dict[str, Any]], unit: str) -> list[dict[str, Any]]:
    """Lines the unit's own programs wrote (``_SYSTEMD_UNIT``), not systemd's."""
    return [e for e in entries if e.get("_SYSTEMD_UNIT") == unit and not by_systemd(e)]


def about_unit(entries: list[dict[str, Any]], unit: str) -> list[dict[str, Any]]:
    """systemd's lines about the unit, from PID 1 or the unit's process."""
    return [e for e in entries if by_systemd(e)
            and unit in (e.get("UNIT"), e.get("_SYSTEMD_UNIT"))]


def seconds(entry: dict[str, Any]) -> float:
    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6
