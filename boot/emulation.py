"""A root of another architecture, run under user-mode emulation: Debian's
qemu-user-static, registered with the kernel's binfmt_misc by whoever needs it (the boot
test, target/run.py) when the kernel offers it.

The registration is Debian's own (``/usr/lib/binfmt.d/qemu-<cpu>.conf``) with the F flag:
the kernel opens the interpreter when it is registered, so a root needs no copy of it. It
also keeps that file open: after an upgrade of qemu-user-static (the same path, a new file)
the old registration would still run the old binary, so a registration older than the
installed interpreter, or naming another one, is replaced.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger(__name__)

BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_D = Path("/usr/lib/binfmt.d")


@dataclass(frozen=True)
class Arch:
    """An architecture by the kernel's name, with Debian's and qemu's for it."""

    name: str  # as uname -m says it (and as BOOT_ARGS and ARCH name it)
    debian: str  # debootstrap's --arch
    qemu: str  # qemu-<cpu>, binfmt_misc's entry

    @property
    def native(self) -> bool:
        return self.name == platform.machine()


ARCHES = {
    "x86_64": Arch("x86_64", "amd64", "x86_64"),
    "arm64": Arch("arm64", "arm64", "aarch64"),
}
# uname -m's name on an arm64 host.
ALIASES = {"aarch64": "arm64"}


def arch(name: str) -> Arch:
    """The architecture called ``name`` (x86_64, arm64 or aarch64)."""
    name = ALIASES.get(name, name)
    if name not in ARCHES:
        raise SystemExit(f"unknown architecture {name!r}: one of {', '.join(ARCHES)}")
    return ARCHES[name]


def native() -> Arch:
    return arch(platform.machine())


def with_f_flag(line: str) -> str:
    """A binfmt_misc registration line (``:name:type:offset:magic:mask:interpreter:flags``)
    with the F flag added when it lacks it."""
    fields = line.strip().split(":")
    if len(fields) != 8:
        raise ValueError(f"not a binfmt_misc registration: {line!r}")
    if "F" not in fields[7]:
        fields[7] += "F"
    return ":".join(fields)


def interpreter(line: str) -> str:
    """The interpreter path of a binfmt_misc registration line."""
    return line.strip().split(":")[6]


def current(entry: Path, conf: Path) -> bool:
    """Whether the kernel's registration ``entry`` is enabled, has the F flag and holds the
    interpreter that ``conf`` names as installed now (not one replaced since)."""
    lines = entry.read_text().splitlines()
    flags = next((x.split(":", 1)[1] for x in lines if x.startswith("flags:")), "")
    named = next((x.split(" ", 1)[1] for x in lines if x.startswith("interpreter ")), "")
    wanted = interpreter(conf.read_text())
    if "enabled" not in lines or "F" not in flags or named != wanted:
        return False
    # binfmt_misc stamps an entry when it is registered; dpkg's install changes the
    # interpreter file's ctime.
    return Path(wanted).stat().st_ctime <= entry.stat().st_mtime


def _mounted() -> bool:
    if (BINFMT / "register").exists():
        return True
    LOG.info("mounting binfmt_misc on %s", BINFMT)
    subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                   capture_output=True, check=False)
    return (BINFMT / "register").exists()


def unavailable(target: Arch) -> str | None:
    """None when programs of ``target`` run here (natively, or registered for emulation
    now); else why not."""
    if target.native:
        return None
    conf = BINFMT_D / f"qemu-{target.qemu}.conf"
    if not conf.is_file():
        return f"no {conf}: install Debian's qemu-user-static"
    if not _mounted():
        return f"the kernel offers no binfmt_misc ({BINFMT} cannot be mounted)"
    entry = BINFMT / f"qemu-{target.qemu}"
    if entry.exists():
        if current(entry, conf):
            return None
        # Someone else's registration (without F, disabled, another interpreter) or one
        # holding an interpreter upgraded since: replaced by Debian's, as installed now.
        LOG.info("replacing the binfmt_misc registration %s", entry)
        with contextlib.suppress(FileNotFoundError):  # or removed by another run just now
            entry.write_text("-1\n")
    try:
        (BINFMT / "register").write_text(with_f_flag(conf.read_text()) + "\n")
    except OSError as e:
        if entry.exists():  # registered at the same moment by another run
            return None
        return f"cannot register {conf} with binfmt_misc: {e}"
    LOG.info("registered %s with binfmt_misc (F flag)", conf)
    return None
