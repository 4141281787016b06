"""Checks made before anything is sent: where the token may go, how it is stored, the clock.

- ``check_token_transport``: a token goes over plain ``http://`` only to a loopback host
  (127.0.0.0/8, ::1, localhost), unless ``--allow-insecure-token`` says otherwise; it is
  a ConfigError (exit 2), raised while the settings are resolved, before any connection.
- ``token_file_warnings``: a token file on a production registration (production devices
  register without one, and every device built from the image would carry it), or one
  that every user can read.
- ``clock_warning``: a system clock earlier than this package's release cannot be right,
  and would make every certificate look "not yet valid".
"""

import ipaddress
import logging
import os
from datetime import UTC, date, datetime
from urllib.parse import urlsplit

from . import RELEASE_DATE
from .errors import ConfigError

LOG = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(url: str, *, has_token: bool, allow_insecure: bool) -> None:
    """Refuse to send a token in clear text to another machine (ConfigError)."""
    parts = urlsplit(url)
    if not has_token or parts.scheme != "http" or is_loopback(parts.hostname or ""):
        return
    if not allow_insecure:
        raise ConfigError(
            f"refusing to send the API token over plain http to {parts.hostname} (anyone "
            "on the way could read it): use https, or --allow-insecure-token"
        )
    LOG.warning("--allow-insecure-token: sending the API token over plain http to %s",
                parts.hostname)


def token_file_warnings(path: str | None, *, production: bool) -> list[str]:
    """Warnings about the token file at ``path`` (None: no token file)."""
    if path is None:
        return []
    warnings = []
    if production:
        warnings.append(
            f"an API token file ({path}) is used for a production registration: production "
            "devices register without a token, and every device built from this image "
            "carries it; remove it from the image"
        )
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return warnings
    if mode & 0o004:
        warnings.append(
            f"the API token file {path} is readable by every user (mode {mode:04o}): "
            "make it 0600"
        )
    return warnings


def clock_warning(now: datetime, release: date) -> str | None:
    """A warning when ``now`` is before ``release`` (the clock is surely wrong)."""
    if now.date() >= release:
        return None
    return (
        f"the system clock says {now:%Y-%m-%d %H:%M} UTC, earlier than this agent's release "
        f"({release.isoformat()}): the clock is wrong, and certificates will look "
        "\"not yet valid\" to TLS; set the clock (NTP or the RTC) before registering"
    )


def warn(*, token_file: str | None, production: bool) -> None:
    """Log every warning of this module that applies now."""
    message = clock_warning(datetime.now(UTC), date.fromisoformat(RELEASE_DATE))
    for text in ([message] if message else []) + token_file_warnings(
        token_file, production=production
    ):
        LOG.warning("%s", text)
