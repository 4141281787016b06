"""``python -m lmp_autoreg.testing serve``: the kit's registration server, standalone;
``python -m lmp_autoreg.testing line``: a rehearsed factory line through it
(:mod:`lmp_autoreg.testing.line`, docs/testing.md).

For a developer pointing a real board at a laptop, and for the boot test. It serves until
SIGINT or SIGTERM, and prints two lines a script can read, each flushed at once::

    url: http://127.0.0.1:8080/sign
    ca: /path/to/state/factory_ca.pem

With ``--oauth`` it also serves the OAuth device authorization endpoints under ``/oauth``
(docs/testing.md): it prints ``oauth: URL`` (the agent's ``--oauth-url``, or
lmp-device-register's ``OAUTH_BASE``), then a line for each code a device asks for,
``user code: CODE (approve: POST URL/activate with user_code=CODE)``, and a person approves
it with, for one, ``curl -d user_code=CODE URL/activate``.

With ``--state-dir`` the factory CA (root and intermediate, keys 0600) is kept in that
directory, so a board registered against one run still trusts the next. Each request is
logged on stderr. With ``--gateway`` it also serves a device gateway (``GET``/``PATCH
/config`` for fioconfig, requiring the devices' client certificates), named in the
``sota.toml`` of every registration, and prints a line ``gateway: URL``;
``--config-dir DIR`` gives every device the files of DIR (encrypted to its key), and the
devices the devices API holds in group G the files of ``DIR/groups/G/`` too.

With ``--devices-api`` it also serves the Foundries devices API under ``/ota/devices/``,
requiring the token of ``--api-token`` or ``--api-token-file``, and prints ``api: URL``; it
keeps the devices in the state directory. ``--partially-detached`` makes ``/sign`` create
each device in that API (or in the one at ``--upstream-api``) in ``--device-group``
before it answers, as factory-registration-ref does with an API token.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

LOG = logging.getLogger(__name__)


def _read_token(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.readline().strip()


def serve(args: argparse.Namespace) -> int:
    from lmp_autoreg.testing.configdir import serve_config
    from lmp_autoreg.testing.gateway import DeviceGateway
    from lmp_autoreg.testing.server import RegistrationServer

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    token = _read_token(args.token_file) if args.token_file else args.token
    api_token = _read_token(args.api_token_file) if args.api_token_file else args.api_token
    own_api = args.devices_api or (args.partially_detached and not args.upstream_api)
    if (own_api or args.partially_detached) and not api_token:
        LOG.error("the devices API needs --api-token or --api-token-file")
        return 2
    oauth = None
    if args.oauth:
        from lmp_autoreg.testing.oauth import DeviceCode, OAuthAuthority

        def announce(code: DeviceCode, activate: str) -> None:
            print(f"user code: {code.user_code} (device {code.client_id}; approve: POST "
                  f"{activate} with user_code={code.user_code})", flush=True)

        oauth = OAuthAuthority(factory=args.factory, interval=args.oauth_interval,
                               on_code=announce)
    with tempfile.TemporaryDirectory(prefix="lmp-autoreg-serve-") as scratch:
        server = RegistrationServer(
            tls=args.tls,
            factory=args.factory,
            token=token,
            accept_group=args.accept_group,
            host=args.host,
            port=args.port,
            state_dir=Path(args.state_dir) if args.state_dir else Path(scratch) / "ca",
            tls_names=args.tls_name,
            oauth=oauth,
            gateway=DeviceGateway if args.gateway else None,
            gateway_port=args.gateway_port,
            devices_api=args.devices_api,
            api_token=api_token,
            partially_detached=args.partially_detached,
            device_group=args.device_group,
            upstream_api=args.upstream_api,
        )
        try:
            server.start()
        except OSError as error:
            server.stop()
            LOG.error("cannot listen on %s port %d: %s", args.host, args.port, error)
            return 1
        try:
            print(f"url: {server.url}", flush=True)
            print(f"ca: {server.ca_file}", flush=True)
            if oauth is not None:
                print(f"oauth: {server.url[:-len(server.path)]}/oauth", flush=True)
            if server.devices_api is not None:
                print(f"api: {server.api_url}", flush=True)
            if isinstance(server.gateway, DeviceGateway):
                if args.config_dir:
                    serve_config(server.gateway, Path(args.config_dir))
                print(f"gateway: {server.gateway.url}", flush=True)
            stop.wait()
            LOG.info("stopping")
        finally:
            server.stop()
    return 0


def line(args: argparse.Namespace) -> int:
    from lmp_autoreg.testing import chaos
    from lmp_autoreg.testing.line import Line, LineOptions

    try:
        kinds = chaos.parse(args.chaos)
        options = LineOptions(
            out=Path(args.out or time.strftime("line-%Y%m%d-%H%M%S")), devices=args.devices,
            parallel=args.parallel, device_api=args.device_api,
            cacert=Path(args.cacert) if args.cacert else None, factory=args.factory,
            partially_detached=args.partially_detached, group=args.group,
            config_dir=Path(args.config_dir) if args.config_dir else None, chaos=kinds,
            seed=args.seed)
        runner = Line(options)
    except ValueError as error:
        LOG.error("%s", error)
        return 2
    summary = runner.run()
    print(f"{summary['registered']} of {summary['devices']} registered, "
          f"{len(summary['operator'])} for an operator, {len(summary['duplicates'])} "
          f"duplicates, {len(summary['ghosts'])} ghosts; {summary['devices_per_minute']} "
          f"devices a minute; record and pictures in {options.out}", flush=True)
    for problem in summary["problems"]:
        print(f"problem: {problem}", flush=True)
    return 0 if summary["passed"] else 1


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m lmp_autoreg.testing",
        description="The lmp-autoreg test kit's registration server.",
    )
    commands = top.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "serve",
        help="serve registrations until interrupted",
        description="Serve device registrations like factory-registration-ref until "
        "SIGINT or SIGTERM. Prints 'url: URL' and 'ca: FILE' on stdout.",
    )
    cmd.add_argument("--port", type=int, required=True, help="port to listen on (0: any)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to listen on")
    cmd.add_argument("--factory", default="acme", help="the factory CSRs must name (OU)")
    secret = cmd.add_mutually_exclusive_group()
    secret.add_argument("--token", help="require this OSF-TOKEN (a test token: argv is public)")
    secret.add_argument("--token-file", help="require the token on the first line of FILE")
    cmd.add_argument("--tls", action="store_true", help="serve HTTPS with a certificate of the CA")
    cmd.add_argument(
        "--tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name or address for the HTTPS certificate (repeatable)",
    )
    cmd.add_argument(
        "--accept-group", action="store_true", help="accept 'group' as the Foundries API does"
    )
    cmd.add_argument(
        "--state-dir", help="keep the CA here across runs (default: a temporary directory)"
    )
    cmd.add_argument(
        "--oauth", action="store_true",
        help="also serve OAuth device authorization under /oauth; print each user code, "
        "approved by POST /oauth/activate with user_code=CODE",
    )
    cmd.add_argument(
        "--oauth-interval", type=float, default=5, metavar="SECONDS",
        help="the polling interval the OAuth endpoints ask for (default 5)",
    )
    cmd.add_argument(
        "--gateway",
        action="store_true",
        help="also serve a device gateway (/config for fioconfig) on another port, named "
        "in the sota.toml of each registration",
    )
    cmd.add_argument(
        "--gateway-port", type=int, default=0, help="the gateway's port (default: any)"
    )
    cmd.add_argument(
        "--config-dir",
        metavar="DIR",
        help="with --gateway: the configuration files every device gets (encrypted); those "
        "of DIR/groups/G/ go to the devices of group G too",
    )
    cmd.add_argument(
        "--devices-api", action="store_true",
        help="also serve the Foundries devices API under /ota/devices/ (prints 'api: URL')",
    )
    api_secret = cmd.add_mutually_exclusive_group()
    api_secret.add_argument(
        "--api-token", help="the devices API's OSF-TOKEN (a test token: argv is public)")
    api_secret.add_argument(
        "--api-token-file", help="the devices API's OSF-TOKEN, on the first line of FILE")
    cmd.add_argument(
        "--partially-detached", action="store_true",
        help="create each device in the devices API before answering /sign, as "
        "factory-registration-ref does with an API token",
    )
    cmd.add_argument(
        "--device-group", metavar="G", help="the device group /sign creates devices in")
    cmd.add_argument(
        "--upstream-api", metavar="URL",
        help="with --partially-detached: create the devices in this API, not the kit's own",
    )
    cmd.set_defaults(func=serve)
    _line_parser(commands)
    return top


def _line_parser(commands: Any) -> None:
    cmd = commands.add_parser(
        "line",
        help="rehearse a factory line: many devices through one registration server",
        description="Run DEVICES simulated boards (real agent processes on FakeDevice roots, "
        "each with its own board serial) through one registration server, with chaos, and "
        "write the manufacturing record (record.csv, record.jsonl), summary.json and the "
        "pictures (line.svg, line.png). Exit 0 when every board ended with one identity "
        "and the result the chaos predicts, 1 otherwise.",
    )
    cmd.add_argument("--devices", type=int, default=50, metavar="N", help="default 50")
    cmd.add_argument("--parallel", type=int, default=os.cpu_count() or 1, metavar="K",
                     help="devices at a time (default: the machine's cores)")
    cmd.add_argument("--device-api", metavar="URL",
                     help="another registration server (default: the kit's own, over TLS, "
                     "with its gateway)")
    cmd.add_argument("--cacert", metavar="F", help="the CA of --device-api's HTTPS")
    cmd.add_argument("--factory", metavar="F", help="the devices' LMP_FACTORY (default: "
                     "the kit's, acme)")
    cmd.add_argument("--partially-detached", action="store_true",
                     help="the kit's server creates each device in its devices API")
    cmd.add_argument("--group", metavar="G", help="the device group the kit's server uses")
    cmd.add_argument("--config-dir", metavar="DIR", help="the kit's gateway's configuration "
                     "files (DIR/groups/G/ for group G)")
    cmd.add_argument("--chaos", metavar="LIST",
                     help="faults in the kit's server: restart,lost-answer,5xx,slow")
    cmd.add_argument("--out", metavar="DIR", help="default ./line-<timestamp>")
    cmd.add_argument("--seed", type=int, default=0, metavar="S")
    cmd.set_defaults(func=line)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
