"""The guest's root file systems: a cached debootstrap base per Debian release, then the
agent as the recipe installs it, the stand-ins of meta-lmp's units and the boot test's own
units.

Three roots: bookworm (systemd 252, Python 3.11), whose python3-cryptography is older than
the agent needs, gets the agent and PyPI's wheels of its dependencies in a venv built here;
forky (systemd 262, Python 3.14), nearer the wrynose images a factory ships, gets it as the
recipe does: the wheel installed into the system Python (``python -m installer``, as oe-core's
python_pep517 class does), its dependencies the distribution's packages. forky for arm64
too, prepared under user-mode emulation (emulation.py) as forky is, with SoftHSM2 and the
python-pkcs11 wheel that target/run.py compiles for arm64, and booted with its release's
kernel (kernel_image) on an emulated machine (qemu.py).

The Debian mirror is the one this machine's apt uses (deb822 ``*.sources`` or
``sources.list``) for its own release, bookworm; forky comes from the same archive with
debootstrap's ``sid`` script. Each base is cached as a tarball keyed on suite, variant,
script and packages (and the architecture, when it is not this machine's).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bitbake import ROOT
from emulation import Arch, arch
from nspawn import run_in

LOG = logging.getLogger(__name__)

HOST_SUITE = "bookworm"  # the release whose apt source names the mirror
VARIANT = "minbase"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-systemd")
VENV = "/opt/lmp-autoreg"
# The test kit's server runs from the Python that holds the agent (boot-test-server.service).
KIT_PYTHON = "/usr/local/bin/boot-test-python"
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


@dataclass(frozen=True)
class Root:
    """One Debian release the scenarios boot, and how the agent goes into it."""

    suite: str
    packages: tuple[str, ...]
    # Where the agent's Python is: a venv of PyPI's wheels, or the system's python3 with
    # the distribution's packages (as the recipe's RDEPENDS would bring them).
    venv: bool
    script: str | None = None  # debootstrap's script for a suite newer than the host's
    # Every boot on the unified cgroup hierarchy (systemd 258 dropped cgroup v1); else only
    # the boots that need it (BootSpec.bpf), the others on the host's hybrid layout.
    unified: bool = False
    arch: Arch = arch("x86_64")
    # SoftHSM2 and python-pkcs11 in the root, for the scenarios of HSM mode.
    hsm: bool = False
    # Only these scenarios (an emulated root, where each boot takes minutes); None: all.
    only: tuple[int, ...] | None = None

    @property
    def python(self) -> str:
        return f"{VENV}/bin/python" if self.venv else "/usr/bin/python3"

    @property
    def slowdown(self) -> float:
        """How much longer than natively the scenarios may take on this root."""
        return 1.0 if self.arch.native else EMULATED_SLOWDOWN

    @property
    def name(self) -> str:
        """The root's name in cgroups, machines and the work directory."""
        return self.suite if self.arch.name == "x86_64" else f"{self.suite}-{self.arch.name}"


# python3-cffi-backend by name: debootstrap does not resolve the virtual packages
# python3-cryptography depends on (python3-cffi-backend-api-min/-max).
FORKY_PACKAGES = (*BASE_PACKAGES, "python3-requests", "python3-cryptography",
                  "python3-cffi-backend", "python3-installer")
SID = "/usr/share/debootstrap/scripts/sid"
# The scenarios of an emulated root: first boot with the check-in, second boot and exit 3,
# the late server, and first boot in HSM mode (scenarios.py).
EMULATED_SCENARIOS = (1, 2, 3, 9, 13)
# A boot on an emulated machine takes several times as long (every program of the guest is
# translated, the kernel, systemd and Python included).
EMULATED_SLOWDOWN = 4.0
ROOTS = [
    Root("bookworm", (*BASE_PACKAGES, "python3-venv"), venv=True),
    Root("forky", FORKY_PACKAGES, venv=False, script=SID, unified=True),
    # Most boards an LmP factory ships are aarch64: forky for arm64 on an emulated machine,
    # with SoftHSM2 and the python-pkcs11 0.7.0 make test-target compiles there.
    Root("forky", (*FORKY_PACKAGES, "softhsm2"), venv=False, script=SID, unified=True,
         arch=arch("arm64"), hsm=True, only=EMULATED_SCENARIOS),
]
# What apt needs of a base to download from its release (kernel_image).
APT_MEMBERS = ("./etc/apt", "./var/lib/apt", "./var/lib/dpkg", "./usr/share/keyrings")
# The kernel in a Debian package: /boot/vmlinuz-<version> or /usr/lib/modules/<version>/vmlinuz.
KERNEL_NAME = r"^\./(boot/vmlinuz-[^/]+|usr/lib/modules/[^/]+/vmlinuz)$"
# Shown for each root: the versions the agent runs with.
DISTRIBUTIONS = ("requests", "cryptography", "systemd-python")
HSM_DISTRIBUTIONS = ("python-pkcs11",)
# The kit's own for a check-in with the key on a token (lmp_autoreg.testing.p11tls): pure
# Python, PyPI's wheels, as the kit's test extra has it (the agent needs none of it).
KIT_HSM = ("tlslite-ng>=0.8",)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmp-autoreg-boot"


