"""The systemd side of logging: native journal entries and ``sd_notify`` ``STATUS=`` lines.

``log.setup`` uses this module only when the agent runs under systemd:

- **Journal.** When ``JOURNAL_STREAM`` names the device and inode of our stderr (the
  test systemd.exec(5) documents: stderr *is* a journal stream), each record is sent as
  a native journal entry with ``SYSLOG_IDENTIFIER=lmp-device-auto-register``, a
  ``PRIORITY``, the code location, and the agent's structured fields (``LMP_UUID``,
  ``LMP_FACTORY`` once known, ``LMP_EXIT_CODE`` on the last line). This needs
  systemd-python and the journal's native socket; without them the plain stderr lines
  still reach the journal through the stream, just without the fields. An entry the
  journal refuses is written to stderr instead.
- **Status.** When ``NOTIFY_SOCKET`` is set, every message at INFO or above is also sent
  as ``STATUS=<message>``, so ``systemctl status`` shows the step the agent is at. With
  systemd-python this is ``systemd.daemon.notify``; without it the datagram is written
  here (a path or an abstract ``@name`` socket; other address kinds are skipped).

``systemd`` modules are imported here, lazily, and only under systemd: the agent's other
paths never pay for them.
"""

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from .progress import PROMPT

IDENTIFIER = "lmp-device-auto-register"
# Where libsystemd sends native entries; when it is missing, it drops them silently.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# syslog priorities (journal field PRIORITY) of the logging levels.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (PROMPT, 5),
               (logging.INFO, 6))
_DEBUG_PRIORITY = 7
# A STATUS= line is one short line.
STATUS_LIMIT = 200


def priority(levelno: int) -> int:
    for level, value in _PRIORITIES:
        if levelno >= level:
            return value
    return _DEBUG_PRIORITY


def stderr_is_journal(environ: Mapping[str, str], stream: TextIO | None = None) -> bool:
    """True when ``JOURNAL_STREAM`` (``<device>:<inode>``) is the file ``stream`` writes to."""
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # no fileno, a closed stream, garbage
        return False


class JournalHandler(logging.Handler):
    """Sends records to the journal as native entries with the agent's fields.

    ``context`` holds fields added to every entry (it may grow while the agent runs);
    a record's own fields come from ``extra=log.fields(...)``. When the journal cannot
    be written to, the record goes to ``fallback`` instead of being lost.
    """

    def __init__(
        self, send: Callable[..., Any], context: Mapping[str, str], fallback: logging.Handler
    ) -> None:
        super().__init__()
        self._send = send
        self._context = context
        self._fallback = fallback
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        fields = {**self._context, **getattr(record, "journal_fields", {})}
        try:
            self._send(
                self.format(record),
                PRIORITY=str(priority(record.levelno)),
                SYSLOG_IDENTIFIER=IDENTIFIER,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **fields,
            )
        except OSError:
            self._fallback.handle(record)


def journal_handler(context: Mapping[str, str], fallback: logging.Handler) -> JournalHandler | None:
    """A ``JournalHandler``; None without systemd-python or without the journal's socket."""
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        from systemd import journal
    except ImportError:
        return None
    return JournalHandler(journal.send, context, fallback)


class NotifyHandler(logging.Handler):
    """Sends the first line of each record as ``STATUS=`` to the service manager.

    Status is best effort: a failed send is ignored, never shown.
    """

    def __init__(self, notify: Callable[[str], object], close: Callable[[], None] | None = None):
        super().__init__(logging.INFO)
        self._notify = notify
        self._close = close

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().strip().splitlines() or [""]
        try:
            self._notify("STATUS=" + lines[0][:STATUS_LIMIT])
        except OSError:
            pass

    def close(self) -> None:
        if self._close is not None:
            self._close()
        super().close()


def notify_handler(environ: Mapping[str, str]) -> NotifyHandler | None:
    """A ``NotifyHandler`` when ``NOTIFY_SOCKET`` is set (and usable), else None."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    try:
        from systemd import daemon
    except ImportError:
        return _datagram_notify_handler(address)
    return NotifyHandler(daemon.notify)


def _datagram_notify_handler(address: str) -> NotifyHandler | None:
    """sd_notify(3) without libsystemd: one AF_UNIX datagram per state line."""
    if address.startswith("@"):
        target = "\0" + address[1:]  # the abstract namespace
    elif address.startswith("/"):
        target = address
    else:
        return None  # e.g. vsock: addresses, which only libsystemd speaks
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)  # a status line is never worth waiting for

    def notify(state: str) -> None:
        sock.sendto(state.encode("utf-8", "replace"), target)

    return NotifyHandler(notify, sock.close)
