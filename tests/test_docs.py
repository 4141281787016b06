"""The project documents itself: docs/spec.md is its contract, every citation points inside
the repository, and every relative link in its markdown resolves."""

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from conftest import require_tool, run_cli

REPO = Path(__file__).resolve().parent.parent
SPEC = "docs/spec.md"
# What a citation of something outside the repository looks like: the shared contract by
# its old name or path, or an issue of the tracker. Built from pieces so this file does not
# match itself.
OUTSIDE = re.compile(
    r"\.\./shared|(?<![\w/.])" + "SPEC" + r"\b|\b(?i:issues?)\s+#?\d+(?:,\s*points?\s+\d+)?"
)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def tracked_files() -> list[str]:
    """The repository's tracked files. Outside a git checkout this skips, and fails in CI."""
    git = require_tool("git")
    proc = subprocess.run([git, "-C", str(REPO), "ls-files", "-z"], capture_output=True)
    if proc.returncode != 0:
        message = f"not a git checkout: {proc.stderr.decode().strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return [p for p in proc.stdout.decode().split("\0") if p and (REPO / p).is_file()]


def text_of(rel: str) -> str | None:
    try:
        return (REPO / rel).read_text()
    except UnicodeDecodeError:
        return None


def prose(markdown: str) -> str:
    """The markdown without fenced code blocks and inline code spans, where a link is text."""
    kept, fenced = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "CODE", line))
    return "\n".join(kept)


def links(markdown: str) -> list[str]:
    return LINK.findall(prose(markdown))


def anchors(markdown: str) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(markdown).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).replace("CODE", "").lower())
        slug = slug.replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_no_tracked_file_cites_anything_outside_the_repository():
    found = []
    for rel in tracked_files():
        if rel == SPEC:
            continue
        text = text_of(rel)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if rel != "tests/test_docs.py" and OUTSIDE.search(line):
                found.append(f"{rel}:{number}: {line.strip()}")
            if "SPEC" + ".md" in line and rel != SPEC:
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "citations outside the repository:\n" + "\n".join(found)


def test_the_citation_pattern_catches_what_it_must():
    for old in ("SPEC section 3", "SPEC sections 2 and 4", "SPEC \u00a76", "../shared/x",
                "(issue 4, point 7)", "issue 11", "Issue #5"):
        assert OUTSIDE.search(old), old
    for fine in ("docs/spec.md section 3", "SPECIAL", "the spec example", "find_spec(x)"):
        assert not OUTSIDE.search(fine), fine


@pytest.mark.parametrize("rel", ["README.md", SPEC, "docs/adopting.md", "docs/testing.md"])
def test_the_docs_that_must_exist_do(rel):
    assert rel in tracked_files()


def test_every_relative_link_in_the_markdown_resolves():
    files = tracked_files()
    broken = []
    for rel in (f for f in files if f.endswith(".md")):
        text = text_of(rel) or ""
        for target in links(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            dest = (REPO / rel).parent / unquote(path) if path else REPO / rel
            dest = Path(os.path.normpath(dest))
            if REPO not in (dest, *dest.parents):
                broken.append(f"{rel}: {target} leaves the repository")
            elif not dest.exists():
                broken.append(f"{rel}: {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                broken.append(f"{rel}: {target}: no heading makes #{anchor}")
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_a_broken_link_and_anchor(tmp_path):
    text = ("See [the spec](docs/spec.md#3-settings-and-where-they-come-from), "
            "[`x`](docs/nope.md) and `[not](a-link.md)`.\n```\n[nor](this.md)\n```\n")
    assert links(text) == ["docs/spec.md#3-settings-and-where-they-come-from", "docs/nope.md"]
    spec_anchors = anchors((REPO / SPEC).read_text())
    assert "3-settings-and-where-they-come-from" in spec_anchors
    assert "8-the-test-kits-server-behaves-like-factory-registration-ref" in spec_anchors
    assert "9-nothing" not in spec_anchors


def test_readme_links_to_the_contract_first():
    readme = (REPO / "README.md").read_text()
    assert links(readme)[0] == SPEC


def test_spec_keeps_its_section_numbers():
    """Code and tests cite "docs/spec.md section N": the numbers and topics must not move."""
    text = (REPO / SPEC).read_text()
    headings = re.findall(r"^## (\d+)\. (.*)$", text, re.M)
    assert [int(n) for n, _ in headings] == list(range(1, 10))
    topics = ["job", "wire protocol", "settings", "installing", "backends", "command line",
              "post-steps", "test kit", "by hand"]
    for (_, title), topic in zip(headings, topics, strict=True):
        assert topic in title.lower(), title


def test_every_cited_section_exists():
    cited = set()
    for rel in tracked_files():
        text = text_of(rel) or ""
        for match in re.finditer(r"docs/spec\.md\s+sections?\s+([\d ,and]+)", text):
            cited.update(int(n) for n in re.findall(r"\d+", match.group(1)))
    assert cited, "nothing cites docs/spec.md by section"
    assert cited <= set(range(1, 10)), sorted(cited)


def help_options(*command: str) -> list[str]:
    """Every option spelling in the real CLI's ``--help`` for ``command``."""
    run = run_cli(*command, "--help")
    assert run.returncode == 0, run.stderr
    options = []
    for line in run.stdout.splitlines():
        match = re.match(r"  (-[^ ].*?)(?:  |$)", line)
        if match:
            for spelling in match.group(1).split(", "):
                options.append(spelling.split(" ")[0])
    return options


@pytest.mark.parametrize("command", ["register", "status", "demo"])
def test_readme_names_every_option_of_the_command(command):
    options = help_options(command)
    assert "--json" in options and "-h" in options
    readme = (REPO / "README.md").read_text()
    sections = re.findall(r"^## (Commands|Settings)\n(.*?)(?=^## )", readme, re.M | re.S)
    assert [name for name, _ in sections] == ["Commands", "Settings"]
    text = "".join(body for _, body in sections)
    missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    assert not missing, f"README's Commands and Settings miss these {command} options: {missing}"


@pytest.mark.parametrize("command", ["register", "status", "demo"])
def test_spec_names_every_option_of_the_command(command):
    text = (REPO / SPEC).read_text()
    missing = [o for o in help_options(command)
               if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)]
    assert not missing, f"{SPEC} misses these {command} options: {missing}"


def test_readme_shows_how_to_run_what_make_installed():
    """`make` puts the command in .venv/bin, not on PATH: the README says so, and it is there."""
    readme = (REPO / "README.md").read_text()
    assert ".venv/bin/lmp-device-auto-register --help" in readme
    assert ". .venv/bin/activate" in readme
    command = Path(sys.executable).parent / "lmp-device-auto-register"
    if not command.exists():  # not run from a venv that `make` built
        pytest.skip(f"{command} is not installed beside the running Python")
    run = subprocess.run([str(command), "--version"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("lmp-device-auto-register"), run
