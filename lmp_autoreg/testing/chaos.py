"""The fault schedule of a rehearsed factory line (``python -m lmp_autoreg.testing line``).

Pure: :func:`schedule` turns the kinds of ``--chaos`` into events, each tied to the device
whose start sets it off, so a line of the same size and seed faults at the same points.

- ``restart``: the kit's server is stopped halfway through the line and started again
  from its state directory, on the same ports.
- ``lost-answer``: a few registrations are signed (and, partially detached, created in the
  devices API), then the server hangs up before the answer.
- ``5xx``: a burst of 503 answers.
- ``slow``: a few answers that take seconds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("restart", "lost-answer", "5xx", "slow")
# The 503s of one burst, and how long a slow answer takes (seconds).
BURST = 6
SLOW_SECONDS = 2.5
SLOW_ANSWERS = 3


@dataclass(frozen=True)
class Event:
    """One fault: ``kind``, set off when device number ``at`` (0-based) starts;
    ``count`` answers of it (a restart has 1)."""

    kind: str
    at: int
    count: int = 1

    def as_json(self) -> dict[str, object]:
        return {"kind": self.kind, "at_device": self.at, "count": self.count}


def parse(text: str | None) -> tuple[str, ...]:
    """The kinds of ``--chaos LIST`` (comma-separated), in order; ValueError names a
    kind the line does not know."""
    kinds = tuple(k.strip() for k in (text or "").split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown chaos {', '.join(unknown)}: choose from {', '.join(KINDS)}")
    return tuple(dict.fromkeys(kinds))


def lost_answers(devices: int) -> int:
    """How many answers ``lost-answer`` loses in a line of ``devices``: a few."""
    return max(1, min(5, devices // 25))


def schedule(kinds: tuple[str, ...], devices: int, seed: int) -> list[Event]:
    """The events of a line of ``devices`` devices, by the device that sets them off."""
    rng = random.Random(seed)
    events: list[Event] = []
    last = max(devices - 1, 0)
    for kind in kinds:
        if kind == "restart":
            events.append(Event(kind, devices // 2))
        elif kind == "5xx":
            events.append(Event(kind, devices // 3, BURST))
        elif kind == "slow":
            events.append(Event(kind, (2 * devices) // 3, SLOW_ANSWERS))
        elif kind == "lost-answer":
            count = lost_answers(devices)
            at = sorted(rng.sample(range(last + 1), min(count, last + 1)))
            events.extend(Event(kind, i) for i in at)
    return sorted(events, key=lambda e: (e.at, KINDS.index(e.kind)))
