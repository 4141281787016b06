"""Progress of a registration, one line per step: ``status(message)``.

Every step a person or systemd should see (each attempt, each failure and its next wait)
goes through ``status``. It logs the line; this is also the one place where the line is
handed on to systemd's status (``sd_notify`` ``STATUS=``) when the agent runs as a unit.
"""

import logging

LOG = logging.getLogger(__name__)


def status(message: str, level: int = logging.INFO) -> None:
    """Report ``message`` (one line, no secrets) at ``level``."""
    LOG.log(level, "%s", message)
