"""The guest's root file system: a cached debootstrap base, then the agent as the recipe
installs it, the stand-ins of meta-lmp's units and the boot test's own units.

The Debian mirror is the one this machine's apt uses (deb822 ``*.sources`` or
``sources.list``). The base is cached as a tarball keyed on suite, variant and packages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from bitbake import ROOT
from nspawn import run_in

LOG = logging.getLogger(__name__)

SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-systemd")
VENV = "/opt/lmp-autoreg"
GUEST = Path(__file__).resolve().parent / "guest"
# Guest file -> where it goes, with its mode.
GUEST_FILES = {
    "aktualizr-lite": ("/usr/bin/aktualizr-lite", 0o755),
    "fioconfig": ("/usr/bin/fioconfig", 0o755),
    "boot-test-collect": ("/usr/local/sbin/boot-test-collect", 0o755),
    "boot-test-devprobe": ("/usr/local/sbin/boot-test-devprobe", 0o755),
    "aktualizr-lite.service": ("/usr/lib/systemd/system/aktualizr-lite.service", 0o644),
    "fioconfig.service": ("/usr/lib/systemd/system/fioconfig.service", 0o644),
    "fioconfig.path": ("/usr/lib/systemd/system/fioconfig.path", 0o644),
    "boot-test-server.service": ("/etc/systemd/system/boot-test-server.service", 0o644),
    "boot-test-collect.service": ("/etc/systemd/system/boot-test-collect.service", 0o644),
}
# Enabled as meta-lmp enables them (WantedBy=multi-user.target), with the test's own units.
ENABLED = ("lmp-device-auto-register.service", "aktualizr-lite.service", "fioconfig.service",
           "fioconfig.path", "boot-test-server.service", "boot-test-collect.service")
FACTORY = "boot-test"
MACHINE = "boot-test-machine"
TAG = "main"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmp-autoreg-boot"


def apt_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The URI this machine's apt uses for Debian's main archive of SUITE."""
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and SUITE in fields.get(
                    "Suites", "").split():
                return fields["URIs"].split()[0]
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in lists:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    raise SystemExit(f"no apt source for Debian {SUITE} in {etc}: cannot debootstrap")


def base_tarball() -> Path:
    """The cached debootstrap tarball, made first when missing."""
    key = hashlib.sha256(f"{SUITE} {VARIANT} {','.join(PACKAGES)}".encode()).hexdigest()[:16]
    tarball = cache_dir() / f"{SUITE}-{VARIANT}-{key}.tar"
    if tarball.is_file():
        LOG.info("base rootfs from the cache: %s", tarball)
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    LOG.info("debootstrap %s from %s (cached afterwards)", SUITE, mirror)
    work = tarball.with_suffix(".d")
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}",
                    SUITE, str(work), mirror], check=True, stdout=subprocess.DEVNULL,
                   timeout=900)
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(work), "--numeric-owner", "-cf", str(partial), "."],
                   check=True)
    partial.rename(tarball)
    shutil.rmtree(work)
    return tarball


def build_wheels(dest: Path) -> None:
    """Wheels of the checkout and its dependencies, for the host's Python (which must be
    the guest's minor version; checked in prepare)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--wheel-dir", str(dest), str(ROOT)], check=True, timeout=600)


def guest_python(tree: Path) -> str:
    versions = sorted(p.name for p in (tree / "usr/lib").glob("python3.*")
                      if (p / "os.py").is_file())
    if len(versions) != 1:
        raise SystemExit(f"cannot tell the guest's python3 from {versions}")
    return versions[0].removeprefix("python")


def prepare(tree: Path, work: Path, cgroup_name: str) -> None:
    """Make ``tree`` the prepared guest (everything but each scenario's own settings)."""
    tree.mkdir(parents=True)
    with tarfile.open(base_tarball()) as tar:
        tar.extractall(tree, filter="fully_trusted")
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    guest = guest_python(tree)
    if guest != host:
        raise SystemExit(f"the host's Python is {host}, the guest's {guest}: the wheels "
                         f"built here would not fit; run with a Python {guest}")
    wheels = work / "wheels"
    build_wheels(wheels)
    run_in(tree, cgroup_name, [f"--bind-ro={wheels}:/wheels"], [
        "/bin/sh", "-ec",
        f"python3 -m venv --system-site-packages {VENV}; "
        f"{VENV}/bin/pip install -q --disable-pip-version-check --no-index "
        "--find-links /wheels lmp-autoreg"])
    bin_link = tree / "usr/bin/lmp-device-auto-register"
    bin_link.unlink(missing_ok=True)
    bin_link.symlink_to(f"{VENV}/bin/lmp-device-auto-register")
    for name, (dest, mode) in GUEST_FILES.items():
        target = tree / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GUEST / name, target)
        target.chmod(mode)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in ENABLED:
        where = "etc" if unit.startswith("boot-test") else "usr/lib"
        (wants / unit).symlink_to(f"/{where}/systemd/system/{unit}")
    # No login prompt on the console; an LmP os-release (the agent's factory and machine).
    (tree / "etc/systemd/system/console-getty.service").symlink_to("/dev/null")
    os_release = (tree / "usr/lib/os-release").read_text()
    (tree / "etc/os-release").unlink()
    (tree / "etc/os-release").write_text(
        os_release + f"LMP_FACTORY={FACTORY}\nLMP_FACTORY_TAG={TAG}\nLMP_MACHINE={MACHINE}\n")
    (tree / "etc/hostname").write_text("boot-test-device\n")
