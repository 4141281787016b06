"""The command line: ``lmp-device-auto-register [register|status|demo] [options]``.

Parses options, calls the library, prints the result through ``output`` (text, or one
JSON object with ``--json``) and turns errors into docs/spec.md section 6's exit codes.

Most starts end early (``--help``, a device registered already), so this module imports
only ``argparse`` and the small ``guard`` up front; ``logging``, ``json`` and the library
are imported when a command gets that far (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import BACKENDS, FIOCONFIG_MODES, PROG, __version__, guard, output
from .errors import AlreadyRegistered, AutoregError, ConfigError, PostStepFailed

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (about 4 ms)
if TYPE_CHECKING:
    import logging
    from typing import Any, NoReturn

COMMANDS = ("register", "status", "demo")


class _NoColour:
    """An argparse colour theme whose every escape sequence is empty."""

    def __getattr__(self, name: str) -> str:
        return ""


class _PlainFormatter(argparse.HelpFormatter):
    """argparse's formatter, without colour.

    From Python 3.14 every formatter argparse makes (at least one per parser, to check each
    option it adds) looks up its colour theme in ``_colorize``, which imports
    ``dataclasses``, ``inspect`` and ``ast``: more than argparse itself costs, at every
    start. The agent's help is plain text on any terminal, so its theme is ``_NoColour``.
    Earlier Pythons never call ``_set_color``.
    """

    def _set_color(self, color: bool) -> None:
        self._theme = _NoColour()
        self._decolor = str


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter, told the width instead of asking ``shutil``.

    argparse makes a formatter for every option it adds; left alone, each one imports
    ``shutil`` to measure the terminal, 2 ms of every start. The width is found the same way
    (``$COLUMNS``, else the terminal, else 80), less the two columns argparse keeps spare.
    """
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size().columns  # of stdout
        except OSError:
            columns = 80
    return _PlainFormatter(prog, width=columns - 2)


class _Parser(argparse.ArgumentParser):
    """Usage errors become ConfigError (exit 2), so ``--json`` still gets its object.

    Options must be typed whole: argparse's abbreviations would let ``--prod`` mean
    ``--production``, and a flag with consequences is not to be guessed.
    """

    def __init__(self, **kwargs: Any) -> None:
        # Sub-commands' parsers are made by this class too, so they get the same.
        kwargs.setdefault("formatter_class", _help_formatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
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
    power = reg.add_mutually_exclusive_group()
    power.add_argument("--poweroff", action="store_true", default=None,
                       help="power the device off after a success")
    power.add_argument("--no-poweroff", dest="poweroff", action="store_false", default=None,
                       help="do not power off (beats POWEROFF)")
    reg.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="overall deadline, bounding every request (default 300)")
    reg.add_argument("--cacert", metavar="PATH", help="CA bundle for an HTTPS registration server")
    reg.add_argument("--allow-insecure-token", action="store_true",
                     help="allow sending the token over plain http to a non-loopback host")
    device = reg.add_argument_group("device settings (docs/spec.md section 3)")
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
    device.add_argument("--restorable-apps", metavar="A,B", help="apps to keep for a reset "
                        "(default: all apps; \"\" turns restorable apps off)")
    device.add_argument("--device-group", metavar="GROUP", help="device group (DEVICE_GROUP)")
    device.add_argument("--token-file", metavar="PATH",
                        help="API token file (TOKEN_FILE); -: standard input")
    device.add_argument("--oauth", action="store_true",
                        help="no API token: register by hand, a person approving the device "
                        "in a browser (OAuth device authorization; automatic on a terminal)")
    device.add_argument("--oauth-url", metavar="URL",
                        help="OAuth endpoints (OAUTH_BASE; https://app.foundries.io/oauth)")
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
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only the OAuth prompt, warnings and errors")


def _with_default_command(argv: list[str]) -> list[str]:
    """``argv`` with its command: ``register`` when it starts with an option (or is empty).

    A first word that is not a command is refused (``ConfigError``), with the closest
    command suggested: ``regster --force`` must not read as ``register`` with a stray word.
    """
    if not argv:
        return ["register"]
    if argv[0] in (*COMMANDS, "-h", "--help", "--version"):
        return argv
    if not argv[0].startswith("-"):
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown command {argv[0]!r}: {hint}the commands are "
                          f"{', '.join(COMMANDS)} (see '{PROG} --help')")
    return ["register", *argv]


