"""Logging: plain lines on stderr, quiet or verbose on request."""

import logging
import sys

from . import PROG


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {message}"
        return f"{PROG}: {message}"


def setup(verbosity: int) -> None:
    """verbosity: -1 quiet (warnings and errors), 0 normal, 1 and more debug."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("lmp_autoreg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
