"""``demo``: a whole registration of a simulated device, with nothing but this machine.

Starts the test kit's HTTPS registration server (a throwaway CA) on 127.0.0.1, lays out a
simulated device in a temporary directory, registers it in production mode through the
same code path a device uses, and shows the result.
"""

import logging
import tempfile
from pathlib import Path
from typing import Any

from .register import register
from .settings import resolve

LOG = logging.getLogger(__name__)
DEMO_FACTORY = "demo-factory"


def run_demo(*, keep: str | None, as_json: bool) -> int:
    from .cli import emit_json
    from .testing.device import FakeDevice
    from .testing.server import RegistrationServer

    with tempfile.TemporaryDirectory(prefix="lmp-autoreg-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp) / "device"
        device = FakeDevice(root, factory=DEMO_FACTORY, token=None, apps=("fiotest", "shellhttpd"))
        device.build()
        with RegistrationServer(tls=True, factory=DEMO_FACTORY) as server:
            settings = resolve(
                {
                    "sysroot": str(root),
                    "device_api": server.url,
                    "production": True,
                    "cacert": str(server.ca_file),
                    "fioconfig": "off",
                    "no_start": True,
                    "timeout": 30,
                },
                {},
            )
            LOG.info("demo server at %s, device root %s", server.url, root)
            result = register(settings)
        assert result.certificate is not None
        summary: dict[str, Any] = {
            **result.to_json(),
            "exit_code": 0,
            "error": None,
            "device_root": str(root) if keep else None,
            "issuer": result.certificate["issuer"],
        }
        if as_json:
            emit_json(summary)
        else:
            _show(summary, device.sota)
    return 0


def _show(summary: dict[str, Any], sota: Path) -> None:
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
        if summary["device_root"]
        else "  files (removed with the demo; --keep DIR keeps them):",
    ]
    lines += [f"    {mode}  {name}" for name, mode in (summary["files"] or {}).items()]
    if summary["device_root"]:
        lines.append(f"  kept the device in {summary['device_root']}")
    print("\n".join(lines))