def logger(verbosity: int) -> logging.Logger:
    """Set up logging (see ``log``) and return this module's logger.

    Called once a command gets past the early ends: ``logging`` alone costs about 8 ms.
    """
    import logging

    from . import log

    log.setup(verbosity)
    return logging.getLogger(__name__)


def _verbosity(args: argparse.Namespace) -> int:
    return -1 if args.quiet else int(args.verbose)


def cmd_register(args: argparse.Namespace) -> int:
    cli = vars(args)
    if not args.force:
        sysroot, sota = guard.locate(cli, os.environ)
        guard.check_not_registered(guard.host_path(sysroot, sota), sota)
    logs = logger(_verbosity(args))
    from . import log
    from .register import board_note, register
    from .settings import resolve

    # A person at a terminal can approve an OAuth device authorization (docs/spec.md
    # section 9); under the unit stdin is /dev/null, and nobody is there to.
    settings = resolve(cli, os.environ, terminal=sys.stdin.isatty() and sys.stderr.isatty())
    result = register(settings, dry_run=args.dry_run, force=args.force)
    output.show_register(result, settings.paths.sota, as_json=args.json)
    done = "dry run" if result.result == "dry-run" else f"registered {result.uuid}"
    logs.info("done: %s%s", done, board_note(result), extra=log.fields(LMP_EXIT_CODE=0))
    if (result.services or {}).get("poweroff") == "requested":
        return _power_off(logs)
    return 0


def _power_off(logs: logging.Logger) -> int:
    """The last act: the shutdown stops this unit at once, so the result and the last log
    line are flushed first; a refused poweroff still gets its own line, and exit 7."""
    import logging

    from . import log
    from .poststeps import power_off

    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if power_off():
        return 0
    logs.error("registered, but the poweroff was refused", extra=log.fields(LMP_EXIT_CODE=7))
    return PostStepFailed.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from .settings import resolve_paths
    from .status import device_status

    status = device_status(resolve_paths(vars(args), os.environ))
    output.show_status(status, as_json=args.json)
    return 0 if status["registered"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    logger(_verbosity(args))
    from .demo import run_demo

    return run_demo(keep=args.keep, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args_list
    verbosity = 0
    error: AutoregError
    try:
        args = build_parser().parse_args(_with_default_command(args_list))
        verbosity = _verbosity(args)
        return int(args.func(args))
    except AlreadyRegistered as e:
        if os.environ.get("JOURNAL_STREAM") or os.environ.get("NOTIFY_SOCKET"):
            # Under systemd the journal entry carries fields: that needs logging.
            from . import log

            known = {"LMP_UUID": e.uuid} if e.uuid else {}
            logger(verbosity).info("%s", e, extra=log.fields(LMP_EXIT_CODE=e.exit_code, **known))
        elif verbosity >= 0:
            # An early end: the line the log handler would write, without loading logging.
            print(f"{PROG}: {e}", file=sys.stderr)
        error = e
    except AutoregError as e:
        from . import log

        logger(verbosity).error("%s", e, extra=log.fields(LMP_EXIT_CODE=e.exit_code))
        error = e
    except KeyboardInterrupt:
        logger(verbosity).error("interrupted")
        return 130
    except Exception as e:  # a bug: say so, with the traceback in -v
        from . import log

        bug = logger(verbosity)
        bug.debug("internal error", exc_info=True)
        bug.error("internal error (a bug): %s: %s", type(e).__name__, e,
                  extra=log.fields(LMP_EXIT_CODE=1))
        error = AutoregError(f"internal error: {type(e).__name__}: {e}")
    if as_json:
        output.emit_json(output.error_json(error, error.exit_code))
    return error.exit_code


def run() -> NoReturn:
    """The program (the console script and ``python -m lmp_autoreg``): ``main``, then exit.

    Python's own shutdown frees every module and object one by one: about 20 ms here, 15 %
    of a registration, for a process that ends anyway (docs/performance.md). So once the
    output is flushed and logging is shut down, the process ends with ``os._exit``. Nothing
    is lost: the agent closes (and fsyncs) every file it writes before ``main`` returns,
    and leaves no thread running.
    """
    try:
        code = main()
    except SystemExit as e:  # --help and --version end through argparse's exit
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    if "logging" in sys.modules:  # loaded only when a command got that far
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: say so in the status, as Python does
            code = code or 120
    os._exit(code)
