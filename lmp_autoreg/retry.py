"""Retrying a request until a deadline (``--timeout``): ``retry(attempt, deadline)``.

A device on first boot has nobody watching it, so every failure that may go away by
itself is retried until the deadline: no connection (``Unreachable``), timeouts, 5xx, 429
and unusable answers (the other ``NoAnswer`` errors). ``ServerRefused`` (4xx) and local
errors end the loop at once.

The waits between attempts grow exponentially, with jitter that only ever shortens them
(so the caps hold):

- no connection: from 0.5 s, capped at 2 s. The network or the server is coming up, and
  the device must register within 2 s of the server becoming reachable.
- everything else: from 1 s, capped at 30 s. A server's ``Retry-After`` is honoured: the
  wait is never shorter than what the server asked for, nor than this backoff, which is
  the floor of every wait: a server answering ``Retry-After: 0`` to every request is not
  answered with a storm of them.

``next_wait`` is the whole policy as a pure function; ``retry`` only applies it.
"""

import copy
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import NoAnswer, Unreachable
from .progress import status

LOG = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_FIRST = 0.5  # seconds before the 2nd attempt after a connection failure
CONNECT_CAP = 2.0
SERVER_FIRST = 1.0  # ... after a 5xx, 429, timeout or unusable answer
SERVER_CAP = 30.0
JITTER = 0.25  # a computed wait is shortened by up to this fraction; Retry-After lengthened
MIN_ATTEMPT = 1.0  # an attempt with less time left than this is not worth starting
ATTEMPT_CAP = 60.0  # no single attempt waits longer than this, so a hung server is retried
CUT_SHORT = 0.1  # an attempt that failed with less time left than this ran into the deadline


class Deadline:
    """A point in time ``seconds`` from now on ``clock`` (the monotonic clock; a test
    drives its own, with a ``sleep`` that advances it, through the OAuth flow)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.start = clock()
        self.end = self.start + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - self.clock())

    def elapsed(self) -> float:
        return self.clock() - self.start


def backoff(failures: int, *, unreachable: bool, retry_after: float | None, rand: float) -> float:
    """The wait after the ``failures``-th failure in a row of one kind (1 for the first).

    ``unreachable``: the failure was a connection failure. ``retry_after``: the server's
    ``Retry-After`` in seconds, if it sent one (``checked.retry_after``: a finite number,
    not negative), which lengthens the wait and never shortens it. ``rand`` in [0, 1)
    spreads devices apart.
    """
    first, cap = (CONNECT_FIRST, CONNECT_CAP) if unreachable else (SERVER_FIRST, SERVER_CAP)
    own = min(cap, first * 2.0 ** min(failures - 1, 16)) * (1 - JITTER * rand)
    if retry_after is not None and not unreachable:
        return max(own, retry_after * (1 + JITTER * rand))
    return own


def next_wait(
    failures: int,
    *,
    unreachable: bool,
    retry_after: float | None,
    remaining: float,
    rand: float,
) -> float | None:
    """How long to wait before the next attempt, or None to give up now.

    ``remaining`` is the time left before the deadline. A computed wait is shortened so
    that one last attempt still fits; a server's ``Retry-After`` is not: when it reaches
    past the deadline there is no point in waiting for it.
    """
    wait = backoff(failures, unreachable=unreachable, retry_after=retry_after, rand=rand)
    room = remaining - MIN_ATTEMPT
    if retry_after is not None and not unreachable:
        return min(wait, room) if retry_after <= room else None
    wait = min(wait, room)
    return wait if wait >= 0 else None


def retry(attempt: Callable[[float], T], deadline: Deadline, *, what: str,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``attempt(budget)`` until it returns; retry ``NoAnswer`` until ``deadline``.

    ``budget`` is the most time (seconds) the attempt may take; it is never past the
    deadline, but for the first attempt, which gets at least ``MIN_ATTEMPT``: a deadline
    that ran out before the first request (a short ``--timeout`` on a slow or emulated
    board, where key generation and imports came first) ends after one real try, not
    after one that could not finish a handshake. ``sleep`` waits between attempts (on the
    deadline's clock). ``what`` names the attempt in the status lines of the second
    attempt on (the caller announces the first). Past the deadline, the last
    ``NoAnswer`` is raised again (same class), saying how many attempts were made, and,
    when the deadline cut that attempt short, why the attempt before it failed: "timed
    out" alone would hide it.
    """
    number = 0
    failures = 0
    last_unreachable: bool | None = None
    before: NoAnswer | None = None
    while True:
        number += 1
        if number > 1:  # the caller announced the first
            status(f"{what}: attempt {number}")
        try:
            budget = deadline.remaining()
            if number == 1:  # one real try, even where start-up used the deadline up
                budget = max(budget, MIN_ATTEMPT)
            return attempt(min(budget, ATTEMPT_CAP))
        except NoAnswer as error:
            unreachable = isinstance(error, Unreachable)
            failures = failures + 1 if unreachable == last_unreachable else 1
            last_unreachable = unreachable
            left = deadline.remaining()
            wait = next_wait(
                failures,
                unreachable=unreachable,
                retry_after=error.retry_after,
                remaining=left,
                rand=random.random(),
            )
            if wait is None:
                cut_short = left < CUT_SHORT and before is not None
                raise _gave_up(error, number, deadline, before if cut_short else None) from error
            before = error
            status(
                f"attempt {number} failed: {error}; retrying in {wait:.1f} s "
                f"({left:.0f} s left)",
                logging.WARNING,
            )
            sleep(wait)


def _gave_up(
    error: NoAnswer, attempts: int, deadline: Deadline, before: NoAnswer | None
) -> NoAnswer:
    """``error`` (same class, same fields) with how long we tried added to its message, and
    ``before``, the failure of the attempt before a last one the deadline cut short."""
    final = copy.copy(error)
    plural = "s" if attempts != 1 else ""
    earlier = f"; the deadline cut it short, the attempt before failed: {before}" if before else ""
    final.args = (
        f"{error}{earlier} (gave up after {attempts} attempt{plural} in "
        f"{deadline.elapsed():.1f} s; --timeout {deadline.seconds:g})",
    )
    return final
