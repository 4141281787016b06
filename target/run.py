"""make test-target, make bench-target: the suite (or the bench) on the target's Python.

A factory ships LmP on Yocto wrynose: Python 3.14 with cryptography 46.0.5, requests
2.32.5, python-pkcs11 0.7.0 and systemd-python 235. This runs the checkout a second time on
that stack: a Debian forky root (Python 3.14, systemd 262) made with debootstrap from the
mirror this machine's apt uses, with a venv at VENV holding exactly those versions (PINS;
the packages without a wheel for 3.14 are compiled in the root) and the suite's own
dependencies (pyproject's ``test``, ``dev`` and ``kit`` extras), and the system tools the suite
needs (PACKAGES, as .ci/run installs them on the host).

Two cached tarballs under ``~/.cache/lmp-autoreg-target``: the debootstrap base, keyed on
suite, script, variant and packages; and that base with the venv, keyed on the base's key,
the pins and the extras' requirements. A change of either rebuilds what depends on it. An
emulated architecture's are named for it (``forky-arm64-...``) and keyed on it too, with a
third entry beside them: python-pkcs11's wheel, compiled once (``wheel_dir``).

Each run unpacks the root afresh and runs one command in it as root, in a mount namespace
of its own (``unshare -m``) whose root it is (``pivot_root``; the suite's own ``unshare -m``
and ``nsenter -m`` need a root that is a mount point, and the namespace's), with /proc,
/sys, /dev (with /dev/pts), a tmpfs on /tmp and the checkout bound at its own path (and,
for a git worktree, its repository), all gone with the namespace. The checkout is
installed into the venv in editable mode first, as ``make`` installs it on the host. The
environment is a clean one, plus ``CI``.

Usage: ``python3 target/run.py test [PYTEST ARGS...]`` (``python -m pytest -n 2`` as
``make test``) or ``python3 target/run.py bench [BENCH ARGS...]`` (``bench/run.py``, results
in ``bench/results/forky`` unless ``--out`` says otherwise); ``--arch arm64`` before either
does it in an arm64 root under user-mode emulation (``bench/results/forky-arm64``),
where the tests of EMULATION_LIMITS are left out. Needs root, mount namespaces,
``unshare``, ``pivot_root`` and ``debootstrap``; for arm64 on another machine, Debian's
qemu-user-static and binfmt_misc (registered here, boot/emulation.py).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "boot"))

from emulation import Arch, arch, native, unavailable  # noqa: E402
from rootfs import apt_mirror  # noqa: E402

LOG = logging.getLogger("target")

SUITE = "forky"
# debootstrap has no script of its own for forky on bookworm; sid's builds it.
SCRIPT = "/usr/share/debootstrap/scripts/sid"
VARIANT = "minbase"
PACKAGES = (
    "python3", "python3-venv",
    # Compiling python-pkcs11 and systemd-python, which have no wheel for 3.14.
    "python3-dev", "gcc", "libc6-dev", "pkg-config", "libsystemd-dev",
    # The suite's tools (README, the test table): .ci/run's apt line.
    "systemd", "util-linux", "mount", "faketime", "strace", "git", "make", "softhsm2",
    "opensc", "libengine-pkcs11-openssl", "openssl", "ca-certificates",
)
# The versions wrynose ships (openembedded-core and meta-python).
PINS = ("cryptography==46.0.5", "requests==2.32.5", "python-pkcs11==0.7.0",
        "systemd-python==235")
EXTRAS = ("test", "dev", "kit")
VENV = "/opt/lmp-autoreg-target"
# The host's CA bundle, for pip in the root (this machine may reach PyPI through a proxy
# whose CA only the host's bundle has).
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
ROOT_CA = "/etc/ssl/lmp-autoreg-host-ca.pem"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT = 1800.0
RUN_TIMEOUT = 1800.0
# Under user-mode emulation everything takes about ten times as long.
EMULATED_TIMEOUT = 3 * 3600.0
# python-pkcs11's wheel for an emulated root, built once and cached beside the root (and
# taken from there by the boot test): its 2.9 MB of generated C take about 28 minutes to
# compile under emulation with Python's own -O2, a few with -O0. The code is the same;
# only the compiler's optimisation is left out, which costs the agent nothing it measures
# (docs/testing.md).
PKCS11 = next(pin for pin in PINS if pin.startswith("python-pkcs11=="))
EMULATED_CFLAGS = "-O0 -g0"
# Tests that user-mode emulation cannot run, left out on an emulated architecture (they
# run natively and in the x86-64 root; docs/testing.md): qemu-user implements no ptrace
# (strace), setns into a mount namespace from its threaded process fails with EINVAL
# (nsenter -m), and a pseudo-terminal does not read as a terminal there; the bench's line
# outlasts the suite's 60 s per test.
EMULATION_LIMITS = (
    "tests/test_fsync_order.py::test_fsync_file_rename_fsync_dir_for_the_answer_and_the_state",
    "tests/test_local_faults.py::test_read_only_between_two_files",
    "tests/test_oauth.py::test_a_terminal_starts_the_flow_and_stdout_stays_one_object",
    "tests/test_token_stdin.py::test_a_terminal_on_stdin_is_refused",
    "tests/test_bench_line.py::test_runs_each_level_and_writes_its_table_and_curve",
)

# Runs as ``unshare -m sh -c MOUNT_AND_PIVOT sh ROOT BIND... -- ARGV...``. The root becomes
# the namespace's own root (``pivot_root``), not a ``chroot`` within the host's: a process
# that enters the namespace (``nsenter -m``, as the suite's fault tests do) lands in it.
MOUNT_AND_PIVOT = r"""
set -e
root=$1; shift
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/tmp"
while [ "$1" != -- ]; do
    mkdir -p "$root$1"
    mount --bind "$1" "$root$1"
    shift
