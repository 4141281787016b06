"""The early ends of the agent load only what they use (docs/performance.md).

Each probe runs the CLI's ``main`` in a fresh interpreter and records ``sys.modules``.
The interpreter runs with ``-S`` and the checkout plus site-packages on ``PYTHONPATH``, as
an installed package has it: an editable install's import hook (a ``.pth`` file) would
otherwise load ``pathlib`` and ``re`` into every interpreter before our code runs.
Nothing here is timed; ``make bench-check`` measures.

What the interpreter loads by itself differs between Pythons (argparse on 3.14 imports
``dataclasses`` and ``inspect`` for its colours), and so does what the libraries load. So the
third-party stacks the agent must not load are checked outright, and the standard library's
heavy modules only beyond a floor: what the same interpreter loads for argparse alone
(``ARGPARSE_FLOOR``), or, for a registration, for argparse and the libraries a registration
uses (``LIBRARY_FLOOR``), each measured by a probe of its own.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from cryptography.x509.oid import NameOID

from lmp_autoreg import identity

from conftest import clean_env, device_args, run_cli

REPO = Path(__file__).resolve().parent.parent
# Never on an early end: the network and crypto stacks...
NETWORK_AND_CRYPTO = ("requests", "urllib3", "http.client", "ssl", "cryptography", "pkcs11")
# ...nor what the guard was written to do without (each costs milliseconds of start-up),
# beyond what argparse loads by itself.
STDLIB_UNUSED = (
    "logging", "pathlib", "dataclasses", "typing", "tomllib", "uuid", "subprocess", "shutil",
)
# ...nor argparse's colours (Python 3.14's argparse imports them for every parser, and with
# them dataclasses, inspect and ast; cli._PlainFormatter does without).
ARGPARSE_COLOUR = ("_colorize",)
# A registration that runs no command: none of these beyond what its libraries load.
STDLIB_HEAVY = ("subprocess", "uuid", "dataclasses", "inspect")

# Python's own part of the early ends: a command line parsed and help formatted as the CLI
# does (subcommands, a formatter told the width).
ARGPARSE_FLOOR = """
import argparse
def formatter(prog):
    return argparse.HelpFormatter(prog, width=78)
parser = argparse.ArgumentParser(prog="p", formatter_class=formatter)
parser.add_argument("--flag", action="store_true")
commands = parser.add_subparsers(dest="command")
commands.add_parser("register", formatter_class=formatter).add_argument("--sysroot")
parser.parse_args(["register", "--sysroot", "/"])
parser.format_help()
code = 0
"""
# ...and of a registration: that, and the libraries it uses (HTTP, X.509, the key's encoding).
LIBRARY_FLOOR = ARGPARSE_FLOOR + """
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
"""
AGENT = """
from lmp_autoreg.cli import main
try:
    code = main(sys.argv[3:])
except SystemExit as e:  # --help and --version end through argparse's exit
    code = e.code
"""
# Runs one of the above (which sets ``code``), then records the code and sys.modules.
PROBE = """
import sys
exec(sys.argv[1])
sys.stdout.flush()
with open(sys.argv[2], "w") as f:
    f.write("\\n".join([str(code), *sorted(sys.modules)]))
"""


def run_probe(tmp_path: Path, source: str, *args: str) -> tuple[int, set[str], str, str]:
    """(exit code, modules loaded, stdout, stderr) of ``source`` in a fresh interpreter."""
    record = tmp_path / "modules.txt"
    paths = [str(REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = clean_env(PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, source, str(record), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    code, *modules = record.read_text().splitlines()
    return int(code), set(modules), proc.stdout, proc.stderr


def probe(tmp_path: Path, *args: str) -> tuple[int, set[str], str, str]:
    """The same of the CLI's ``main(args)``."""
    return run_probe(tmp_path, AGENT, *args)


@pytest.fixture(scope="module")
def floors(tmp_path_factory) -> dict[str, set[str]]:
    """The modules this interpreter loads for ARGPARSE_FLOOR and for LIBRARY_FLOOR."""
    work = tmp_path_factory.mktemp("floors")
    return {name: run_probe(work, source)[1]
            for name, source in (("argparse", ARGPARSE_FLOOR), ("library", LIBRARY_FLOOR))}


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m in names or m.startswith(tuple(n + "." for n in names)))


@pytest.fixture
def registered(device_root, registration_server):
    run = run_cli(*device_args(device_root, registration_server, "--json"))
    assert run.returncode == 0, run.stderr
    return device_root, registration_server, run.json["uuid"]


