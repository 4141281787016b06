"""The factory line's throughput against ``--parallel`` (``make bench-line``).

Runs the same line (``python -m lmp_autoreg.testing line``: real agent processes against
the kit's server, in its own process, and its gateway) at ``--parallel`` 1, 2 and the
machine's cores, one after another in this run, and prints, as ratios of this run: devices
a minute and the speedup over K=1, the agents' CPU seconds a device, and the kit server's
share of the line's CPU (agents + kit server + the line runner), and the cores the line
kept busy (its CPU seconds over its wall seconds), beside what the machine gives K
CPU-bound processes at the same moment (``ceiling``: K copies of a busy loop against one;
on a machine other jobs load, the line's speedup can reach only that). ``--rounds R`` runs the
levels R times, in turn forwards and backwards (1, 2, 2, 1, ...), so that a change in the
machine's load touches every level alike, and reports each level's median. With ``--plot PNG`` it
draws the curve (docs/performance.md shows it). Results go to
``bench/results/line.json`` and ``line.md``.

Usage: ``python bench/line.py [--devices N] [--parallel 1,2,4] [--rounds R] [--plot PNG]
[--out DIR]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmp_autoreg.testing.line import Line, LineOptions
from lmp_autoreg.testing.plot import draw_speedup

RESULTS = Path(__file__).resolve().parent / "results"


def levels(text: str | None) -> list[int]:
    """The ``--parallel`` values: those given, else 1, 2 and the machine's cores."""
    if text:
        return sorted({int(k) for k in text.split(",")})
    return sorted({1, 2, os.cpu_count() or 1})


# A busy loop of about half a second: the machine's own speedup for K processes.
BUSY = [sys.executable, "-c", "sum(range(3 * 10**7))"]


def ceiling(parallel: int) -> float:
    """The speedup the machine gives ``parallel`` CPU-bound processes now: ``parallel``
    times one busy loop's wall time over that of ``parallel`` at once."""
    def wall(copies: int) -> float:
        start = time.monotonic()
        for process in [subprocess.Popen(BUSY) for _ in range(copies)]:
            process.wait()
        return time.monotonic() - start

    return round(parallel * wall(1) / wall(parallel), 3)


def measure(devices: int, parallel: int, out: Path) -> dict[str, float]:
    summary = Line(LineOptions(out=out, devices=devices, parallel=parallel),
                   progress=io.StringIO()).run()
    if not summary["passed"]:
        raise SystemExit(f"the line at --parallel {parallel} failed: {summary['problems']}")
    cpu = summary["cpu"]
    return {
        "parallel": parallel,
        "devices": devices,
        "devices_per_minute": summary["devices_per_minute"],
        "p50_seconds": summary["p50_seconds"],
        "agent_cpu_seconds_per_device": cpu["agent_seconds_per_device"],
        "kit_server_share": cpu["kit_server_share"],
        "cores_busy": round((cpu["agents_seconds"] + cpu["kit_server_seconds"]
                             + cpu["line_runner_seconds"]) / summary["wall_seconds"], 3),
        "ceiling": ceiling(parallel),
    }


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the runs of one level."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def table(rows: list[dict[str, float]]) -> str:
    base = rows[0]["devices_per_minute"]
    lines = [
        "| --parallel | devices | devices a minute | speedup | p50 s a device | "
        "agent CPU s a device | kit server's share of the line's CPU | cores busy | "
        "the machine's speedup for K busy processes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['parallel']:.0f} | {r['devices']:.0f} | {r['devices_per_minute']:.1f} | "
            f"{r['devices_per_minute'] / base:.2f} | {r['p50_seconds']:.2f} | "
            f"{r['agent_cpu_seconds_per_device']:.3f} | {100 * r['kit_server_share']:.1f} % | "
            f"{r['cores_busy']:.2f} | {r['ceiling']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=30, help="devices a line (default 30)")
    parser.add_argument("--parallel", help="comma-separated K (default 1, 2, the cores)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each level (default 2)")
    parser.add_argument("--plot", type=Path, help="draw the curve into this PNG")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    ks = levels(args.parallel)
    runs: dict[int, list[dict[str, float]]] = {k: [] for k in ks}
    with tempfile.TemporaryDirectory(prefix="lmp-autoreg-bench-line-") as scratch:
        for round_ in range(args.rounds):
            for k in ks if round_ % 2 == 0 else reversed(ks):
                run = measure(args.devices, k, Path(scratch) / f"r{round_}-k{k}")
                runs[k].append(run)
                print(f"--parallel {k}: {run['devices_per_minute']:.1f} devices a minute",
                      flush=True)
    rows = [median(runs[k]) for k in ks]
    text = table(rows)
    machine = f"{platform.python_version()}, {os.cpu_count()} cores"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "line.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "line.json").write_text(json.dumps({"machine": machine, "rows": rows,
                                                    "runs": runs}, indent=2) + "\n",
                                                   encoding="utf-8")
    if args.plot:
        draw_speedup([(int(r["parallel"]), r["devices_per_minute"]) for r in rows], args.plot,
                     title=f"Factory line: {args.devices} devices ({machine})",
                     ceiling=[r["ceiling"] for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
