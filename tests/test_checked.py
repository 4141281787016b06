"""Bad device files and settings (docs/reliability.md sections 9.2 and 9.3): each kind the
issue found ends with its documented exit code, naming the place, within the deadline,
inside the sysroot. The agent runs as a real subprocess on a device directory, against the
kit's loopback server; ``checked``'s pure functions are tested as they are."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given

from lmp_autoreg import checked
from lmp_autoreg.errors import ConfigError
from lmp_autoreg.testing.server import Reply

from conftest import any_text, clean_env, require_tool

# Far above the agent's start-up on a loaded machine; a FIFO that blocks would outlast it.
DEADLINE = "10"
WAIT = 60
NO_DAC = "-dac_override,-dac_read_search"


def agent(device, server, *args: str | bytes, env: dict | None = None,
          wrap: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    """Run the agent with ``--json`` (arguments may be bytes: not UTF-8); return the exit
    code, the JSON object and stderr. The object's exit code must be the process's."""
    url = server.url if server is not None else "http://127.0.0.1:9/"
    argv = [*wrap, sys.executable, "-m", "lmp_autoreg", "--sysroot", str(device.root),
            "--device-api", url, "--fioconfig", "off", "--no-start", "--timeout", DEADLINE,
            "--json", *args]
    environ = {k.encode(): v.encode() for k, v in clean_env().items()}
    environ.update({k.encode(): v if isinstance(v, bytes) else v.encode()
                    for k, v in (env or {}).items()})
    proc = subprocess.run(argv, env=environ, capture_output=True, timeout=WAIT,
                          stdin=subprocess.DEVNULL)
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    data = json.loads(proc.stdout)
    assert data["exit_code"] == proc.returncode
    return proc.returncode, data, stderr


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: its kind, mode and (files) bytes, or (links) target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink():
                found[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                found[str(path)] = ("file", st.st_mode, path.read_bytes())
            else:
                found[str(path)] = ("other", st.st_mode)
    return found


# --- the pure checks ----------------------------------------------------------------------

@pytest.mark.parametrize("value", ["x\udcff", "a\x7f", "tab\there", "nul\x00", "c1\x85"])
def test_a_setting_that_is_not_printable_utf8_is_refused_naming_its_place(value):
    with pytest.raises(ConfigError, match=r"^--tag is invalid: "):
        checked.setting(value, "--tag")


def test_a_setting_of_printable_utf8_is_taken_as_it_is():
    assert checked.setting("Grüße, 東京 ✓", "--name") == "Grüße, 東京 ✓"


def test_bytes_that_are_not_utf8_are_shown_as_bytes():
    assert checked.shown("x\udcff") == "'x\\xff'"
    assert checked.shown("a\x7f") == "'a\\x7f'"


def test_a_lone_surrogate_no_byte_stands_for_is_shown_escaped():
    # JSON can carry one ("\ud800"); surrogateescape has no byte for it.
    assert checked.shown("x\ud800") == "'x\\ud800'"


@given(any_text())
def test_any_text_is_shown_as_printable_utf8(value):
    text = checked.shown(value)
    text.encode("utf-8")
    assert not any(c < " " or "\x7f" <= c < "\xa0" for c in text)


@pytest.mark.parametrize(("value", "why"), [
    ("/" + "a" * 100_000, "a path of 100001 bytes"),
    ("/" + "a" * 256, "a name of 256 bytes"),
    ("/var/sota\x00x", "control character"),
])
def test_a_path_the_kernel_cannot_take_is_refused(value, why):
    with pytest.raises(ConfigError, match=why):
        checked.path(value, "--cacert")


def test_a_path_leaves_room_for_what_goes_under_it():
    checked.path("/" + "a" * 200, "--sota-dir", room=3000)
    with pytest.raises(ConfigError, match="at most 895 here"):
        checked.path("/" + "a" * 200 + "/b" * 500, "--sota-dir", room=3200)


def test_a_token_http_cannot_carry_is_refused_without_being_shown():
    with pytest.raises(ConfigError) as e:
        checked.token("токен-1234", "/etc/lmp-device-register-token")
    assert "1234" not in str(e.value) and "/etc/lmp-device-register-token" in str(e.value)
    assert checked.token("Ab0-_.~x", "t") == "Ab0-_.~x"


@pytest.mark.parametrize("name", ["Tökén", "OSF TOKEN", "", "a:b"])
def test_a_header_name_http_cannot_carry_is_refused(name):
    with pytest.raises(ConfigError, match="TOKEN_HEADER"):
        checked.header_name(name, "$TOKEN_HEADER")


def test_read_file_never_blocks_and_reads_only_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, kind in (("fifo", "a FIFO"), ("dir", "a directory")):
        with pytest.raises(checked.NotAFile, match=kind):
            checked.read_file(tmp_path / name)
    assert checked.read_file(tmp_path / "missing") is None
    (tmp_path / "big").write_bytes(b"x" * 11)
    with pytest.raises(OSError, match="larger than 10 bytes"):
        checked.read_file(tmp_path / "big", limit=10)
    assert checked.read_file(tmp_path / "big", limit=11) == b"x" * 11


# --- settings that are not UTF-8, or hold a control character -----------------------------

@pytest.mark.parametrize(("args", "env", "place", "dry_run"), [
    ((b"--tag", b"x\xff"), {}, "--tag", True),
    ((b"--apps", b"a\xff"), {}, "--apps", True),
    ((b"--factory", b"f\xff"), {}, "--factory", True),
    ((), {"DEVICE_FACTORY": b"f\xff"}, "$DEVICE_FACTORY", False),
    ((), {"APPS": "\x7f"}, "$APPS", False),  # was: exit 5 after the deadline
    ((b"--name", b"n\x1b[31m"), {}, "--name", False),
])
def test_a_setting_that_is_not_text_is_exit_2_naming_it(device_root, registration_server,
                                                        args, env, place, dry_run):
    registration_server.default = Reply.give_up()
    rc, data, _ = agent(device_root, registration_server, *args,
                        *(["--dry-run"] if dry_run else []), env=env)
    assert rc == 2
    assert data["error"]["message"].startswith(f"{place} is invalid")
    assert registration_server.requests == []


@pytest.mark.parametrize(("name", "why"), [
    (b"b\xff", "'b\\xff': it holds bytes that are not UTF-8"),
    (b"a,b", "the app name 'a,b' holds a comma"),
    (b"a\x7f", "'a\\x7f': it holds a control character"),
])
def test_an_app_directory_whose_name_cannot_be_an_app_is_exit_2(device_root, name, why):
    (device_root.sota / "compose-apps").joinpath(os.fsdecode(name)).mkdir()
    rc, data, _ = agent(device_root, None, "--dry-run")
    assert rc == 2
    assert data["error"]["message"] == (f"an app directory in {device_root.sota}/compose-apps "
                                        f"is invalid: {why}")


@pytest.mark.parametrize(("line", "shown"), [
    (b'LMP_FACTORY="f\xff"\n', "'f\\xff': it holds bytes that are not UTF-8"),
    (b"LMP_FACTORY=f\x1b[0m\n", "'f\\x1b[0m': it holds a control character"),
])
def test_a_value_in_a_device_file_that_is_not_text_is_exit_2(device_root, line, shown):
    release = device_root.path("/etc/os-release")
    release.write_bytes(release.read_bytes().replace(b'LMP_FACTORY="acme"\n', b"") + line)
    rc, data, _ = agent(device_root, None, "--dry-run")
    assert rc == 2
    assert data["error"]["message"] == f"LMP_FACTORY in /etc/os-release is invalid: {shown}"


# --- a token or token header HTTP cannot carry ---------------------------------------------

def test_a_token_http_cannot_carry_is_exit_2_and_never_shown(device_root, registration_server):
    device_root.path("/etc/lmp-device-register-token").write_text("токен-1234\n")
    rc, data, stderr = agent(device_root, registration_server)
    assert rc == 2 and "токен" not in stderr + json.dumps(data, ensure_ascii=False)
    assert "the API token in" in data["error"]["message"]
    assert registration_server.requests == []


def test_a_token_header_http_cannot_carry_is_exit_2(device_root, registration_server):
    rc, data, _ = agent(device_root, registration_server, env={"TOKEN_HEADER": "Tökén"})
    assert rc == 2 and data["error"]["message"].startswith("$TOKEN_HEADER is invalid")
    assert registration_server.requests == []


# --- a damaged pending identity is replaced ------------------------------------------------

@pytest.mark.parametrize("uuid", ["", "a" * 70, "not-a-uuid", "\ud800"])
def test_a_pending_identity_with_a_bad_uuid_is_replaced(device_root, registration_server, uuid):
    state = device_root.sota / ".lmp-autoreg"
    state.mkdir(mode=0o700)
    (state / "identity.json").write_text(json.dumps({"uuid": uuid, "key": None}))
    rc, data, stderr = agent(device_root, registration_server)
    assert rc == 0, stderr
    assert data["uuid"] != uuid and "ignoring" in stderr
    assert not (state / "identity.json").exists()


# --- paths the kernel cannot take ----------------------------------------------------------

@pytest.mark.parametrize(("line", "place"), [
    (b"SOTA_DIR=/var/sota\0x\n", "sota dir from SOTA_DIR in"),
    (b"TOKEN_FILE=/etc/tok\0en\n", "TOKEN_FILE in"),
])
def test_a_nul_byte_in_a_path_of_the_default_file_is_exit_2(device_root, line, place):
    default = device_root.path("/etc/default/lmp-device-auto-register")
    default.parent.mkdir(parents=True)
    default.write_bytes(line)
    rc, data, _ = agent(device_root, None, "--dry-run")
    assert rc == 2 and data["error"]["message"].startswith(place)
    assert "control character" in data["error"]["message"]


@pytest.mark.parametrize("option", ["--cacert", "--sota-dir", "--token-file"])
def test_a_path_of_100000_characters_is_exit_2(device_root, option):
    rc, data, _ = agent(device_root, None, option, "/" + "a" * 100_000, "--dry-run")
    assert rc == 2 and "a path of 100001 bytes" in data["error"]["message"]
    assert option in data["error"]["message"]


# --- files that cannot be read, or are not files -------------------------------------------

def test_compose_apps_that_cannot_be_read_is_exit_2(device_root):
    setpriv = require_tool("setpriv")
    (device_root.sota / "compose-apps").chmod(0)
    rc, data, _ = agent(device_root, None, "--dry-run",
                        wrap=(setpriv, "--bounding-set", NO_DAC, "--inh-caps", NO_DAC))
    assert rc == 2
    assert data["error"]["message"] == (f"apps: cannot read {device_root.sota}/compose-apps: "
                                         "Permission denied")


@pytest.mark.parametrize(("device_path", "env", "rc"), [
    ("/etc/os-release", {}, 2),
    ("/etc/hostname", {"USE_HOSTNAME": "1"}, 2),
    ("/etc/default/lmp-device-auto-register", {}, 2),
    ("/etc/sota/tag", {}, 2),
    ("/etc/lmp-device-register-token", {}, 2),
    ("/var/lock/aklite.lock", {}, 6),
    ("/var/sota/.lmp-autoreg/lock", {}, 6),
])
def test_a_fifo_where_a_device_file_is_read_never_blocks(device_root, registration_server,
                                                         device_path, env, rc):
    registration_server.default = Reply.give_up()
    path = device_root.path(device_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    code, data, _ = agent(device_root, registration_server, env=env)  # a block: TimeoutExpired
    assert code == rc
    assert f"{path}: a FIFO, not a regular file" in data["error"]["message"]


def test_a_directory_named_pkey_pem_is_exit_6_and_nothing_is_deleted(device_root,
                                                                     registration_server):
    inner = device_root.sota / "pkey.pem" / "inner"
    inner.mkdir(parents=True)
    (inner / "kept").write_text("mine\n")
    (device_root.sota / "client.pem").write_text("a half registration\n")
    before = tree(device_root.sota)
    rc, data, _ = agent(device_root, registration_server)
    assert rc == 6
    assert data["error"]["message"].startswith(f"{device_root.sota}/pkey.pem is a directory "
                                               "where a file goes: nothing was changed")
    assert registration_server.requests == []
    after = tree(device_root.sota)
    assert {k: v for k, v in after.items() if "/.lmp-autoreg" not in k} == before


# --- links out of the image ----------------------------------------------------------------

@pytest.mark.parametrize("target", ["absolute", "../../.."])
def test_a_state_dir_linked_out_of_the_image_is_exit_6_and_nothing_is_written_there(
        device_root, registration_server, tmp_path, target):
    registration_server.default = Reply.give_up()
    host = tmp_path / "host"
    host.mkdir()
    (host / "mine").write_text("the host's\n")
    link = device_root.sota / ".lmp-autoreg"
    link.symlink_to(host if target == "absolute" else target)
    outside = tree(tmp_path)
    rc, data, _ = agent(device_root, registration_server)
    assert rc == 6
    assert data["error"]["message"].startswith(f"{link} is a symbolic link")
    assert tree(tmp_path) == outside  # nothing written anywhere: not the host, not the image


def test_compose_apps_linked_out_of_the_image_never_lists_the_hosts_names(device_root,
                                                                          tmp_path):
    host = tmp_path / "host"
    (host / "hostapp").mkdir(parents=True)
    (host / "dir" / "inimage").mkdir(parents=True)
    apps = device_root.sota / "compose-apps"
    for child in apps.iterdir():
        for f in child.iterdir():
            f.unlink()
        child.rmdir()
    apps.rmdir()
    apps.symlink_to(host / "dir")
    # The device would follow the link inside its own root, where it finds nothing.
    rc, data, _ = agent(device_root, None, "--dry-run")
    assert rc == 0 and data["apps"] is None
    # The same link with its target inside the image: the image's apps.
    inside = device_root.path(str(host / "dir"))
    (inside / "imageapp").mkdir(parents=True)
    rc, data, _ = agent(device_root, None, "--dry-run")
    assert rc == 0 and data["apps"] == ["imageapp"]


def test_status_and_the_guard_never_block_on_a_fifo_as_client_pem(device_root):
    (device_root.sota / "sota.toml").write_text("[tls]\nserver = \"https://x\"\n")
    os.mkfifo(device_root.sota / "client.pem")
    status = subprocess.run([sys.executable, "-m", "lmp_autoreg", "status", "--sysroot",
                             str(device_root.root), "--json"], capture_output=True, text=True,
                            env=clean_env(), timeout=WAIT, stdin=subprocess.DEVNULL)
    assert status.returncode == 0 and json.loads(status.stdout)["uuid"] is None
    rc, data, _ = agent(device_root, None, "--dry-run")  # the guard: registered, no uuid
    assert rc == 3 and data["uuid"] is None


def test_a_state_dir_linked_out_of_the_image_is_never_read(device_root, tmp_path):
    """``status`` reads the state dir without the lock: through a link it reads inside the
    image, never the host's directory the link names."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "identity.json").write_text(json.dumps(
        {"uuid": "12345678-1234-1234-1234-123456789abc", "key": None}))
    (device_root.sota / ".lmp-autoreg").symlink_to(host)
    status = subprocess.run([sys.executable, "-m", "lmp_autoreg", "status", "--sysroot",
                             str(device_root.root), "--json"], capture_output=True, text=True,
                            env=clean_env(), timeout=WAIT, stdin=subprocess.DEVNULL)
    assert status.returncode == 1 and json.loads(status.stdout)["pending"] is False


def test_a_lock_linked_out_of_the_image_is_exit_6_and_the_host_file_unchanged(
        device_root, registration_server, tmp_path):
    registration_server.default = Reply.give_up()
    host = tmp_path / "host"
    host.mkdir()
    (host / "mine").write_text("the host's\n")
    state = device_root.sota / ".lmp-autoreg"
    state.mkdir(mode=0o700)
    (state / "lock").symlink_to(host / "mine")
    rc, data, _ = agent(device_root, registration_server)
    assert rc == 6 and data["error"]["message"].startswith(f"cannot open the lock {state}/lock")
    assert (host / "mine").read_text() == "the host's\n"
    assert registration_server.requests == []
