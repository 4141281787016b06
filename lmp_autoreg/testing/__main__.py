"""``python -m lmp_autoreg.testing serve``: the kit's registration server, standalone.

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
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmp_autoreg.testing.gateway import DeviceGateway

LOG = logging.getLogger(__name__)


def _read_token(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.readline().strip()


GROUPS = "groups"


def _config_files(directory: Path, skip: Path | None = None) -> dict[str, str]:
    """The files of ``directory`` (and below it, but not below ``skip``) by relative name."""
    return {
        str(path.relative_to(directory)): path.read_text(encoding="utf-8")
        for path in sorted(directory.rglob("*"))
        if path.is_file() and (skip is None or not path.is_relative_to(skip))
    }


def _serve_config(gateway: DeviceGateway, directory: Path) -> None:
    """Every device gets the files of ``directory`` but ``groups/``; the devices of group G
    those of ``groups/G/`` too."""
    groups = directory / GROUPS
    gateway.set_config(None, _config_files(directory, skip=groups))
    if groups.is_dir():
        for group in sorted(p for p in groups.iterdir() if p.is_dir()):
            gateway.set_group_config(group.name, _config_files(group))


def serve(args: argparse.Namespace) -> int:
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
                    _serve_config(server.gateway, Path(args.config_dir))
                print(f"gateway: {server.gateway.url}", flush=True)
            stop.wait()
            LOG.info("stopping")
        finally:
            server.stop()
    return 0


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
    return top


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