def apt_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The URI this machine's apt uses for Debian's main archive of HOST_SUITE."""
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and HOST_SUITE in fields.get(
                    "Suites", "").split():
                return fields["URIs"].split()[0]
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in lists:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == HOST_SUITE:
                    return words[1]
    raise SystemExit(f"no apt source for Debian {HOST_SUITE} in {etc}: cannot debootstrap")


def base_tarball(root: Root) -> Path:
    """The cached debootstrap tarball of ``root``, made first when missing."""
    recipe = f"{root.suite} {VARIANT} {root.script} {','.join(root.packages)}"
    # The machine's own architecture keeps the key it had before there were others.
    if not root.arch.native:
        recipe += f" arch={root.arch.debian}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    tarball = cache_dir() / f"{root.name}-{VARIANT}-{key}.tar"
    if tarball.is_file():
        LOG.info("%s: base rootfs from the cache: %s", root.name, tarball)
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    LOG.info("%s: debootstrap from %s (cached afterwards)", root.name, mirror)
    work = tarball.with_suffix(".d")
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["debootstrap", f"--arch={root.arch.debian}", f"--variant={VARIANT}",
                    f"--include={','.join(root.packages)}", root.suite, str(work), mirror,
                    *([root.script] if root.script else [])],
                   check=True, stdout=subprocess.DEVNULL,
                   timeout=1200 if root.arch.native else 3600)
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(work), "--numeric-owner", "-cf", str(partial), "."],
                   check=True)
    partial.rename(tarball)
    shutil.rmtree(work)
    return tarball


def kernel_image(root: Root) -> Path:
    """The kernel of ``root``'s release and architecture, for a machine that boots it
    (qemu.py): Debian's ``linux-image-<arch>``, downloaded with the base's own apt sources
    and lists by this machine's apt (nothing emulated), cached beside the base."""
    base = base_tarball(root)
    image = base.with_name(base.stem + "-vmlinuz")
    if image.is_file():
        return image
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        apt_root, debs = Path(tmp) / "root", Path(tmp) / "debs"
        debs.mkdir()
        with tarfile.open(base) as tar:
            tar.extractall(apt_root, filter="fully_trusted",
                           members=[m for m in tar if m.name.startswith(APT_MEMBERS)])
        options = [f"-oDir={apt_root}", f"-oAPT::Architecture={root.arch.debian}",
                   "-oAPT::Sandbox::User=root",
                   # A mirror's snapshot of a release outlives its Release file's Valid-Until.
                   "-oAcquire::Check-Valid-Until=false"]

        def apt(*argv: str) -> str:
            return subprocess.run([argv[0], "-qq", *options, *argv[1:]], check=True, cwd=debs,
                                  stdout=subprocess.PIPE, text=True, timeout=900).stdout

        apt("apt-get", "update")
        meta = f"linux-image-{root.arch.debian}"
        # The meta package depends on the versioned image, which (on forky) has the kernel
        # in a linux-binary-* package of its own.
        wanted = [d for d in dependencies(apt("apt-cache", "depends", meta))
                  if d.startswith("linux-image-")]
        for name in list(wanted):
            wanted += [d for d in dependencies(apt("apt-cache", "depends", name))
                       if d.startswith("linux-binary-")]
        if not wanted:
            raise SystemExit(f"{meta} names no kernel package")
        apt("apt-get", "download", *wanted)
        for deb in sorted(debs.glob("*.deb")):
            listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                                     stdout=subprocess.PIPE).stdout
            with tarfile.open(fileobj=io.BytesIO(listing)) as tar:
                found = [m for m in tar if m.isfile() and re.search(KERNEL_NAME, m.name)]
                if found:
                    source = tar.extractfile(found[0])
                    assert source is not None
                    partial = image.with_suffix(".partial")
                    partial.write_bytes(source.read())
                    partial.rename(image)
                    LOG.info("%s: kernel %s from %s", root.name, found[0].name, deb.name)
                    return image
    raise SystemExit(f"no kernel image in {', '.join(wanted)}")


def dependencies(depends: str) -> list[str]:
    """The package names of ``apt-cache depends`` output's Depends lines."""
    return re.findall(r"^\s*\|?Depends:\s*(\S+)", depends, re.MULTILINE)


