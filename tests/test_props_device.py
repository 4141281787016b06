"""Property-based tests of bad input from the device (docs/reliability.md section 9.4): two
families, "the device's files" and "the command line and the environment".

Each generated case runs the agent as a real subprocess on a fresh device directory, with
``--json``, against the kit's loopback server answering 503 with a ``Retry-After`` past any
deadline (the network is not the subject: a run that gets that far gives up at once, exit
5). Each asserts the README's promises: a documented exit code that fits the case (never
1), no traceback, one JSON object whose ``exit_code`` is the process's, the run within the
deadline plus a margin, nothing written outside the sysroot (a host directory that links
point to stays as it was) and, after a failure, the sysroot as it was (but the agent's
state directory, which keeps the pending identity by design).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmp_autoreg.testing.device import FakeDevice, populate
from lmp_autoreg.testing.server import Reply

from conftest import any_text, clean_env, require_tool

# Each case runs the agent: with `make test`'s fixed-seed profile a dozen per family; with
# the long one (`make test-long`, tests/conftest.py) its own count, at least 2000.
LONG = os.environ.get("HYPOTHESIS_PROFILE", "default") != "default"
PER_FAMILY = settings() if LONG else settings(max_examples=12)
# Many real processes per test: the per-test timeout (tests/conftest.py, pyproject.toml) is
# for one. None at all in the long run (`make test-long` says --timeout 0, which a marker
# would override).
pytestmark = [pytest.mark.props, pytest.mark.timeout(0 if LONG else 900)]
DEADLINE = 5
MARGIN = 30  # a loaded machine starts Python slowly; a FIFO that blocks waits forever
NO_DAC = "-dac_override,-dac_read_search"
DOCUMENTED = {0, 2, 3, 5, 6}
STATE = ".lmp-autoreg"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links): kind, mode, bytes or target."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[rel] = ("file", st_.st_mode, f.read())
            else:
                found[rel] = ("other", st_.st_mode)
    return found


def assert_as_it_was(before: dict, after: dict) -> None:
    """The sysroot after a failure: nothing changed or removed; new entries only the
    agent's state directory, its contents, and directories made to hold it."""
    def mine(rel: str) -> bool:
        return STATE in rel.split(os.sep)

    changed = {k for k in before if not mine(k) and after.get(k) != before[k]}
    assert not changed, f"changed or removed: {sorted(changed)}"
    new = {k for k in after if k not in before and not mine(k)}
    assert all(after[k][0] == "other" for k in new), f"new files: {sorted(new)}"


def run_agent(argv: list[bytes], env: dict[bytes, bytes], wrap: tuple[str, ...] = ()
              ) -> tuple[int, dict, str]:
    proc = subprocess.run([*wrap, sys.executable, "-m", "lmp_autoreg", *argv], env=env,
                          capture_output=True, timeout=DEADLINE + MARGIN,
                          stdin=subprocess.DEVNULL)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode in DOCUMENTED, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    data = json.loads(proc.stdout)  # one object, nothing else
    assert isinstance(data, dict) and data["exit_code"] == proc.returncode
    return proc.returncode, data, stderr


def base_env(**extra: bytes) -> dict[bytes, bytes]:
    env = {k.encode(): v.encode() for k, v in clean_env().items()}
    env.update({k.encode(): v for k, v in extra.items()})
    return env


@pytest.fixture
def giving_up(registration_server):
    registration_server.default = Reply.give_up()
    return registration_server


# --- the device's files ------------------------------------------------------------------

# The device files the agent reads or writes, by kind of use.
SETTINGS_FILES = ("etc/os-release", "etc/default/lmp-device-auto-register", "etc/sota/tag",
                  "etc/hostname", "etc/lmp-device-register-token")
OTHER_FILES = ("var/sota/compose-apps", "var/sota/.lmp-autoreg",
               "var/sota/.lmp-autoreg/identity.json", "var/sota/.lmp-autoreg/lock",
               "var/lock/aklite.lock", "var/sota/pkey.pem", "var/sota/client.pem",
               "var/sota/sota.toml", "var/sota/compose-apps/app1", "var/sota", "etc/sota")
# The board's serial (lmp_autoreg.board): its sources, and the wired interface the device
# is built with (WIRED).
BOARD_FILES = ("sys/firmware/devicetree/base/serial-number", "sys/class/dmi/id/product_serial",
               "sys/class/dmi/id/board_serial", "sys/class/net/eth0/address",
               "sys/class/net/eth0/type", "sys/class/net/eth0", "sys/class/net")
WIRED = {"address": "00:11:22:33:44:55\n", "type": "1\n", "device": None}