def test_the_probe_sees_what_a_registration_loads(tmp_path, device_root, registration_server):
    """The probe is able to fail: a real registration loads every one of these."""
    code, modules, _, _ = probe(tmp_path, *device_args(device_root, registration_server))
    assert code == 0
    assert loaded(modules, NETWORK_AND_CRYPTO) and "logging" in modules
    assert {"requests", "cryptography", "ssl", "http.client"} <= modules


def test_registration_without_post_steps_loads_no_heavy_stdlib(tmp_path, floors, device_root,
                                                               registration_server):
    """Memory is the tightest budget (docs/performance.md): a registration that runs no
    command adds none of these to what its libraries load (``subprocess`` is for commands,
    ``uuid`` imports ``platform``), and without an HSM it loads no PKCS#11. (The key's PEM is
    cryptography's ``serialization`` package's, which the library floor includes.)"""
    code, modules, _, _ = probe(tmp_path, *device_args(device_root, registration_server))
    assert code == 0
    assert loaded(modules, ("pkcs11",)) == []
    assert loaded(modules - floors["library"], STDLIB_HEAVY) == []


def test_the_floors_leave_something_to_check(floors):
    """The floors keep the costliest modules in the checks above (on 3.14, argparse loads
    ``dataclasses`` by itself, so that one is off the early ends' list there)."""
    assert loaded(floors["argparse"], (*NETWORK_AND_CRYPTO, "logging", "subprocess", "json")) == []
    assert loaded(floors["library"], ("pkcs11", "subprocess", "uuid")) == []


@pytest.mark.parametrize("output", [(), ("--json",)])
def test_already_registered_loads_neither_network_nor_crypto(tmp_path, floors, registered,
                                                            output):
    device, server, uuid = registered
    code, modules, stdout, stderr = probe(tmp_path, *device_args(device, server, *output))
    assert code == 3
    assert loaded(modules, (*NETWORK_AND_CRYPTO, *ARGPARSE_COLOUR)) == []
    assert loaded(modules - floors["argparse"], STDLIB_UNUSED) == []
    assert ("json" in modules) is bool(output)
    # ...and still reports the uuid read from client.pem.
    assert f"uuid {uuid}" in stderr
    if output:
        assert json.loads(stdout)["uuid"] == uuid


@pytest.mark.parametrize("args", [("--help",), ("register", "--help"), ("status", "--help"),
                                  ("--version",)])
def test_help_loads_nothing_it_does_not_use(tmp_path, floors, args):
    code, modules, stdout, _ = probe(tmp_path, *args)
    assert code == 0 and stdout
    assert loaded(modules, (*NETWORK_AND_CRYPTO, *ARGPARSE_COLOUR)) == []
    assert loaded(modules - floors["argparse"], (*STDLIB_UNUSED, "json")) == []


def test_status_reads_the_certificate_without_cryptography(tmp_path, registered):
    device, _, uuid = registered
    code, modules, stdout, _ = probe(tmp_path, "status", "--sysroot", str(device.root), "--json")
    assert code == 0
    assert loaded(modules, NETWORK_AND_CRYPTO) == []
    status = json.loads(stdout)
    cert = identity.load_certificate((device.sota / "client.pem").read_bytes())
    [ou] = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    production = any(a.value == "production"
                     for a in cert.subject.get_attributes_for_oid(NameOID.BUSINESS_CATEGORY))
    assert (status["uuid"], status["factory"], status["production"], status["not_after"]) == (
        uuid, ou.value, production, identity.summary(cert)["not_after"]
    )


def test_already_registered_message_and_quiet(registered):
    device, server, uuid = registered
    run = run_cli(*device_args(device, server))
    assert run.returncode == 3 and run.stdout == ""
    assert run.stderr == (
        f"lmp-device-auto-register: already registered ({device.sota}, uuid {uuid}): "
        "nothing to do; --force registers again\n"
    )
    run = run_cli(*device_args(device, server, "-q"))
    assert run.returncode == 3 and run.stderr == ""


def test_already_registered_json_has_the_keys_of_every_result(registered):
    """The early end's object (made without ``register``) has the keys of a failure's."""
    device, server, _ = registered
    already = run_cli(*device_args(device, server, "--json")).json
    failed = run_cli(*device_args(device, server, "--json", "--force", "--factory", "lmp")).json
    assert failed["result"] == "error"
    assert list(already) == list(failed)
