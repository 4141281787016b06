"""Install the agent into a root file system the way recipe/lmp-autoreg_*.bb installs it.

Nothing here restates what the recipe does: the files come from its ``do_install:append``
``install`` lines and the default file's settings (and token file) from its own Python
functions, ``lmp_autoreg_settings`` and ``lmp_autoreg_install_settings``, run here against a
small stand-in for BitBake's datastore. A changed recipe changes what the boot test installs.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# BitBake's values for the variables the recipe's install lines use, on a usrmerged image.
LAYOUT = {
    "systemd_system_unitdir": "/usr/lib/systemd/system",
    "sysconfdir": "/etc",
    "nonarch_libdir": "/usr/lib",
    "bindir": "/usr/bin",
}

_DEFAULT = re.compile(r'^([A-Z_]+) \?= "(.*)"$', re.MULTILINE)
_VAR = re.compile(r"\$\{([A-Za-z_]+)\}")


def recipe_path() -> Path:
    (path,) = sorted((ROOT / "recipe").glob("lmp-autoreg_*.bb"))
    return path


class Datastore:
    """The part of BitBake's ``d`` the recipe's functions use: getVar and expand."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)

    def getVar(self, name: str) -> str | None:  # noqa: N802 - BitBake's name
        value = self.values.get(name)
        return None if value is None else self.expand(value)

    def expand(self, text: str) -> str:
        return _VAR.sub(lambda m: self.values.get(m.group(1), m.group(0)), text)


class _BB:
    """BitBake's ``bb`` module as far as the recipe's functions use it."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


class Recipe:
    def __init__(self, text: str) -> None:
        self.text = text
        self.defaults = dict(_DEFAULT.findall(text))

    @classmethod
    def load(cls) -> Recipe:
        return cls(recipe_path().read_text())

    def _block(self, opening: str) -> list[str]:
        """The lines of the brace-delimited block opened by the line ``opening``."""
        lines = self.text.splitlines()
        start = lines.index(opening) + 1
        end = lines.index("}", start)
        return lines[start:end]

    def install_lines(self) -> list[list[str]]:
        """``install`` commands of do_install:append, as argument lists (continuations joined)."""
        body = "\n".join(self._block("do_install:append() {")).replace("\\\n", " ")
        return [shlex.split(line) for line in body.splitlines() if line.strip()]

    def _functions(self, bb: _BB) -> dict[str, Any]:
        """The recipe's top-level ``def`` functions and its ``python`` install function."""
        code: list[str] = []
        inside = False
        for line in self.text.splitlines():
            if line.startswith("def "):
                inside = True
            elif line.strip() and not line.startswith(" "):
                inside = False
            if inside:
                code.append(line)
        body = textwrap.dedent("\n".join(self._block("python lmp_autoreg_install_settings() {")))
        code += ["def lmp_autoreg_install_settings(d):", textwrap.indent(body, "    ")]
        namespace: dict[str, Any] = {"bb": bb}
        exec(compile("\n".join(code), str(recipe_path()), "exec"), namespace)  # noqa: S102
        return namespace

    def install(self, source: Path, dest: Path, variables: Mapping[str, str]) -> list[str]:
        """Install into ``dest`` what the recipe installs, with its ``?=`` defaults overridden
        by ``variables``; return BitBake's warnings."""
        d = Datastore({**self.defaults, **LAYOUT, "S": str(source), "D": str(dest),
                       **variables})
        for argv in self.install_lines():
            args = [d.expand(a) for a in argv]
            if args[:2] != ["install", "-D"] or args[2] != "-m" or len(args) != 6:
                raise ValueError(f"unexpected install line in the recipe: {' '.join(argv)}")
            mode, src, dst = int(args[3], 8), Path(args[4]), Path(args[5])
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            dst.chmod(mode)
        bb = _BB()
        self._functions(bb)["lmp_autoreg_install_settings"](d)
        return bb.warnings
