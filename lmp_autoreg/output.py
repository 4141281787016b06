"""What the commands print on stdout: one JSON object with ``--json``, else a few lines.

``cli`` (``register``, ``status``, every error) and ``demo`` print through here, and
nothing else writes to stdout. ``json`` is imported only when JSON is printed, and the
error object of an already-registered device needs only the light ``result`` module: the
early ends stay cheap (docs/performance.md).
"""

from __future__ import annotations

import sys

from .errors import AlreadyRegistered, AutoregError, PostStepFailed

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (about 4 ms)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from .result import Result


def emit_json(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def success_json(result: Result) -> dict[str, Any]:
    """The JSON object of a run that succeeded (exit 0)."""
    return {**result.to_json(), "exit_code": 0, "error": None}


def error_json(error: AutoregError, exit_code: int) -> dict[str, Any]:
    """The JSON object of a run that failed: what was known, the error and the exit code."""
    from .result import KEYS, Result

    if isinstance(error, AlreadyRegistered):
        data: dict[str, Any] = dict.fromkeys(KEYS)
        data.update(result="already-registered", uuid=error.uuid, sota_dir=error.sota_dir,
                    error=None)
    else:
        result = error.result if isinstance(error.result, Result) else Result(result="error")
        data = result.to_json()
        data.pop("request", None)
        outcome = "registered" if isinstance(error, PostStepFailed) else "error"  # exit 7
        data.update(result=outcome, error={"kind": error.kind, "message": str(error),
                                           "remedy": error.remedy})
    data["exit_code"] = exit_code
    return data


def show_register(result: Result, sota: Path, *, as_json: bool) -> None:
    """A registration's outcome; a dry run shows its request. ``sota``: the host path."""
    if as_json:
        emit_json(success_json(result))
        return
    if result.result == "dry-run":
        emit_json(result.request)
        return
    print(f"registered {result.uuid} (name {result.name}) with factory {result.factory}")
    if result.certificate:
        print(f"  certificate: {result.certificate['subject']}, "
              f"valid until {result.certificate['not_after']}")
    print(f"  files in {sota}: "
          + ", ".join(f"{n} ({m})" for n, m in (result.files or {}).items()))


def show_status(status: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        emit_json(status)
        return
    board = status["board"]
    if status["registered"]:
        print(f"registered: uuid {status['uuid']}, factory {status['factory']}, "
              f"production {'yes' if status['production'] else 'no'}, "
              f"certificate valid until {status['not_after']}")
    else:
        print("not registered" + (" (an interrupted attempt is pending)"
                                  if status["pending"] else ""))
    if board:
        print(f"board serial: {board['serial']} (from {board['source']})")


def show_demo(
    result: Result,
    sota: Path,
    *,
    kept: Path | None,
    as_json: bool,
    config: tuple[Path | None, dict[str, str]] = (None, {}),
) -> None:
    """The demo's registration, with the issuer of its certificate and where the device is
    (``kept``: None when it is removed with the demo), and the configuration files its
    check-in received (``config``: their directory, if kept, and name -> mode)."""
    assert result.certificate is not None
    summary: dict[str, Any] = {
        **success_json(result),
        "device_root": str(kept) if kept else None,
        "issuer": result.certificate["issuer"],
        "config_files": config[1],
    }
    if as_json:
        emit_json(summary)
        return
    lines = [
        "Registered a simulated device against an embedded loopback server.",
        f"  uuid:        {summary['uuid']}",
        f"  name:        {summary['name']}",
        f"  factory:     {summary['factory']} (production: {summary['production']})",
        f"  apps:        {', '.join(summary['apps'] or []) or 'all'}",
        f"  subject:     {summary['certificate']['subject']}",
        f"  issuer:      {summary['issuer']}",
        f"  valid until: {summary['certificate']['not_after']}",
        f"  files in {sota}:"
        if kept
        else "  files (removed with the demo; --keep DIR keeps them):",
    ]
    lines += [f"    {mode}  {name}" for name, mode in (summary["files"] or {}).items()]
    where = f" in {config[0]}" if config[0] else ""
    lines.append(f"  check-in with the device gateway: {result.fioconfig}; "
                 f"configuration files{where}:")
    lines += [f"    {mode}  {name}" for name, mode in config[1].items()]
    if kept:
        lines.append(f"  kept the device in {kept}")
    print("\n".join(lines))
