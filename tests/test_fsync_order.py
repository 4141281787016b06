"""Durability seen from the kernel (docs/spec.md section 4): the real agent under strace.

For every file the agent installs or saves whole (the answer's files in the sota dir; the
pending identity and the install journal in the state dir) the system calls must come in
the order fsync(temporary file) -> rename(temporary file, file) -> fsync(directory). State
files are each made durable before the next write, and the state directory itself (the
sota dir is fsync-ed after it is made) before the first of them; the installed files
together, before the journal that could complete them is removed. Removing any of those
fsyncs from the agent fails this test.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import clean_env, device_args, require_tool

INSTALLED = ["pkey.pem", "client.chained", "client.pem", "root.crt", "sota.toml"]
STATE = ["identity.json", "install.json"]
TRACED = "fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat"
_CALL = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=\s+(-?\d+)")
_FD_PATH = re.compile(r"^\d+<(.*)>$")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Call:
    name: str  # fsync, rename, unlink, mkdir (the *at variants under their plain names)
    paths: tuple[str, ...]


def trace(path: Path) -> list[Call]:
    """The successful traced calls, in order, with the paths they name."""
    calls = []
    for line in path.read_text().splitlines():
        match = _CALL.match(line)
        if match is None or match.group(3) != "0":
            continue
        name, args = match.group(1), match.group(2)
        if name in ("fsync", "fdatasync"):
            fd = _FD_PATH.match(args)
            if fd is None:
                continue
            calls.append(Call("fsync", (fd.group(1),)))
        else:
            plain = next(p for p in ("rename", "unlink", "mkdir") if name.startswith(p))
            calls.append(Call(plain, tuple(os.path.realpath(p) for p in _STRING.findall(args))))
    return calls


def index(calls: list[Call], name: str, *paths: str, after: int = -1) -> int:
    """The position of the first call ``name`` naming ``paths`` after ``after``; -1: none."""
    for i in range(after + 1, len(calls)):
        if calls[i].name == name and calls[i].paths[: len(paths)] == paths:
            return i
    return -1


def test_fsync_file_rename_fsync_dir_for_the_answer_and_the_state(device_root, registration_server,
                                                                  tmp_path):
    strace = require_tool("strace")
    out = tmp_path / "trace"
    proc = subprocess.run(
        [strace, "-f", "-y", "-qq", "-e", f"trace={TRACED}", "-o", str(out),
         sys.executable, "-m", "lmp_autoreg", *device_args(device_root, registration_server)],
        capture_output=True, text=True, timeout=120, env=clean_env(), stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    calls = trace(out)
    sota = os.path.realpath(device_root.sota)
    state = os.path.join(sota, ".lmp-autoreg")
    renamed = {}
    for directory, names in ((sota, INSTALLED), (state, STATE)):
        for name in names:
            target = os.path.join(directory, name)
            moves = [i for i, c in enumerate(calls) if c.name == "rename" and len(c.paths) == 2
                     and c.paths[1] == target]
            assert len(moves) == 1, f"{name}: renamed {len(moves)} times"
            [at] = moves
            temporary = calls[at].paths[0]
            assert os.path.dirname(temporary) == directory, temporary
            synced = [i for i in range(at) if calls[i] == Call("fsync", (temporary,))]
            assert synced, f"{name}: not fsync-ed before its rename"
            renamed[name] = at
    made = index(calls, "mkdir", state)
    assert made >= 0, "the state directory was not made"
    dir_sync = index(calls, "fsync", sota, after=made)
    assert 0 <= dir_sync < renamed["identity.json"], "the new state dir's entry is not durable"
    for name in STATE:  # each state file is durable before anything else is written
        at = renamed[name]
        following = next((i for i in range(at + 1, len(calls)) if calls[i].name == "rename"),
                         len(calls))
        dir_sync = index(calls, "fsync", state, after=at)
        assert 0 <= dir_sync < following, f"{name}: no fsync of the state dir before going on"
    last = max(renamed[name] for name in INSTALLED)
    assert last == renamed["sota.toml"]  # sota.toml last: its appearance starts the services
    dir_sync = index(calls, "fsync", sota, after=last)
    journal_gone = index(calls, "unlink", os.path.join(state, "install.json"), after=last)
    assert dir_sync >= 0, "the sota dir is not fsync-ed after the install"
    assert 0 <= journal_gone and dir_sync < journal_gone, "the journal went before the install"
    assert index(calls, "fsync", state, after=journal_gone) >= 0, "removal not made durable"
