"""The pictures of a rehearsed factory line (``line.svg``, ``line.png``) and of its
benchmark: matplotlib, the kit's optional extra (``lmp-autoreg[kit]``), never the agent's.

:func:`draw`: above, the timeline, one row a device from its start to its end, coloured by
its outcome, with the chaos events marked; below, the throughput over time (devices
finished a minute, and all finished so far). :func:`draw_speedup`: the benchmark's devices
a minute against ``--parallel``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLOURS = {
    "registered": "#2e7d32",
    "registered after retries": "#81c784",
    "operator case": "#e65100",
}
EVENT_COLOURS = {"restart": "#c62828", "lost-answer": "#6a1b9a", "5xx": "#1565c0",
                 "slow": "#795548"}


@dataclass(frozen=True)
class Span:
    """One device on the timeline: its station, start and end (seconds into the line) and
    outcome (a key of :data:`COLOURS`)."""

    station: int
    start: float
    end: float
    outcome: str


def _pyplot() -> Any:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput(spans: Sequence[Span], step: float) -> tuple[list[float], list[float]]:
    """Devices finished a minute in each window of ``step`` seconds, by window end."""
    if not spans:
        return [], []
    last = max(s.end for s in spans)
    ends, rates = [], []
    t = step
    while t < last + step:
        done = sum(1 for s in spans if t - step <= s.end < t)
        ends.append(t)
        rates.append(done * 60 / step)
        t += step
    return ends, rates


def draw(
    spans: Sequence[Span],
    events: Sequence[Mapping[str, Any]],
    svg: Path,
    png: Path,
    *,
    title: str,
) -> None:
    """Write the line's picture as ``svg`` and ``png``."""
    plt = _pyplot()
    height = min(14.0, 4.0 + 0.045 * len(spans))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(13, height + 3), sharex=True,
        gridspec_kw={"height_ratios": [height, 3]})
    for outcome, colour in COLOURS.items():
        chosen = [s for s in spans if s.outcome == outcome]
        if not chosen:
            continue
        top.barh([s.station for s in chosen], [max(s.end - s.start, 0.05) for s in chosen],
                 left=[s.start for s in chosen], height=0.8, color=colour,
                 label=f"{outcome} ({len(chosen)})")
    marked: set[str] = set()
    for event in events:
        kind = str(event.get("kind"))
        colour = EVENT_COLOURS.get(kind, "black")
        if float(event.get("until", event["time"])) > float(event["time"]):
            for axis in (top, bottom):  # the time the server was down
                axis.axvspan(float(event["time"]), float(event["until"]), color=colour,
                             alpha=0.15)
        for axis in (top, bottom):
            axis.axvline(float(event["time"]), color=colour, linestyle="--", linewidth=1.2,
                         label=None if kind in marked or axis is bottom else f"chaos: {kind}")
        marked.add(kind)
    top.set_ylabel("device (station)")
    top.invert_yaxis()
    top.set_title(f"Factory line rehearsal: {title}")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    top.grid(axis="x", alpha=0.3)
    last = max((s.end for s in spans), default=1.0)
    step = max(2.0, last / 30)
    ends, rates = throughput(spans, step)
    bottom.plot(ends, rates, drawstyle="steps-pre", color="#37474f",
                label=f"finished a minute ({step:.0f} s windows)")
    done = sorted(s.end for s in spans)
    twin = bottom.twinx()
    twin.plot(done, range(1, len(done) + 1), color="#2e7d32", alpha=0.6, label="finished")
    twin.set_ylabel("devices finished")
    bottom.set_ylabel("devices a minute")
    bottom.set_xlabel("seconds into the line")
    bottom.grid(alpha=0.3)
    lines = bottom.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    bottom.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left",
                  bbox_to_anchor=(1.08, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(svg)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def draw_speedup(
    points: Sequence[tuple[int, float]],
    png: Path,
    *,
    title: str,
    ceiling: Sequence[float] = (),
) -> None:
    """The benchmark's curve: devices a minute at each ``--parallel`` (K, rate), with the
    ideal line of K times the rate at K=1, and, given the machine's speedup for K busy
    processes at each K (``ceiling``), the rate at K=1 times it: what the machine allowed."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(6, 4))
    ks = [k for k, _ in points]
    rates = [r for _, r in points]
    axis.plot(ks, rates, marker="o", label="measured")
    if points:
        base = points[0][1] / points[0][0]
        axis.plot(ks, [base * k for k in ks], linestyle=":", color="grey",
                  label="linear in K")
    if ceiling:
        axis.plot(ks, [points[0][1] * c / ceiling[0] for c in ceiling], linestyle="--",
                  color="#e65100", label="what the machine gave K busy processes")
    axis.set_xlabel("--parallel K")
    axis.set_ylabel("devices a minute")
    axis.set_xticks(ks)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
