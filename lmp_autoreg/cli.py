"""The command line: ``lmp-device-auto-register [register|status|demo] [options]``.

Parses options, calls the library, prints the result (text, or one JSON object with
``--json``) and turns errors into SPEC section 6's exit codes.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, log
from .errors import AlreadyRegistered, AutoregError, ConfigError, PostStepFailed
from .settings import BACKENDS, FIOCONFIG_MODES

LOG = logging.getLogger(__name__)
COMMANDS = ("register", "status", "demo")


class _Parser(argparse.ArgumentParser):
    """Usage errors become ConfigError (exit 2), so ``--json`` still gets its object."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=log.PROG,
        description="Register this LmP device with its factory, once. "
        "'register' is the default command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{register,status,demo}")

    reg = commands.add_parser(
        "register", help="register the device (the default)", description="Register the device."
    )
    reg.set_defaults(func=cmd_register)
    _output_options(reg)
    reg.add_argument("--sysroot", metavar="DIR", help="the device's root (default /)")
    reg.add_argument("--dry-run", action="store_true", help="show the request; send nothing")
    reg.add_argument("--force", action="store_true", help="register again, replacing the old files")
    reg.add_argument("--backend", choices=BACKENDS, help="native (default) or lmp-device-register")
    reg.add_argument("--fioconfig", choices=FIOCONFIG_MODES,
                     help="fioconfig check-in after success")
    reg.add_argument("--fioconfig-bin", metavar="PATH", help="the fioconfig binary")
    reg.add_argument("--lmp-device-register", metavar="PATH", help="the lmp-device-register binary")
    start = reg.add_mutually_exclusive_group()
    start.add_argument("--start", metavar="LIST", help="services to start after success "
                       "(default aktualizr-lite,fioconfig)")
    start.add_argument("--no-start", action="store_true", help="start no service")
    reg.add_argument("--poweroff", action="store_true", default=None,
                     help="power the device off after a success")
    reg.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="overall deadline, bounding every request (default 300)")
    reg.add_argument("--cacert", metavar="PATH", help="CA bundle for an HTTPS registration server")
    reg.add_argument("--allow-insecure-token", action="store_true",
                     help="allow sending the token over plain http to a non-loopback host")
    device = reg.add_argument_group("device settings (SPEC section 3)")
    device.add_argument("--device-api", metavar="URL", help="registration URL (DEVICE_API)")
    prod = device.add_mutually_exclusive_group()
    prod.add_argument("--production", dest="production", action="store_true", default=None,
                      help="production registration (PRODUCTION)")
    prod.add_argument("--no-production", dest="production", action="store_false")
    device.add_argument("--factory", help="factory name (DEVICE_FACTORY, LMP_FACTORY)")
    device.add_argument("--tag", help="update tag (/etc/sota/tag, LMP_FACTORY_TAG)")
    device.add_argument("--hwid", help="hardware id (HARDWARE_ID, LMP_MACHINE)")
    device.add_argument("--name", help="device name (default: the uuid; USE_HOSTNAME)")
    device.add_argument("--uuid", help="device uuid (default: random)")
    device.add_argument("--apps", metavar="A,B", help="compose apps (APPS; default: all)")
    device.add_argument("--restorable-apps", metavar="A,B", help="apps to keep for a reset")
    device.add_argument("--device-group", metavar="GROUP", help="device group (DEVICE_GROUP)")
    device.add_argument("--token-file", metavar="PATH", help="API token file (TOKEN_FILE)")
    device.add_argument("--api-token-header", metavar="NAME", help="token header (OSF-TOKEN)")
    device.add_argument("--sota-dir", metavar="DIR", help="sota dir on the device (/var/sota)")
    device.add_argument("--hsm-module", metavar="PATH", help="PKCS#11 module")
    device.add_argument("--hsm-pin", metavar="PIN", help="PKCS#11 user PIN")
    device.add_argument("--hsm-so-pin", metavar="PIN", help="PKCS#11 security officer PIN")

    stat = commands.add_parser("status", help="say whether the device is registered")
    stat.set_defaults(func=cmd_status)
    _output_options(stat)
    stat.add_argument("--sysroot", metavar="DIR", help="the device's root (default /)")
    stat.add_argument("--sota-dir", metavar="DIR", help="sota dir on the device (/var/sota)")

    demo = commands.add_parser(
        "demo", help="register a simulated device against an embedded loopback server"
    )
    demo.set_defaults(func=cmd_demo)
    _output_options(demo)
    demo.add_argument("--keep", metavar="DIR", help="build the device in DIR and keep it")
    return parser