texts = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20),
    st.sampled_from(["acme", "main", "lmp", "", "x\xff", "\x7f", "/var/sota\x00x", "a,b"]),
)
env_lines = st.lists(
    st.tuples(st.sampled_from(["LMP_FACTORY", "LMP_MACHINE", "LMP_FACTORY_TAG", "SOTA_DIR",
                               "TOKEN_FILE", "APPS", "TOKEN_HEADER", "DEVICE_FACTORY"]),
              texts),
    max_size=4,
).map(lambda pairs: b"".join(
    k.encode() + b"=" + (v if isinstance(v, bytes) else v.encode(errors="surrogateescape"))
    + b"\n" for k, v in pairs))
json_text = any_text(max_size=30)  # JSON carries a lone surrogate too
identities = st.fixed_dictionaries({
    "uuid": st.one_of(st.sampled_from(["", "a" * 70, "12345678-1234-1234-1234-123456789abc",
                                       "x\ud800", "\udcff"]), json_text),
    "key": st.one_of(st.none(), json_text, st.just({"x": 1}), st.integers(),
                     st.dictionaries(json_text, json_text, max_size=3)),
}).map(lambda d: json.dumps(d).encode())
contents = st.one_of(st.binary(max_size=200), env_lines, identities)
kinds = st.one_of(
    st.tuples(st.just("file"), contents, st.sampled_from([0o644, 0o600, 0o000])),
    st.tuples(st.just("dir"), st.booleans(), st.sampled_from([0o755, 0o700, 0o000])),
    st.tuples(st.just("link"), st.sampled_from(["host", "../../../../..", "/etc/os-release",
                                                "/nowhere", "inside"]), st.none()),
    st.tuples(st.just("fifo"), st.none(), st.none()),
)
device_changes = st.dictionaries(st.sampled_from(SETTINGS_FILES + OTHER_FILES + BOARD_FILES),
                                 kinds, min_size=1, max_size=4)


def lay_out(root: Path, host: Path, rel: str, kind: tuple) -> bool:
    """Put ``kind`` at ``rel``; False when a change above it left no room for it."""
    path = root / rel
    parent = path.parent
    while parent != root:  # under something a change made other than a directory: no room
        if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
            return False
        parent = parent.parent
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    what, arg, mode = kind
    if what == "file":
        path.write_bytes(arg)
        path.chmod(mode)
    elif what == "dir":
        path.mkdir()
        if arg:
            (path / "something").write_text("kept\n")
        path.chmod(mode)
    elif what == "link":
        target = {"host": str(host), "inside": "/etc"}.get(arg, arg)
        path.symlink_to(target)
    else:
        os.mkfifo(path)
    return True


@pytest.mark.usefixtures("giving_up")
@PER_FAMILY
@given(changes=device_changes)
def test_the_devices_files(registration_server, changes):
    """Any device file of any kind (file with any bytes or mode, directory, link in or out
    of the image, FIFO): a documented exit code that fits, inside the sysroot. The agent
    runs without CAP_DAC_OVERRIDE, so modes are obeyed as by any service user."""
    setpriv = require_tool("setpriv")
    with tempfile.TemporaryDirectory() as tmp:
        root, host = Path(tmp, "root"), Path(tmp, "host")
        host.mkdir()
        (host / "mine").write_text("the host's\n")
        FakeDevice(root).build()
        populate(root / "sys/class/net/eth0", WIRED)
        # Deepest last, so that a change of a directory comes before one inside it.
        made = [rel for rel in sorted(changes, key=lambda r: r.count("/"))
                if lay_out(root, host, rel, changes[rel])]
        before, host_before = snapshot(root), snapshot(host)
        argv = [b"--sysroot", str(root).encode(), b"--device-api",
                registration_server.url.encode(), b"--fioconfig", b"off", b"--no-start",
                b"--timeout", str(DEADLINE).encode(), b"--json"]
        rc, data, stderr = run_agent(argv, base_env(USE_HOSTNAME=b"1"),
                                     wrap=(setpriv, "--bounding-set", NO_DAC,
                                           "--inh-caps", NO_DAC))
        assert snapshot(host) == host_before
        assert not Path(tmp, STATE).exists() and sorted(os.listdir(tmp)) == ["host", "root"]
        assert rc != 0  # the server never registers
        assert_as_it_was(before, snapshot(root))
        if data["board"] is not None:  # text, from one of its sources
            assert data["board"]["serial"].isprintable(), data["board"]
            assert data["board"]["source"] in {"/" + rel for rel in BOARD_FILES}
        odd = [rel for rel in SETTINGS_FILES
               if rel in made and changes[rel][0] in ("fifo", "dir")]
        if odd and rc != 3:
            assert rc == 2, (odd, stderr)


# --- the command line and the environment --------------------------------------------------

TEXT_OPTIONS = ("--tag", "--factory", "--hwid", "--name", "--apps", "--device-group",
                "--api-token-header", "--restorable-apps", "--start", "--uuid", "--timeout",
                "--device-api")
