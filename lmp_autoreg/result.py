"""The record of one run, ``Result``: what was done, in the shape of docs/spec.md section 6's JSON
object.

It is filled in by ``register`` and the modules it calls (``attempt``, ``backend_ldr``,
``poststeps``) and shown by ``output``. Nothing here imports more than ``__future__``: the
already-registered answer takes its keys from ``Result`` on the cheapest path there is.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (about 4 ms)
if TYPE_CHECKING:
    from typing import Any


class Result:
    """What happened. A plain class rather than a dataclass (``dataclasses`` costs about
    1 MiB, which a run that never touches a key does without); the annotated names are the
    JSON keys, in order."""

    result: str = ""
    uuid: str | None = None
    name: str | None = None
    factory: str | None = None
    hardware_id: str | None = None
    board: dict[str, str] | None = None  # {"serial", "source"}: the board's own serial
    tag: str | None = None
    apps: list[str] | None = None
    production: bool | None = None
    device_api: str | None = None
    backend: str | None = None
    sota_dir: str | None = None
    files: dict[str, str] | None = None  # name -> octal mode
    certificate: dict[str, str] | None = None
    fioconfig: str | None = None
    services: dict[str, str] | None = None
    request: dict[str, Any] | None = None  # dry-run only
    oauth: dict[str, Any] | None = None  # only when the OAuth device flow ran (or would)

    def __init__(self, **fields: Any) -> None:
        for name, value in fields.items():
            if name not in Result.__annotations__:
                raise TypeError(f"Result has no field {name!r}")
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in Result.__annotations__}
        for optional in OPTIONAL:
            if data[optional] is None:
                del data[optional]
        return data


# Keys only some results have: a dry run's "request", the OAuth device flow's "oauth".
OPTIONAL = ("request", "oauth")
# The keys of every JSON result.
KEYS = tuple(name for name in Result.__annotations__ if name not in OPTIONAL)