done
shift
cd "$root"
mkdir -p .host
pivot_root . .host
umount -l .host
rmdir .host
exec chroot . "$@"
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmp-autoreg-target"


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _name(requirement: str) -> str:
    """The project name of a requirement, normalized (PEP 503)."""
    name = requirement
    for stop in "<>=!~[; ":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-").replace(".", "-")


def requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The extras' requirements with the pinned projects' versions in place of theirs, and
    setuptools to install the checkout without build isolation."""
    with open(pyproject, "rb") as f:
        data = tomllib.load(f)
    pinned = {_name(pin) for pin in PINS}
    wanted = [req for extra in EXTRAS for req in data["project"]["optional-dependencies"][extra]]
    wanted += data["build-system"]["requires"]
    return [*PINS, *sorted({req for req in wanted if _name(req) not in pinned})]


def base_key(target: Arch) -> str:
    # The machine's own architecture keeps the key it had before there were others.
    return _key(SUITE, SCRIPT, VARIANT, *PACKAGES,
                *(() if target.native else (f"arch={target.debian}",)))


def root_key(target: Arch) -> str:
    return _key(base_key(target), VENV, *requirements())


def wheel_key(target: Arch) -> str:
    return _key(base_key(target), PKCS11, EMULATED_CFLAGS)


def _stem(target: Arch) -> str:
    return SUITE if target.native else f"{SUITE}-{target.debian}"


def run_in_root(tree: Path, argv: Sequence[str], env: dict[str, str],
                binds: Sequence[Path] = (), timeout: float = RUN_TIMEOUT) -> int:
    """Run ``argv`` as root in ``tree`` (see MOUNT_AND_PIVOT); its exit code."""
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNT_AND_PIVOT,
               "sh", str(tree), *map(str, binds), "--", "/usr/bin/env", "-i",
               *(f"{k}={v}" for k, v in env.items()), *argv]
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True,
                             env={"PATH": PATH})
    try:
        return child.wait(timeout)
    except subprocess.TimeoutExpired:
        LOG.error("%s: no end after %.0f s, killed", " ".join(argv), timeout)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return -signal.SIGKILL


def _pack(tree: Path, tarball: Path) -> None:
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(tree), "--numeric-owner", "-cf", str(partial), "."],
                   check=True)
    partial.rename(tarball)


def _unpack(tarball: Path, tree: Path) -> None:
    tree.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(tree), "--numeric-owner", "-xf", str(tarball)],
                   check=True)


def _remove(tree: Path) -> None:
    """Remove an unpacked root, never through a mount point (the checkout's, if one leaked
    into this mount namespace)."""
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f]
    inside = [m for m in mounted if Path(m) == tree or Path(m).is_relative_to(tree)]
    if inside:
        raise SystemExit(f"not removing {tree}: {inside} mounted in it")
    shutil.rmtree(tree)


def _timeout(target: Arch) -> float:
    return BUILD_TIMEOUT if target.native else EMULATED_TIMEOUT


def base_tarball(target: Arch) -> Path:
    """The cached debootstrap of SUITE for ``target``, made first when missing."""
    tarball = cache_dir() / f"{_stem(target)}-{VARIANT}-{base_key(target)}.tar"
    if tarball.is_file():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    LOG.info("debootstrap %s for %s from %s (cached afterwards in %s)", SUITE, target.debian,
             mirror, tarball)
    work = tarball.with_suffix(".d")
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["debootstrap", f"--arch={target.debian}", f"--variant={VARIANT}",
                    f"--include={','.join(PACKAGES)}", SUITE, str(work), mirror, SCRIPT],
                   check=True, stdout=subprocess.DEVNULL, timeout=_timeout(target))
    _pack(work, tarball)
    shutil.rmtree(work)
    return tarball


def _build_tree(target: Arch, tarball: Path) -> Path:
    """The base unpacked beside ``tarball``, ready for pip (the host's CA and resolver)."""
    work = tarball.with_suffix(".d")
    shutil.rmtree(work, ignore_errors=True)
    _unpack(base_tarball(target), work)
    shutil.copyfile(HOST_CA, work / ROOT_CA.lstrip("/"))
    (work / "etc/resolv.conf").unlink(missing_ok=True)
    shutil.copyfile("/etc/resolv.conf", work / "etc/resolv.conf")
    return work


def _pip_env(**more: str) -> dict[str, str]:
    return {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "PIP_CERT": ROOT_CA,
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1", **more}


def wheel_dir(target: Arch) -> Path:
    """The cached directory with python-pkcs11's wheel for an emulated ``target``, built
    first (in a copy of the base, with EMULATED_CFLAGS) when missing."""
    wheels = cache_dir() / f"{_stem(target)}-wheels-{wheel_key(target)}"
    if wheels.is_dir():
        return wheels
    work = _build_tree(target, wheels)
    partial = wheels.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    LOG.info("%s for %s, compiled with CFLAGS=%s (cached afterwards in %s)", PKCS11,
             target.debian, EMULATED_CFLAGS, wheels)
    start = time.monotonic()
    rc = run_in_root(work, ["/bin/sh", "-ec", 'python3 -m venv /opt/build; '
                       '/opt/build/bin/pip wheel -q -w "$1" "$2"', "sh",
                            str(partial), PKCS11],
                     _pip_env(CFLAGS=EMULATED_CFLAGS), [partial], timeout=_timeout(target))
    _remove(work)
    if rc != 0:
        raise SystemExit(f"building {PKCS11}'s wheel failed (exit {rc})")
    LOG.info("%s's wheel built in %.0f s", PKCS11, time.monotonic() - start)
    partial.rename(wheels)
    return wheels


def root_tarball(target: Arch) -> Path:
    """The cached base with the venv, made first when missing."""
    tarball = cache_dir() / f"{_stem(target)}-venv-{root_key(target)}.tar"
    if tarball.is_file():
        LOG.info("the %s root from the cache: %s", _stem(target), tarball)
        return tarball
    wheels = [] if target.native else [wheel_dir(target)]
    work = _build_tree(target, tarball)
    LOG.info("the venv in the %s root: %s", _stem(target), " ".join(requirements()))
    find_links = "".join(f" --find-links {w}" for w in wheels)
    rc = run_in_root(work, ["/bin/sh", "-ec", f'python3 -m venv {VENV}; '
                       f'{VENV}/bin/pip install -q{find_links} "$@"', "sh", *requirements()],
                     _pip_env(), wheels, timeout=_timeout(target))
    if rc != 0:
        raise SystemExit(f"building the venv in {work} failed (exit {rc})")
    _pack(work, tarball)
    _remove(work)
    return tarball


def binds() -> list[Path]:
    """The checkout and, when it is a git worktree, the repository its ``.git`` names."""
    paths = [ROOT]
    if (ROOT / ".git").is_file():
        common = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--git-common-dir"],
                                capture_output=True, text=True, check=True).stdout.strip()
        repository = (ROOT / common).resolve()
        if not repository.is_relative_to(ROOT):
            paths.append(repository)
    return paths


def command(what: str, args: Sequence[str], target: Arch) -> list[str]:
    """The shell command run in the checkout: install it, then the suite (``test``) or the
    bench."""
    python = f"{VENV}/bin/python"
    install = (f"cd {ROOT} && {python} -m pip install -q --no-deps --no-build-isolation "
               "--no-index -e .")
    if what == "test":
        limits = () if target.native else EMULATION_LIMITS
        run = [python, "-m", "pytest", "-n", "2", *(f"--deselect={t}" for t in limits), *args]
    else:
        run = [python, "bench/run.py", "--out", f"bench/results/{_stem(target)}", *args]
    return ["/bin/sh", "-ec", f'{install}; exec "$@"', "sh", *run]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=arch, default=native(),
                        help="the root's architecture: x86_64 or arm64 (default: this "
                             "machine's; another one runs under user-mode emulation)")
    parser.add_argument("what", choices=("test", "bench", "wheel"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="pytest's or bench/run.py's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="target: %(message)s")
    if os.geteuid() != 0:
        raise SystemExit("needs root (debootstrap, mount namespaces, pivot_root)")
    why = unavailable(args.arch)
    if why:
        raise SystemExit(f"cannot run {args.arch.name} programs here: {why}")
    start = time.monotonic()
    if args.what == "wheel":
        # For the boot test: the directory with python-pkcs11's wheel, on stdout.
        print(wheel_dir(args.arch) if not args.arch.native else "", flush=True)
        return 0
    tarball = root_tarball(args.arch)
    tree = Path(tempfile.mkdtemp(prefix="lmp-autoreg-target-", dir="/var/tmp")) / "root"
    try:
        _unpack(tarball, tree)
        LOG.info("root ready after %.0f s; %s in it", time.monotonic() - start, args.what)
        env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8",
               **{k: os.environ[k] for k in ("CI",) if k in os.environ}}
        rc = run_in_root(tree, command(args.what, args.args, args.arch), env, binds(),
                         timeout=RUN_TIMEOUT if args.arch.native else EMULATED_TIMEOUT)
    finally:
        if tree.exists():
            _remove(tree)
        tree.parent.rmdir()
    LOG.info("%s on %s (%s): exit %d after %.0f s", args.what, SUITE, args.arch.name, rc,
             time.monotonic() - start)
    return rc


if __name__ == "__main__":
    sys.exit(main())