def _output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _with_default_command(argv: list[str]) -> list[str]:
    if argv and (argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["register", *argv]


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _error_json(error: AutoregError, exit_code: int) -> dict[str, Any]:
    from .register import Result

    result = error.result if isinstance(error.result, Result) else Result(result="error")
    data = result.to_json()
    data.pop("request", None)
    if isinstance(error, AlreadyRegistered):
        data.update(result="already-registered", uuid=error.uuid, error=None)
    elif isinstance(error, PostStepFailed):  # exit 7: registered all the same
        data.update(result="registered", error={"kind": error.kind, "message": str(error)})
    else:
        data.update(result="error", error={"kind": error.kind, "message": str(error)})
    data["exit_code"] = exit_code
    return data


def cmd_register(args: argparse.Namespace) -> int:
    from .register import check_not_registered, register
    from .settings import resolve, resolve_paths

    cli = vars(args)
    if not args.force:
        check_not_registered(resolve_paths(cli, os.environ))
    settings = resolve(cli, os.environ)
    result = register(settings, dry_run=args.dry_run, force=args.force)
    if args.json:
        emit_json({**result.to_json(), "exit_code": 0, "error": None})
    elif result.result == "dry-run":
        print(json.dumps(result.request, indent=2))
    else:
        print(f"registered {result.uuid} (name {result.name}) with factory {result.factory}")
        if result.certificate:
            print(f"  certificate: {result.certificate['subject']}, "
                  f"valid until {result.certificate['not_after']}")
        print(f"  files in {settings.paths.sota}: "
              + ", ".join(f"{n} ({m})" for n, m in (result.files or {}).items()))
    if result.result == "registered" and settings.poweroff:
        from .poststeps import poweroff

        sys.stdout.flush()  # the result is out before the device goes down
        try:
            poweroff(settings)
        except PostStepFailed as e:  # the result is printed already: report, do not print again
            LOG.error("%s", e, extra=log.fields(LMP_EXIT_CODE=e.exit_code))
            return e.exit_code
    LOG.info("done: %s", "dry run" if result.result == "dry-run" else f"registered {result.uuid}",
             extra=log.fields(LMP_EXIT_CODE=0))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .settings import resolve_paths
    from .status import device_status

    status = device_status(resolve_paths(vars(args), os.environ))
    if args.json:
        emit_json(status)
    elif status["registered"]:
        print(f"registered: uuid {status['uuid']}, factory {status['factory']}, "
              f"production {'yes' if status['production'] else 'no'}, "
              f"certificate valid until {status['not_after']}")
    else:
        print("not registered" + (" (an interrupted attempt is pending)"
                                  if status["pending"] else ""))
    return 0 if status["registered"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    as_json = "--json" in args_list
    log.setup(0)
    try:
        args = build_parser().parse_args(args_list)
        log.setup(-1 if args.quiet else args.verbose)
        return int(args.func(args))
    except AutoregError as e:
        if isinstance(e, AlreadyRegistered):
            known = {"LMP_UUID": e.uuid} if e.uuid else {}
            LOG.info("%s", e, extra=log.fields(LMP_EXIT_CODE=e.exit_code, **known))
        else:
            LOG.error("%s", e, extra=log.fields(LMP_EXIT_CODE=e.exit_code))
        error = e
    except KeyboardInterrupt:
        LOG.error("interrupted")
        return 130
    except Exception as e:  # a bug: say so, with the traceback in -v
        LOG.debug("internal error", exc_info=True)
        LOG.error("internal error (a bug): %s: %s", type(e).__name__, e,
                  extra=log.fields(LMP_EXIT_CODE=1))
        error = AutoregError(f"internal error: {type(e).__name__}: {e}")
    if as_json:
        emit_json(_error_json(error, error.exit_code))
    return error.exit_code
