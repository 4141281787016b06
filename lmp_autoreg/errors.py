"""One exception class per exit code of docs/spec.md section 6.

Every failure the agent knows about is raised as one of these; the CLI turns the class
into the exit code and the ``kind`` into the JSON ``error.kind``. Anything else that
escapes is a bug and exits 1.
"""


class AutoregError(Exception):
    """Base class: an error the agent expected and can explain."""

    exit_code = 1
    kind = "internal"
    # What was known when it failed (a ``result.Result``), for the JSON object.
    result: object = None
    # What an operator does about it, for the JSON object's ``error.remedy`` (docs/spec.md
    # section 6): ``{"case", "device": {"uuid", "name"}, "text"}``; None when the message
    # says all there is.
    remedy: dict[str, object] | None = None


class ConfigError(AutoregError):
    """A setting is missing or invalid, or the options do not fit together."""

    exit_code = 2
    kind = "config"


class AlreadyRegistered(AutoregError):
    """The device is registered already; nothing was changed."""

    exit_code = 3
    kind = "already-registered"

    def __init__(self, message: str, uuid: str | None = None, sota_dir: str | None = None):
        super().__init__(message)
        self.uuid = uuid
        self.sota_dir = sota_dir  # the device path, for the JSON


class ServerRefused(AutoregError):
    """The server answered 4xx (other than 429): retrying will not help."""

    exit_code = 4
    kind = "refused"

    def __init__(self, message: str, status: int, remedy: dict[str, object] | None = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.remedy = remedy


class NoAnswer(AutoregError):
    """No usable answer: no connection, a timeout, a 5xx or 429 (retryable)."""

    exit_code = 5
    kind = "no-answer"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unreachable(NoAnswer):
    """No connection at all (refused, no route, no name): the network may be coming up."""


class BadAnswer(NoAnswer):
    """The server said 201 but what it sent cannot be trusted or used."""

    kind = "bad-answer"


class LocalFailure(AutoregError):
    """Something on the device failed (disk full, read-only, lock held); rolled back."""

    exit_code = 6
    kind = "local"


class PostStepFailed(AutoregError):
    """Registered, but a required post-step (fioconfig check-in, a service start) failed."""

    exit_code = 7
    kind = "post-step"
