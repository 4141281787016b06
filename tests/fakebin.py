"""Fake executables on PATH (fioconfig, systemctl) for tests.

Each fake is a small Python script in a temporary bin directory. Every run appends one
JSON line to ``calls.jsonl`` in that directory (its name, argv and environment), so a test
sees which commands ran, in which order, with what. What a fake does is read at each run
from ``<name>.json`` next to it, so a test can change it between runs:

- ``exit``, ``stdout``, ``stderr``, ``sleep``: the fake's behaviour;
- ``when``: ``{last argument: behaviour}``, e.g. make ``systemctl start fioconfig`` fail
  while ``systemctl start aktualizr-lite`` works.
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import clean_env

_RECORD = """\
import json, os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
NAME = os.path.basename(sys.argv[0])
with open(os.path.join(HERE, "calls.jsonl"), "a") as log:
    log.write(json.dumps({"name": NAME, "argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
try:
    with open(os.path.join(HERE, NAME + ".json")) as f:
        CONF = json.load(f)
except FileNotFoundError:
    CONF = {}
"""

_SIMPLE = """
rule = CONF.get("when", {}).get(sys.argv[-1] if len(sys.argv) > 1 else "", CONF)
time.sleep(rule.get("sleep", 0))
sys.stdout.write(rule.get("stdout", ""))
sys.stderr.write(rule.get("stderr", ""))
sys.exit(rule.get("exit", 0))
"""

@dataclass
class Call:
    name: str
    argv: list[str]
    env: dict[str, str]


class FakeBin:
    """A bin directory of fakes; ``environ()`` puts it first on PATH."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "calls.jsonl"

    def add(self, name: str, **behaviour: Any) -> Path:
        """Create the fake ``name``."""
        path = self.dir / name
        path.write_text(f"#!{sys.executable}\n{_RECORD}{_SIMPLE}")
        path.chmod(0o755)
        self.set(name, **behaviour)
        return path

    def set(self, name: str, **behaviour: Any) -> None:
        (self.dir / f"{name}.json").write_text(json.dumps(behaviour))

    def calls(self, name: str | None = None) -> list[Call]:
        if not self.log.exists():
            return []
        calls = [Call(**json.loads(line)) for line in self.log.read_text().splitlines()]
        return [c for c in calls if name is None or c.name == name]

    def environ(self, **extra: str) -> dict[str, str]:
        env = clean_env(**extra)
        env["PATH"] = f"{self.dir}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env
