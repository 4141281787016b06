"""make boot-test: boot the agent under a real systemd, once per scenario and root.

Each root, a debootstrap'd Debian (cached: bookworm with systemd 252, forky with systemd
262), gets the agent as the recipe installs it, stand-ins of meta-lmp's aktualizr-lite and
fioconfig, the test kit's standalone server and a collector (rootfs.py). Each scenario
boots an overlay of that tree with systemd-nspawn (nspawn.py); the guest's collector writes
`systemctl show`, the journal as JSON and files into a directory bound from the host, which
checks them (scenarios.py, evidence.py).

Each root is for an architecture: bookworm and forky for x86_64, forky for arm64 too. A
root of another architecture than this machine's is prepared under user-mode emulation
(emulation.py) and boots as an emulated machine with its own kernel (qemu.py): systemd 262
does not boot under qemu-user. There only the scenarios rootfs.EMULATED_SCENARIOS run,
with more time for each boot.

Usage: ``python boot/run.py [--jobs N] [--roots bookworm,forky] [--arch x86_64,arm64]
[--only 1,3] [--keep]``. Needs root, mount and PID namespaces, overlayfs, debootstrap and
systemd-nspawn; for another architecture, Debian's qemu-user-static, binfmt_misc and
qemu-system-arm (with bookworm's virtiofsd).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import emulation  # noqa: E402
import nspawn  # noqa: E402
import qemu  # noqa: E402
from bitbake import ROOT, Recipe  # noqa: E402
from emulation import ARCHES, arch  # noqa: E402
from evidence import Boot  # noqa: E402
from nspawn import Outcome  # noqa: E402
from rootfs import ROOTS, Root, kernel_image, prepare  # noqa: E402
from scenarios import BASE_VARIABLES, SCENARIOS, BootSpec, Scenario, Verdict  # noqa: E402

LOG = logging.getLogger("boot-test")
_print_lock = threading.Lock()


@dataclass(frozen=True)
class Prepared:
    """A root ready to boot: its tree, and the kernel of the machine that boots it (None:
    a container on this machine's kernel)."""

    tree: Path
    kernel: Path | None


def boot_once(root: Root, kernel: Path | None, merged: Path, results: Path, name: str,
              spec: BootSpec, log: Path) -> Outcome:
    """One boot of ``merged`` with ``results`` at /boot-test: a container (systemd-nspawn)
    on this machine's kernel, or an emulated machine of the root's architecture."""
    timeout = spec.timeout(root.slowdown)
    if kernel is not None:
        return qemu.boot(merged, root.arch, kernel, {results: "/boot-test"}, timeout, log)
    options = [f"--bind={results}:/boot-test", f"--machine={name}"]
    if spec.bpf:
        options.append("--system-call-filter=bpf")
    return nspawn.boot(merged, f"lmp-autoreg-{name}", options, timeout, log,
                       unified=spec.bpf or root.unified)


def run_scenario(root: Root, scenario: Scenario, prepared: Prepared, work: Path,
                 tag: str) -> tuple[Verdict, float]:
    """Boot ``scenario`` on an overlay of ``root``'s prepared tree; ``tag`` names its
    cgroups and machines ([A-Za-z0-9-] only)."""
    tree = prepared.tree
    start = time.monotonic()
    here = work / f"s{scenario.number}"
    upper, scratch, merged, results = (here / n for n in ("upper", "work", "root", "results"))
    for d in (upper, scratch, merged, results / "out"):
        d.mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tree},upperdir={upper},workdir={scratch}", str(merged)],
                   check=True)
    verdict = Verdict()
    try:
        warnings = Recipe.load().install(ROOT, merged, {**BASE_VARIABLES, **scenario.variables})
        verdict.notes += [f"recipe: {w}" for w in warnings]
        if scenario.setup:
            scenario.setup(merged)
        boots = []
        for i, spec in enumerate(scenario.boots):
            if spec.before:
                spec.before(merged)
            collect = spec.scaled(root.slowdown)
            (results / "scenario.json").write_text(json.dumps(collect))
            seen = set((results / "out").iterdir())
            outcome = boot_once(root, prepared.kernel, merged, results,
                                f"boot-test-{tag}-{scenario.number}", spec,
                                here / f"console-{i + 1}.log")
            new = sorted(set((results / "out").iterdir()) - seen)
            boots.append(Boot.read(outcome.returncode, outcome.seconds, new[-1] if new else None))
        scenario.check(boots, verdict)
    except Exception as e:  # a broken scenario is reported, the others still run
        LOG.exception("scenario %d", scenario.number)
        verdict.failures.append(f"the scenario could not run: {e!r}")
    finally:
        subprocess.run(["umount", str(merged)], check=False)
    return verdict, time.monotonic() - start


