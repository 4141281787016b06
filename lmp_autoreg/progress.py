"""Progress of a registration, one line per step: ``status(message)``.

The retry loop reports each attempt, and each failure with its next wait, through
``status``, which only logs the line. Nothing here talks to systemd: under systemd,
``journal.NotifyHandler`` hands every record at INFO or above, from any of the agent's
modules, to ``sd_notify`` as ``STATUS=``; these lines are among them.
"""

import logging

LOG = logging.getLogger(__name__)

# What a person must act on (the OAuth prompt): above INFO, so that -q shows it, and below
# WARNING, so that it is not labelled one; the journal's "notice" priority.
PROMPT = logging.INFO + 5
logging.addLevelName(PROMPT, "NOTICE")


def status(message: str, level: int = logging.INFO) -> None:
    """Report ``message`` (one line, no secrets) at ``level``."""
    LOG.log(level, "%s", message)
