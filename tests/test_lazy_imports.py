"""The early ends of the agent load only what they use (docs/performance.md).

Each probe runs the CLI's ``main`` in a fresh interpreter and records ``sys.modules``.
The interpreter runs with ``-S`` and the checkout plus site-packages on ``PYTHONPATH``, as
an installed package has it: an editable install's import hook (a ``.pth`` file) would
otherwise load ``pathlib`` and ``re`` into every interpreter before our code runs.
Nothing here is timed; ``make bench-check`` measures.
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
# ...nor what the guard was written to do without (each costs milliseconds of start-up).
STDLIB_UNUSED = (
    "logging", "pathlib", "dataclasses", "typing", "tomllib", "uuid", "subprocess", "shutil",
)

PROBE = """
import sys
from lmp_autoreg.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as e:  # --help and --version end through argparse's exit
    code = e.code
sys.stdout.flush()
with open(sys.argv[1], "w") as f:
    f.write("\\n".join([str(code), *sorted(sys.modules)]))
"""


def probe(tmp_path: Path, *args: str) -> tuple[int, set[str], str, str]:
    """(exit code, modules loaded, stdout, stderr) of ``main(args)`` in a fresh interpreter."""
    record = tmp_path / "modules.txt"
    paths = [str(REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = clean_env(PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, str(record), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    code, *modules = record.read_text().splitlines()
    return int(code), set(modules), proc.stdout, proc.stderr


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


def test_registration_without_post_steps_loads_no_heavy_stdlib(tmp_path, device_root,
                                                               registration_server):
    """Memory is the tightest budget (docs/performance.md): a registration that runs no
    command does without ``subprocess``, and a file key without python-pkcs11. (The key's
    PEM is cryptography's ``serialization`` package's, with the ``dataclasses`` it brings.)"""
    code, modules, _, _ = probe(tmp_path, *device_args(device_root, registration_server))
    assert code == 0
    heavy = ("subprocess", "uuid", "pkcs11")
    assert loaded(modules, heavy) == []


@pytest.mark.parametrize("output", [(), ("--json",)])
def test_already_registered_loads_neither_network_nor_crypto(tmp_path, registered, output):
    device, server, uuid = registered
    code, modules, stdout, stderr = probe(tmp_path, *device_args(device, server, *output))
    assert code == 3
    assert loaded(modules, NETWORK_AND_CRYPTO) == []
    assert loaded(modules, STDLIB_UNUSED) == []
    assert ("json" in modules) is bool(output)
    # ...and still reports the uuid read from client.pem.
    assert f"uuid {uuid}" in stderr
    if output:
        assert json.loads(stdout)["uuid"] == uuid


@pytest.mark.parametrize("args", [("--help",), ("register", "--help"), ("status", "--help"),
                                  ("--version",)])
def test_help_loads_nothing_it_does_not_use(tmp_path, args):
    code, modules, stdout, _ = probe(tmp_path, *args)
    assert code == 0 and stdout
    assert loaded(modules, NETWORK_AND_CRYPTO) == []
    assert loaded(modules, (*STDLIB_UNUSED, "json")) == []


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