def report(root: Root, scenario: Scenario, verdict: Verdict, seconds: float) -> None:
    word = "FAIL" if verdict.failures else "SKIP" if verdict.skipped else "PASS"
    with _print_lock:
        print(f"{root.suite:8} {root.arch.name:7} scenario {scenario.number:2d} "
              f"{scenario.title}: {word} ({seconds:.1f} s)", flush=True)
        for line in verdict.failures:
            print("    - " + line.replace("\n", "\n      "), flush=True)
        for line in verdict.notes:
            print("    " + line, flush=True)
        if verdict.skipped:
            print("    skipped: " + verdict.skipped, flush=True)


def prepare_root(root: Root, work: Path, tag: str) -> Prepared:
    start = time.monotonic()
    tree = work / "prepared"
    found = prepare(root, tree, work, f"lmp-autoreg-boot-{tag}-prepare")
    kernel = None if root.arch.native else kernel_image(root)
    LOG.info("%s: guest prepared in %.1f s: %s", root.name, time.monotonic() - start, found)
    return Prepared(tree, kernel)


def unavailable(root: Root) -> str | None:
    """None when ``root`` can be prepared (its programs run here, natively or under
    user-mode emulation) and booted (in a container, or on an emulated machine)."""
    if root.arch.native:
        return None
    return emulation.unavailable(root.arch) or qemu.unavailable(root.arch)


def not_run(root: Root, why: str) -> Verdict:
    """The verdict of a scenario whose root's architecture cannot run here: a failure in
    CI (which installs qemu-user-static and qemu-system-arm on a kernel with binfmt_misc),
    else a skip."""
    reason = f"{root.arch.name} cannot run here: {why}"
    return Verdict(failures=[reason]) if os.environ.get("CI") else Verdict(skipped=reason)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    suites = ",".join(dict.fromkeys(r.suite for r in ROOTS))
    parser.add_argument("--roots", default=suites,
                        help=f"Debian releases to boot, comma separated (default {suites})")
    parser.add_argument("--arch", default=",".join(ARCHES),
                        help=f"architectures, comma separated (default {','.join(ARCHES)}; "
                             "another than this machine's boots as an emulated machine)")
    parser.add_argument("--only", help="scenario numbers, comma separated")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="boot-test: %(message)s")
    if os.geteuid() != 0:
        print("boot-test needs root (debootstrap, overlayfs, systemd-nspawn)", file=sys.stderr)
        return 2
    arches = {arch(name).name for name in args.arch.split(",")}
    roots = [r for r in ROOTS if r.suite in args.roots.split(",") and r.arch.name in arches]
    chosen = SCENARIOS
    if args.only:
        numbers = {int(n) for n in args.only.split(",")}
        chosen = [s for s in SCENARIOS if s.number in numbers]
    # Each root's scenarios; a root whose architecture cannot run here is not prepared.
    runs = {r.name: [s for s in chosen if (r.only is None or s.number in r.only)
                     and (r.hsm or not s.hsm)] for r in roots}
    missing = {r.name: why for r in roots if (why := unavailable(r))}
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lmp-autoreg-boot.", dir="/var/tmp"))
    # Names the run's cgroups and machines, which allow only [A-Za-z0-9-].
    tag = re.sub(r"[^A-Za-z0-9]", "x", work.name.rsplit(".", 1)[1])
    results = []
    try:
        # The roots are prepared side by side (a cold cache waits on the network), then
        # every root's scenarios share one pool.
        for root in roots:
            if root.name in missing:
                for scenario in runs[root.name]:
                    verdict = not_run(root, missing[root.name])
                    report(root, scenario, verdict, 0.0)
                    results.append(verdict)
        ready = [r for r in roots if r.name not in missing and runs[r.name]]
        with ThreadPoolExecutor(max_workers=max(1, len(ready))) as pool:
            trees = list(pool.map(lambda r: prepare_root(r, work / r.name, f"{tag}-{r.name}"),
                                  ready))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [(root, s, pool.submit(run_scenario, root, s, prepared, work / root.name,
                                             f"{tag}-{root.name}"))
                       for root, prepared in zip(ready, trees, strict=True)
                       for s in runs[root.name]]
            for root, scenario, future in futures:
                verdict, seconds = future.result()
                report(root, scenario, verdict, seconds)
                results.append(verdict)
    finally:
        if args.keep:
            print(f"boot-test: work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = sum(1 for v in results if v.failures)
    skipped = sum(1 for v in results if v.skipped and not v.failures)
    print(f"boot-test: {len(results) - failed - skipped} of {len(results)} scenarios passed"
          f"{f', {skipped} skipped' if skipped else ''} in {time.monotonic() - start:.0f} s",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
