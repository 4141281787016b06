"""The package's structure: every import points one way, and the test-only seams are in
one module (README, "The code").

The graph is read from the source (``ast``), not from a running interpreter, so that it
holds every import there is: at module level, inside functions, and under
``TYPE_CHECKING``.
"""

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = "lmp_autoreg"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that the module ``name`` (at ``path``) imports, anywhere."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            # ``from . import x`` imports the submodule x when there is one.
            targets = [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            # ``import a.b.c`` also imports a and a.b; keep the deepest module we have.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its nodes, the first repeated at the end), or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.mark.parametrize("name", [n for n in modules() if not n.endswith("__main__")])
def test_every_module_imports_on_this_interpreter(name):
    """Each module imports here, the kit's and HSM mode's with their extras: on the target's
    Python and on an emulated architecture (make test-target) as on the host. The
    ``__main__`` modules run their program when imported; the CLI tests run them."""
    assert importlib.import_module(name).__name__ == name


def test_the_package_imports_without_circles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_sees_every_kind_of_import():
    """The reader is able to see what it must: relative imports at module level, in a
    function, under TYPE_CHECKING, of a submodule by ``from . import``, and the test kit's
    absolute ones."""
    graph = import_graph()
    assert "lmp_autoreg.result" in graph["lmp_autoreg.register"]  # module level
    assert "lmp_autoreg.poststeps" in graph["lmp_autoreg.register"]  # in a function
    assert "lmp_autoreg.result" in graph["lmp_autoreg.poststeps"]  # under TYPE_CHECKING
    assert "lmp_autoreg.devicekey" in graph["lmp_autoreg.attempt"]  # under TYPE_CHECKING
    assert "lmp_autoreg.guard" in graph["lmp_autoreg.cli"]  # from . import guard
    assert "lmp_autoreg" in graph["lmp_autoreg.cli"]  # from . import PROG
    assert "lmp_autoreg.testing.server" in graph["lmp_autoreg.demo"]  # from .testing.server
    assert any(m.startswith("lmp_autoreg.") for m in graph["lmp_autoreg.testing.server"])


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b", "c"}, "b": set(), "c": {"c2"}, "c2": {"c"}}, ["c", "c2", "c"]),
    ],
)
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_old_circles_would_be_found(tmp_path):
    """The two circles the package once had, register <-> poststeps for ``Result`` and
    cli <-> demo for ``emit_json``, written as they were, are caught."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "register.py").write_text("def f():\n    from .poststeps import run\n")
    (pkg / "poststeps.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .register import Result\n"
    )
    (pkg / "cli.py").write_text("def g():\n    from .demo import run_demo\n")
    (pkg / "demo.py").write_text("def h():\n    from .cli import emit_json\n")
    names = {"lmp_autoreg", "lmp_autoreg.register", "lmp_autoreg.poststeps",
             "lmp_autoreg.cli", "lmp_autoreg.demo"}
    graph = {n: imports_of(n, _path(pkg, n), names) for n in names}
    assert find_cycle(graph) == ["lmp_autoreg.cli", "lmp_autoreg.demo", "lmp_autoreg.cli"]
    del graph["lmp_autoreg.cli"]
    assert find_cycle(graph) == ["lmp_autoreg.poststeps", "lmp_autoreg.register",
                                 "lmp_autoreg.poststeps"]


def _path(pkg: Path, name: str) -> Path:
    sub = name.partition(".")[2]
    return pkg / (f"{sub}.py" if sub else "__init__.py")


def test_test_only_seams_are_read_in_testhook_alone():
    """The agent's test-only environment variables (``LMP_AUTOREG_TEST_*``) are named in
    ``testhook`` and read nowhere else, and that module says it is test-only."""
    for name, path in modules().items():
        if name == "lmp_autoreg.testhook":
            continue
        assert "LMP_AUTOREG_" not in path.read_text(), f"{path} names a test-only variable"
    text = (ROOT / "testhook.py").read_text()
    assert text.startswith('"""TEST-ONLY') and "LMP_AUTOREG_TEST_PAUSE" in text


def module_map() -> list[str]:
    """The modules ``lmp_autoreg/__init__``'s docstring lists, in its order."""
    doc = ast.get_docstring(ast.parse((ROOT / "__init__.py").read_text())) or ""
    names = []
    for line in doc.splitlines():
        if line.startswith("- "):
            names += re.findall(r"``(\w+)``", line.split("  ")[0])
    return names


def test_the_module_map_lists_every_module_below_what_it_imports():
    """``lmp_autoreg/__init__``'s module map names every module of the package once, and
    each imports only modules listed above it (the test kit counts as one)."""
    listed = module_map()
    top = {name.split(".")[1] for name in modules() if "." in name} - {"__main__"}
    assert sorted(listed) == sorted(top) and len(listed) == len(set(listed))
    rank = {name: i for i, name in enumerate(listed)}

    def place(module: str) -> int:
        return rank[module.split(".")[1]] if "." in module else -1  # the package: first

    upward = [(m, d) for m, deps in import_graph().items() if m != f"{PACKAGE}.__main__"
              for d in deps if place(d) > place(m)
              or (place(d) == place(m) and not m.startswith(f"{PACKAGE}.testing"))]
    assert upward == []
