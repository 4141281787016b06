"""Boot a root of another architecture as a whole machine: qemu's full-system emulation.

systemd 262 does not boot under user-mode emulation: qemu-user answers the new mount API
(fsopen, fsmount, mount_setattr, open_tree_attr) with ENOSYS, so every unit with a mount
namespace or credentials fails, the agent's own unit and journald among them. Here the
guest runs its own Debian kernel (rootfs.kernel_image) on qemu's ``virt`` machine, its root
file system the prepared tree itself, shared over virtio-fs (virtiofsd). The kernel mounts
it directly (Debian builds virtio-fs and virtio-pci in), so there is no initramfs. The
guest has no network: the kit's server runs inside it, as in the containers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from emulation import Arch
from nspawn import Outcome, stop

LOG = logging.getLogger(__name__)

MEMORY_MB = 1024
CPUS = 2  # qemu translates each on a thread of its own
# Debian bookworm's qemu-system-common ships the C virtiofsd; later releases the Rust one
# (package virtiofsd), whose options differ.
VIRTIOFSD_C = Path("/usr/lib/qemu/virtiofsd")
VIRTIOFSD_RUST = Path("/usr/libexec/virtiofsd")
SOCKET_WAIT = 30.0


@dataclass(frozen=True)
class Board:
    """qemu's machine for an architecture: its program, machine and CPU, its console."""

    program: str
    machine: list[str]
    console: str


# Cortex-A76, raspberrypi5's core. (``-cpu max`` computes pointer authentication with
# QARMA5, which under emulation makes a boot several times as slow.)
BOARDS = {"aarch64": Board("qemu-system-aarch64", ["-M", "virt", "-cpu", "cortex-a76"],
                           "ttyAMA0")}


def virtiofsd() -> Path | None:
    return next((p for p in (VIRTIOFSD_C, VIRTIOFSD_RUST) if os.access(p, os.X_OK)), None)


def unavailable(target: Arch) -> str | None:
    """None when a machine of ``target`` can be emulated here; else why not."""
    board = BOARDS.get(target.qemu)
    if board is None:
        return f"no full-system emulation of {target.name} is set up (boot/qemu.py BOARDS)"
    if shutil.which(board.program) is None:
        return f"no {board.program}: install Debian's qemu-system-arm"
    if virtiofsd() is None:
        return f"no virtiofsd ({VIRTIOFSD_C} or {VIRTIOFSD_RUST}): install Debian's " \
               "qemu-system-common (bookworm) or virtiofsd"
    return None


def virtiofsd_argv(program: Path, socket: Path, tree: Path) -> list[str]:
    # chroot, not namespaces: run inside a container, it may not make namespaces of its own.
    # The guest caches what it reads for good (nothing on the host changes the tree while
    # the machine runs): a boot takes half the time it takes with cache=auto.
    if program == VIRTIOFSD_C:
        return [str(program), f"--socket-path={socket}", "-o", f"source={tree}",
                "-o", "sandbox=chroot", "-o", "xattr", "-o", "cache=always"]
    return [str(program), f"--socket-path={socket}", f"--shared-dir={tree}",
            "--sandbox=chroot", "--xattr", "--cache=always"]


@contextlib.contextmanager
def bound(tree: Path, binds: Mapping[Path, str]) -> Iterator[None]:
    """The host directories of ``binds`` mounted at their paths in ``tree`` while the
    machine runs: virtiofsd shares them with the rest of the tree."""
    done: list[Path] = []
    try:
        for host, guest in binds.items():
            at = tree / guest.lstrip("/")
            at.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", str(host), str(at)], check=True)
            done.append(at)
        yield
    finally:
        for at in reversed(done):
            subprocess.run(["umount", str(at)], check=False)


def boot(tree: Path, target: Arch, kernel: Path, binds: Mapping[Path, str], timeout: float,
         log: Path) -> Outcome:
    """Boot the tree with its systemd as PID 1 on an emulated ``target`` machine until it
    powers off (or the timeout); ``binds`` maps host directories to paths in the guest."""
    board = BOARDS[target.qemu]
    program = virtiofsd()
    assert program is not None, "checked by unavailable()"
    socket = log.with_suffix(".virtiofs.sock")
    socket.unlink(missing_ok=True)
    start = time.monotonic()
    rc: int | None = None
    with bound(tree, binds), open(log.with_suffix(".qemu.log"), "w") as errors:
        daemon = subprocess.Popen(virtiofsd_argv(program, socket, tree),
                                  stdin=subprocess.DEVNULL, stdout=errors,
                                  stderr=subprocess.STDOUT)
        try:
            while not socket.exists():
                if daemon.poll() is not None or time.monotonic() - start > SOCKET_WAIT:
                    # An error, not an exit: the scenario fails, the others still run.
                    raise RuntimeError(f"virtiofsd did not start; see {errors.name}")
                time.sleep(0.1)
            machine = subprocess.Popen([
                board.program, *board.machine, "-smp", str(CPUS), "-m", str(MEMORY_MB),
                # virtio-fs needs the guest's memory shared with virtiofsd.
                "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MB}M,share=on",
                "-numa", "node,memdev=mem",
                "-chardev", f"socket,id=root,path={socket}",
                "-device", "vhost-user-fs-pci,chardev=root,tag=root",
                "-kernel", str(kernel),
                "-append", f"console={board.console} rootfstype=virtiofs root=root rw",
                "-nic", "none", "-no-reboot", "-display", "none", "-monitor", "none",
                "-serial", f"file:{log}"],
                stdin=subprocess.DEVNULL, stdout=errors, stderr=subprocess.STDOUT)
            try:
                rc = machine.wait(max(1.0, timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                LOG.error("%s: no power-off after %.0f s, stopping the machine", tree, timeout)
            finally:
                stop(machine)
        finally:
            stop(daemon)
    return Outcome(rc, time.monotonic() - start,
                   log.read_text(errors="replace") if log.exists() else "")
