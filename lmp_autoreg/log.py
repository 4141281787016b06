"""Logging: plain lines on stderr; under systemd, the journal and sd_notify status.

``setup`` picks the handlers (``journal`` explains when and why): native journal entries
with structured fields when stderr is the journal and systemd-python is installed, plain
``lmp-device-auto-register: ...`` lines on stderr otherwise, and ``STATUS=`` lines for
the service manager when ``NOTIFY_SOCKET`` is set.
"""

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from . import PROG
from .progress import PROMPT

# Journal fields of every record from the moment they are known (see ``add_fields``).
FIELDS: dict[str, str] = {}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {message}"
        return f"{PROG}: {message}"


def add_fields(**fields: object) -> None:
    """Add journal fields (``LMP_UUID=...``) to every record from now on."""
    FIELDS.update((name, str(value)) for name, value in fields.items())


def fields(**fields: object) -> dict[str, Any]:
    """``extra=`` for one logging call: journal fields of that record only."""
    return {"journal_fields": {name: str(value) for name, value in fields.items()}}


def setup(verbosity: int, environ: Mapping[str, str] | None = None) -> None:
    """verbosity: -1 quiet (what a person must act on, warnings and errors), 0 normal, 1 and
    more debug."""
    environ = os.environ if environ is None else environ
    level = PROMPT if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    stderr: logging.Handler = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(_Formatter())
    stderr.setLevel(level)
    handlers = [stderr]
    if environ.get("JOURNAL_STREAM") or environ.get("NOTIFY_SOCKET"):
        from . import journal

        if journal.stderr_is_journal(environ):
            handler = journal.journal_handler(FIELDS, fallback=stderr)
            if handler is not None:
                handler.setLevel(level)
                handlers = [handler]
        notify = journal.notify_handler(environ)
        if notify is not None:
            handlers.append(notify)
    root = logging.getLogger("lmp_autoreg")
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(min(h.level for h in handlers))
    root.propagate = False