PATH_OPTIONS = ("--sota-dir", "--cacert", "--token-file", "--fioconfig-bin",
                "--lmp-device-register")
ENV = ("DEVICE_FACTORY", "HARDWARE_ID", "APPS", "RESTORABLE_APPS", "DEVICE_GROUP",
       "TOKEN_HEADER", "SOTA_DIR", "TOKEN_FILE", "CACERT", "USE_HOSTNAME", "PRODUCTION",
       "REGISTRATION_TIMEOUT", "START_SERVICES", "FIOCONFIG", "BACKEND", "DEVICE_API")

good_text = st.sampled_from(["acme", "main", "app1,app2", "OSF-TOKEN", "1", "3", ",", " ",
                             "Grüße", "aktualizr-lite", "native", "off"])
bad_text = st.one_of(
    st.binary(min_size=1, max_size=12).filter(lambda b: b"\0" not in b)
    .map(lambda b: b + b"\xff"),
    st.sampled_from([b"\x7f", b"a\x1bb", b"tab\tx", b"\xc3\x28", b"\xed\xa0\x80"]),
)
paths = st.sampled_from(["HOST", "HOST/mine", "/var/sota", "/nowhere/x", "relative",
                         "/" + "a" * 5000, "/" + "b" * 300 + "/c", "/var/../etc"])
option_values = st.one_of(
    good_text.map(lambda s: (s.encode(), False)),
    bad_text.map(lambda b: (b, True)),
    st.text(max_size=12).filter(lambda s: "\0" not in s)
    .map(lambda s: (s.encode("utf-8", "surrogateescape"), None)),
)
command_lines = st.fixed_dictionaries({
    "options": st.dictionaries(st.sampled_from(TEXT_OPTIONS), option_values, max_size=4),
    "paths": st.dictionaries(st.sampled_from(PATH_OPTIONS), paths, max_size=2),
    "env": st.dictionaries(st.sampled_from(ENV), st.one_of(option_values,
                                                           paths.map(lambda p: (p, False))),
                           max_size=4),
    "dry_run": st.booleans(),
})


# The option that, given, makes the agent not read an environment variable at all.
SHADOWED_BY = {"DEVICE_FACTORY": "--factory", "HARDWARE_ID": "--hwid", "APPS": "--apps",
               "RESTORABLE_APPS": "--restorable-apps", "DEVICE_GROUP": "--device-group",
               "TOKEN_HEADER": "--api-token-header", "SOTA_DIR": "--sota-dir",
               "TOKEN_FILE": "--token-file", "CACERT": "--cacert", "USE_HOSTNAME": "--name",
               "START_SERVICES": "--no-start", "FIOCONFIG": "--fioconfig",
               "REGISTRATION_TIMEOUT": "--timeout",
               "DEVICE_API": "--device-api"}


@pytest.mark.usefixtures("giving_up")
@PER_FAMILY
@given(case=command_lines)
def test_the_command_line_and_the_environment(registration_server, case):
    """Any value of any option or environment variable (bytes that are not UTF-8,
    control characters, long paths, paths out of the image): a documented exit code that
    fits (a value that is not text is exit 2), inside the sysroot."""
    with tempfile.TemporaryDirectory() as tmp:
        root, host = Path(tmp, "root"), Path(tmp, "host")
        host.mkdir()
        (host / "mine").write_text("the host's\n")
        FakeDevice(root).build()
        before, host_before = snapshot(root), snapshot(host)

        def value(v) -> bytes:
            if isinstance(v, str):  # a path
                return v.replace("HOST", str(host)).encode()
            return v[0]

        argv = [b"--sysroot", str(root).encode(), b"--fioconfig", b"off", b"--no-start",
                b"--timeout", str(DEADLINE).encode(), b"--json"]
        if "--device-api" not in case["options"]:
            argv += [b"--device-api", registration_server.url.encode()]
        for option, v in [*case["options"].items(), *case["paths"].items()]:
            argv += [option.encode(), value(v)]
        if case["dry_run"]:
            argv.append(b"--dry-run")
        env = base_env(**{k: value(v) for k, v in case["env"].items()})
        rc, data, stderr = run_agent(argv, env)
        assert snapshot(host) == host_before
        assert sorted(os.listdir(tmp)) == ["host", "root"]
        if rc != 0:
            assert_as_it_was(before, snapshot(root))
        given = {*case["options"], *case["paths"], "--timeout", "--device-api", "--no-start",
                 "--fioconfig"}
        read_env = [v for k, v in case["env"].items() if SHADOWED_BY.get(k) not in given]
        bad = [v for v in (*case["options"].values(), *read_env)
               if not isinstance(v, str) and v[1]]
        if bad:
            assert rc == 2, (bad, stderr)
        assert rc != 3