def build_wheels(dest: Path, dependencies: bool) -> None:
    """The checkout's wheel (pure Python), with its dependencies' wheels for the host's
    Python when asked (which must then be the guest's minor version; checked in prepare)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    *([] if dependencies else ["--no-deps"]), "--wheel-dir", str(dest),
                    str(ROOT)], check=True, timeout=600)


def guest_python(tree: Path) -> str:
    versions = sorted(p.name for p in (tree / "usr/lib").glob("python3.*")
                      if (p / "os.py").is_file())
    if len(versions) != 1:
        raise SystemExit(f"cannot tell the guest's python3 from {versions}")
    return versions[0].removeprefix("python")


def install_venv(tree: Path, work: Path, cgroup_name: str) -> None:
    """The agent and PyPI's wheels of its dependencies in a venv that also sees the
    distribution's python3-systemd; the command linked into /usr/bin."""
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    guest = guest_python(tree)
    if guest != host:
        raise SystemExit(f"the host's Python is {host}, the guest's {guest}: the wheels "
                         f"built here would not fit; run with a Python {guest}")
    wheels = work / "wheels"
    build_wheels(wheels, dependencies=True)
    run_in(tree, cgroup_name, [f"--bind-ro={wheels}:/wheels"], [
        "/bin/sh", "-ec",
        f"python3 -m venv --system-site-packages {VENV}; "
        f"{VENV}/bin/pip install -q --disable-pip-version-check --no-index "
        "--find-links /wheels lmp-autoreg"])
    bin_link = tree / "usr/bin/lmp-device-auto-register"
    bin_link.unlink(missing_ok=True)
    bin_link.symlink_to(f"{VENV}/bin/lmp-device-auto-register")


def install_system(tree: Path, work: Path, cgroup_name: str) -> None:
    """The agent's wheel installed into the system Python as oe-core's python_pep517 class
    installs it (``python -m installer``): the package into the distribution's site
    directory, the command into /usr/bin. The dependencies are the distribution's."""
    wheels = work / "wheel"
    build_wheels(wheels, dependencies=False)
    (wheel,) = wheels.glob("lmp_autoreg-*.whl")
    # Debian's python3 installs into /usr/local unless told the distribution's layout.
    run_in(tree, cgroup_name, [f"--bind-ro={wheels}:/wheels",
                               "--setenv=DEB_PYTHON_INSTALL_LAYOUT=deb"],
           ["python3", "-m", "installer", "--prefix", "/usr", f"/wheels/{wheel.name}"])


def install_hsm(tree: Path, root: Root, work: Path, cgroup_name: str) -> None:
    """python-pkcs11 and its dependencies into the system Python, as install_system installs
    the agent: the wheels make test-target compiled for this architecture (target/run.py
    wheel, which builds them first when they are not cached); and KIT_HSM, PyPI's wheels."""
    found = subprocess.run([sys.executable, str(ROOT / "target/run.py"), "--arch",
                            root.arch.name, "wheel"], check=True, stdout=subprocess.PIPE,
                           text=True, timeout=3 * 3600).stdout.strip()
    wheels = Path(found)
    guest = guest_python(tree)
    tag = "cp" + guest.replace(".", "")
    if not list(wheels.glob(f"python_pkcs11-*-{tag}-*.whl")):
        raise SystemExit(f"no python-pkcs11 wheel for {tag} in {wheels}")
    kit = work / "kit-wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--only-binary=:all:", "--python-version", guest, "--implementation", "py",
                    "--platform", "any", "--dest", str(kit), *KIT_HSM], check=True, timeout=600)
    run_in(tree, cgroup_name, [f"--bind-ro={wheels}:/wheels", f"--bind-ro={kit}:/kit-wheels",
                               "--setenv=DEB_PYTHON_INSTALL_LAYOUT=deb"],
           ["/bin/sh", "-ec", 'for w in /wheels/*.whl /kit-wheels/*.whl; do '
                              'python3 -m installer --prefix /usr "$w"; done'])


def versions(tree: Path, root: Root, cgroup_name: str) -> str:
    """The agent's Python and the versions of its dependencies in the prepared tree."""
    names = DISTRIBUTIONS + (HSM_DISTRIBUTIONS if root.hsm else ())
    code = ("import importlib.metadata as m, platform; "
            "print('Python ' + platform.python_version() + ' on ' + platform.machine(), "
            f"*(d + ' ' + m.version(d) for d in {names!r}), sep=', ')")
    return run_in(tree, cgroup_name, [], [root.python, "-c", code]).strip()


def prepare(root: Root, tree: Path, work: Path, cgroup_name: str) -> str:
    """Make ``tree`` the prepared guest of ``root`` (everything but each scenario's own
    settings); return the versions the agent runs with."""
    tree.mkdir(parents=True)
    with tarfile.open(base_tarball(root)) as tar:
        tar.extractall(tree, filter="fully_trusted")
    (install_venv if root.venv else install_system)(tree, work, cgroup_name)
    if root.hsm:
        install_hsm(tree, root, work, cgroup_name)
    # A script, not a link: a venv's python finds its pyvenv.cfg only through its own path.
    kit_python = tree / KIT_PYTHON.lstrip("/")
    kit_python.parent.mkdir(parents=True, exist_ok=True)
    kit_python.write_text(f'#!/bin/sh\nexec {root.python} "$@"\n')
    kit_python.chmod(0o755)
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
    return versions(tree, root, cgroup_name)
