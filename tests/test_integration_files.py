"""Checks of the device-integration files: the systemd unit, its default file, the recipe.

The unit is checked with the real systemd-analyze (verify and the offline security score),
the recipe with the real oelint-adv and oelint-parser, and the recipe's install logic by
running its own do_install:append shell code and its python functions on a scratch tree.
"""

import hashlib
import importlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmp_autoreg.paths import DEFAULTS_FILE

from conftest import clean_env, require_tool

ROOT = Path(__file__).resolve().parent.parent
UNIT_NAME = "lmp-device-auto-register.service"
UNIT = ROOT / "systemd" / UNIT_NAME
DEFAULT_FILE = ROOT / "systemd" / "lmp-device-auto-register.default"
TMPFILES = ROOT / "systemd" / "lmp-autoreg.tmpfiles"
RECIPES = sorted((ROOT / "recipe").glob("lmp-autoreg_*.bb"))
MAX_EXPOSURE = 3.5
SETTINGS = (
    # docs/spec.md section 3
    "DEVICE_API",
    "PRODUCTION",
    "DEVICE_FACTORY",
    "HARDWARE_ID",
    "USE_HOSTNAME",
    "APPS",
    "DEVICE_GROUP",
    "TOKEN_FILE",
    "SOTA_DIR",
    # the agent's own choices
    "BACKEND",
    "LMP_DEVICE_REGISTER",
    "FIOCONFIG",
    "FIOCONFIG_BIN",
    "START_SERVICES",
    "POWEROFF",
    "REGISTRATION_TIMEOUT",
    "CACERT",
    "TOKEN_HEADER",
)
TIMEOUT = 60

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections of a unit file as lists of (key, value), repeated keys kept in order."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value given to `key` in `section`, in file order."""
    return [v for k, v in unit.get(section, []) if k == key]


def words(unit: Unit, section: str, key: str) -> list[str]:
    """All space-separated words of every assignment of a list-valued key."""
    return [w for v in values(unit, section, key) for w in v.split()]


def single(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times"
    return found[0]


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


def exec_start_path(unit: Unit) -> str:
    return shlex.split(single(unit, "Service", "ExecStart"))[0].lstrip("-@:+!")


def make_root(tmp_path: Path, unit_text: str) -> Path:
    """A throwaway root holding the unit, the targets it names, and its ExecStart binary."""
    root = tmp_path / "root"
    unit_dir = root / "usr/lib/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / UNIT_NAME).write_text(unit_text)
    parsed = parse_unit(unit_text)
    # The targets it names, and those every service gets from DefaultDependencies=yes.
    targets = {"sysinit.target", "basic.target", "shutdown.target"} | {
        name
        for section, key in (("Unit", "Wants"), ("Unit", "After"), ("Install", "WantedBy"))
        for name in words(parsed, section, key)
    }
    for target in targets:
        (unit_dir / target).write_text(f"[Unit]\nDescription={target}\n")
    binary = root / exec_start_path(parsed).lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return root


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def with_service_line(text: str, line: str) -> str:
    """The unit text with `line` added at the top of [Service]."""
    return text.replace("[Service]\n", f"[Service]\n{line}\n", 1)


# --- systemd-analyze ------------------------------------------------------------------------


def verify_output(tmp_path: Path, unit_text: str) -> str:
    tool = require_tool("systemd-analyze")
    root = make_root(tmp_path, unit_text)
    proc = run([tool, "verify", f"--root={root}", "--man=no", UNIT_NAME])
    return proc.stdout + proc.stderr + ("" if proc.returncode == 0 else f"rc={proc.returncode}")


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    # verify exits 0 on unknown keys and bad values: any output at all is a failure.
    assert verify_output(tmp_path, UNIT.read_text()) == ""


@pytest.mark.parametrize(
    "bad_line", ["NoSuchHardening=yes", "DeviceAllow=char-tpm rwz", "Restart=sometimes"]
)
def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path, bad_line: str) -> None:
    # The harness above would catch a typo in the unit: the same text with one bad line.
    output = verify_output(tmp_path, with_service_line(UNIT.read_text(), bad_line))
    assert output != ""


def exposure(tmp_path: Path, unit_text: str) -> float:
    tool = require_tool("systemd-analyze")
    root = make_root(tmp_path, unit_text)
    proc = run([tool, "security", "--offline=yes", f"--root={root}", "--no-pager", UNIT_NAME])
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, f"no exposure level in output:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


def test_security_exposure_is_low(tmp_path: Path) -> None:
    score = exposure(tmp_path, UNIT.read_text())
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}"


def test_security_exposure_of_the_unhardened_unit_is_high(tmp_path: Path) -> None:
    # The score really depends on the hardening: without it the same unit rates badly.
    text = "\n".join(
        line
        for line in UNIT.read_text().splitlines()
        if line.startswith(("[", "Type=", "ExecStart=", "WantedBy="))
    )
    assert exposure(tmp_path, text + "\n") > MAX_EXPOSURE


# --- the unit's contract ---------------------------------------------------------------------


def test_unit_runs_once_and_retries(unit: Unit) -> None:
    assert single(unit, "Service", "Type") == "oneshot"
    assert single(unit, "Service", "RemainAfterExit") == "yes"
    # sd_notify STATUS= lines from the agent reach systemd only with NotifyAccess.
    assert single(unit, "Service", "NotifyAccess") == "main"
    # The agent reads the default file itself, below its environment, so a drop-in's
    # Environment= overrides a setting; EnvironmentFile= would make the file win.
    assert values(unit, "Service", "EnvironmentFile") == []
    for target in ("network-online.target", "time-sync.target"):
        assert target in words(unit, "Unit", "Wants")
        assert target in words(unit, "Unit", "After")
    assert values(unit, "Unit", "ConditionPathExists") == ["!/var/sota/sql.db"]
    assert words(unit, "Service", "SuccessExitStatus") == ["3"]
    assert single(unit, "Service", "Restart") == "on-failure"
    assert int(single(unit, "Service", "RestartSec")) > 0
    # 7: registered, a post-step failed; a rerun cannot redo it: the unit stays failed.
    assert sorted(words(unit, "Service", "RestartPreventExitStatus")) == ["2", "4", "7"]
    assert single(unit, "Unit", "StartLimitIntervalSec") == "0"
    assert words(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_tmpfiles_creates_the_sota_dir_the_sandbox_needs(tmp_path: Path, unit: Unit) -> None:
    # ReadWritePaths=/var/sota fails the unit's start when /var/sota is missing.
    tool = require_tool("systemd-tmpfiles")
    proc = run([tool, f"--root={tmp_path}", "--create", str(TMPFILES)])
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert stat.S_IMODE((tmp_path / "var/sota").stat().st_mode) == 0o755
    assert "/var/sota" in words(unit, "Service", "ReadWritePaths")


def test_unit_hardening_keeps_what_the_agent_needs(unit: Unit) -> None:
    # Runs as root: /var/sota is root's, and PID 1 lets root start services over D-Bus.
    assert values(unit, "Service", "User") in ([], ["root"])
    assert values(unit, "Service", "DynamicUser") in ([], ["no"])
    assert values(unit, "Service", "PrivateUsers") in ([], ["no"])
    # Writes the sota dir (files, lock, pending identity) under a read-only OS.
    assert single(unit, "Service", "ProtectSystem") == "strict"
    assert "/var/sota" in words(unit, "Service", "ReadWritePaths")
    assert "/var/sota" not in words(unit, "Service", "InaccessiblePaths")
    # D-Bus and the journal (AF_UNIX), the server (AF_INET, AF_INET6).
    families = words(unit, "Service", "RestrictAddressFamilies")
    assert families and not families[0].startswith("~")
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert values(unit, "Service", "PrivateNetwork") in ([], ["no"])
    assert values(unit, "Service", "IPAddressDeny") == []
    # An HSM module opens a TPM, an OP-TEE or a USB device.
    assert values(unit, "Service", "PrivateDevices") in ([], ["no"])
    allowed = {v.split()[0] for v in values(unit, "Service", "DeviceAllow")}
    assert {"char-tpmrm", "char-tee", "char-usb_device"} <= allowed
    assert all(v.split()[1] == "rw" for v in values(unit, "Service", "DeviceAllow"))
    # No filter may take away the calls that networking and child processes need.
    assert all(
        not f.startswith("~") or not {"@network-io", "@process"} & set(f[1:].split())
        for f in values(unit, "Service", "SystemCallFilter")
    )


# --- the default file ------------------------------------------------------------------------


def default_lines() -> list[str]:
    return DEFAULT_FILE.read_text().splitlines()


@pytest.mark.parametrize("name", SETTINGS)
def test_default_file_explains_every_setting(name: str) -> None:
    lines = default_lines()
    shown = [i for i, line in enumerate(lines) if re.fullmatch(rf"#{name}=\S*", line)]
    assert len(shown) == 1, f"{name} should appear once, as a commented-out example"
    above = lines[shown[0] - 1]
    assert above.startswith("# ") and len(above) > 10, f"{name} has no explanation above it"


def test_default_file_sets_nothing() -> None:
    # PRODUCTION= (even empty) means production to the agent and to systemd's environment:
    # the shipped file must only show examples, never set anything.
    active = [line for line in default_lines() if line.strip() and not line.startswith("#")]
    assert active == []


# --- the recipe ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe() -> Path:
    assert len(RECIPES) == 1, f"expected one recipe in recipe/, found {RECIPES}"
    return RECIPES[0]


def oelint_adv(recipe: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("oelint-adv")
    # The series the recipe is for (docs/adopting.md); only the rule that pings HOMEPAGE
    # over the network is suppressed.
    argv = [tool, "--release", "wrynose", "--quiet", "--suppress", "oelint.vars.homepageping"]
    return run([*argv, str(recipe)], cwd=recipe.parent)


def test_oelint_adv_is_clean(recipe: Path) -> None:
    proc = oelint_adv(recipe)
    findings = re.findall(r".*:(?:info|warning|error):.*", proc.stdout + proc.stderr)
    assert proc.returncode == 0 and not findings, "\n".join(findings) or proc.stderr


def test_oelint_adv_reports_a_broken_recipe(tmp_path: Path, recipe: Path) -> None:
    broken = tmp_path / recipe.name
    broken.write_text(recipe.read_text().replace('RDEPENDS:${PN} += "', 'RDEPENDS += " ', 1))
    assert oelint_adv(broken).returncode != 0


def srcrev(recipe: Path) -> str:
    match = re.search(r'^SRCREV = "([0-9a-f]{40})"$', recipe.read_text(), re.M)
    assert match, f"{recipe.name} names no 40-hex SRCREV"
    return match.group(1)


def srcrev_problem(repo: Path, commit: str) -> tuple[str, bool]:
    """Why `commit` is not an ancestor of the checkout's HEAD ("" when it is), and whether the
    checkout itself is to blame (not a git clone, or a shallow one without the commit)."""
    git = require_tool("git")

    def ask(*argv: str) -> subprocess.CompletedProcess[str]:
        return run([git, "-C", str(repo), *argv])

    if ask("rev-parse", "--git-dir").returncode != 0:
        return f"{repo} is not a git checkout", True
    if ask("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        if ask("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
            return f"shallow clone without {commit}: git fetch --unshallow", True
        return f"{commit} is not a commit of this repository", False
    if ask("merge-base", "--is-ancestor", commit, "HEAD").returncode != 0:
        return f"{commit} is not an ancestor of HEAD: the recipe would not build this tree", False
    return "", False


def test_srcrev_is_a_commit_of_this_history(recipe: Path) -> None:
    """The recipe builds what the branch is: SRCREV names an ancestor of HEAD. A checkout
    that cannot tell (no git, shallow) skips here and fails in CI, which clones in full."""
    problem, checkout_to_blame = srcrev_problem(ROOT, srcrev(recipe))
    if checkout_to_blame and not os.environ.get("CI"):
        pytest.skip(problem)
    assert not problem, problem


def test_srcrev_check_refuses_a_commit_off_the_history(tmp_path: Path) -> None:
    git = require_tool("git")
    repo = tmp_path / "repo"
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.com"]

    def commit(message: str) -> str:
        run([git, "-C", str(repo), *ident, "commit", "-q", "--allow-empty", "-m", message],
            check=True)
        return run([git, "-C", str(repo), "rev-parse", "HEAD"], check=True).stdout.strip()

    run([git, "init", "-q", "-b", "main", str(repo)], check=True)
    base = commit("base")
    run([git, "-C", str(repo), "checkout", "-q", "-b", "side"], check=True)
    side = commit("side")
    run([git, "-C", str(repo), "checkout", "-q", "main"], check=True)
    commit("main")
    assert srcrev_problem(repo, base) == ("", False)
    assert "not an ancestor of HEAD" in srcrev_problem(repo, side)[0]
    assert srcrev_problem(repo, "0" * 40) == (f"{'0' * 40} is not a commit of this repository",
                                              False)
    assert srcrev_problem(tmp_path, base) == (f"{tmp_path} is not a git checkout", True)
    shallow = tmp_path / "shallow"
    run([git, "clone", "-q", "--depth", "1", f"file://{repo}", str(shallow)], check=True)
    assert srcrev_problem(shallow, base) == (
        f"shallow clone without {base}: git fetch --unshallow", True)


def require_module(name: str) -> types.ModuleType:
    """Import `name`; like require_tool, a missing module fails in CI and skips elsewhere."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"required module {name!r} is not installed")
        pytest.skip(f"required module {name!r} is not installed")


class ParsedRecipe:
    """The recipe as oelint-parser reads it."""

    def __init__(self, path: Path) -> None:
        stash_mod = require_module("oelint_parser.cls_stash")
        item_mod = require_module("oelint_parser.cls_item")
        self.path = str(path)
        self.stash = stash_mod.Stash(quiet=True)
        self.stash.AddFile(self.path)
        self.stash.Finalize()
        self.items = item_mod

    def var(self, name: str, sub: str = "") -> list[str]:
        found = self.stash.GetItemsFor(
            filename=self.path,
            classifier=self.items.Variable.CLASSIFIER,
            attribute=self.items.Variable.ATTR_VAR,
            attributeValue=name,
        )
        return [w for v in found if v.SubItem == sub for w in v.get_items()]

    def defaults(self) -> dict[str, str]:
        """The recipe's own LMP_* variables, as a build without overrides sees them."""
        found = self.stash.GetItemsFor(
            filename=self.path, classifier=self.items.Variable.CLASSIFIER
        )
        return {v.VarName: v.VarValueStripped for v in found if v.VarName.startswith("LMP_")}

    def inherits(self) -> list[str]:
        found = self.stash.GetItemsFor(filename=self.path, classifier=self.items.Inherit.CLASSIFIER)
        return [w for i in found for w in i.get_items()]

    def raw(self, classifier: str, name: str) -> str:
        found = [
            f.RealRaw
            for f in self.stash.GetItemsFor(filename=self.path, classifier=classifier)
            if f.FuncName == name
        ]
        assert len(found) == 1, f"{name} defined {len(found)} times"
        return str(found[0])

    def function(self, name: str) -> str:
        return self.raw(self.items.Function.CLASSIFIER, name)

    def python_def(self, name: str) -> str:
        return self.raw(self.items.PythonBlock.CLASSIFIER, name)


@pytest.fixture(scope="module")
def parsed(recipe: Path) -> ParsedRecipe:
    return ParsedRecipe(recipe)


def install_script(parsed: ParsedRecipe) -> str:
    text = parsed.function("do_install")
    assert text.startswith("do_install:append() {\n") and text.rstrip().endswith("}")
    return text.split("\n", 1)[1].rstrip().removesuffix("}")


def test_recipe_agrees_with_unit_and_pyproject(parsed: ParsedRecipe, unit: Unit) -> None:
    assert parsed.var("SYSTEMD_SERVICE", "${PN}") == [UNIT_NAME]
    assert {"python_setuptools_build_meta", "systemd"} <= set(parsed.inherits())
    script = install_script(parsed)
    # The unit the recipe installs is this one, under the name systemd is told about.
    assert (
        f"${{S}}/systemd/{UNIT_NAME} \\\n        ${{D}}${{systemd_system_unitdir}}/{UNIT_NAME}"
        in script
    )
    # The default file lands where the agent reads it.
    env_file = str(DEFAULTS_FILE)
    default_src = "${S}/systemd/" + DEFAULT_FILE.name
    assert f"{default_src} \\\n        ${{D}}${{sysconfdir}}/{env_file[len('/etc/') :]}" in script
    # ExecStart runs the console script that the PEP 517 build puts in ${bindir}.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_start_path(unit) in {f"/usr/bin/{name}" for name in scripts}
    assert exec_start_path(unit) == "/usr/bin/lmp-device-auto-register"


def test_recipe_replaces_the_shell_script_package(parsed: ParsedRecipe) -> None:
    for var in ("RPROVIDES", "RREPLACES", "RCONFLICTS"):
        assert "lmp-device-auto-register" in parsed.var(var, "${PN}"), var
    rdepends = set(parsed.var("RDEPENDS", "${PN}"))
    assert {"python3-requests", "python3-cryptography", "python3-systemd"} <= rdepends
    assert {"python3-json", "python3-logging", "python3-io", "python3-tomllib"} <= rdepends


def test_recipe_is_for_wrynose(parsed: ParsedRecipe) -> None:
    # wrynose's bitbake.conf sets S for a git checkout and refuses a recipe that sets it.
    assert parsed.var("S") == []
    assert parsed.var("RDEPENDS", "${PN}").count("python3-core") == 1


def test_recipe_recommends_meta_pythons_pkcs11(parsed: ParsedRecipe) -> None:
    """HSM mode uses meta-python's python3-pkcs11 (0.7.0 in wrynose): recommended, not
    required, and no recipe of our own for the same module, which would clash with it."""
    assert parsed.var("RRECOMMENDS", "${PN}") == ["python3-pkcs11"]
    assert "python3-pkcs11" not in parsed.var("RDEPENDS", "${PN}")
    assert sorted((ROOT / "recipe").iterdir()) == RECIPES
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in ("hsm", "test"):
        [wanted] = [r for r in extras[extra] if r.startswith("python-pkcs11")]
        oldest = tuple(int(n) for n in wanted.removeprefix("python-pkcs11>=").split("."))
        assert oldest <= (0, 7, 0), f"the {extra} extra refuses meta-python's 0.7.0: {wanted}"


def test_without_pkcs11_the_hsm_error_names_the_package_the_recipe_recommends(
        parsed: ParsedRecipe, tmp_path: Path) -> None:
    """An image built without the recommended package tells its user which package to add:
    the one the recipe names, as a bitbake user would type it."""
    from lmp_autoreg.testing.device import FakeDevice

    device = FakeDevice(tmp_path, hsm={"HSM_MODULE": "/nonexistent.so", "HSM_PIN": "1234",
                                       "HSM_SOPIN": "1234"}).build()
    hidden = "import sys; sys.modules['pkcs11'] = None; from lmp_autoreg.cli import run; run()"
    proc = subprocess.run(
        [sys.executable, "-c", hidden, "--sysroot", str(device.root), "--device-api",
         "https://192.0.2.1/sign", "--dry-run", "--json"],
        capture_output=True, text=True, timeout=60, env=clean_env(), stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    message = json.loads(proc.stdout)["error"]["message"]
    [package] = parsed.var("RRECOMMENDS", "${PN}")
    assert f"({package})" in message and "lmp-autoreg[hsm]" in message


def test_recipe_license_checksum_matches(parsed: ParsedRecipe) -> None:
    (entry,) = parsed.var("LIC_FILES_CHKSUM")
    name, *params = entry.removeprefix("file://").split(";")
    opts = dict(p.split("=", 1) for p in params)
    text = (ROOT / name).read_bytes()
    assert hashlib.md5(text).hexdigest() == opts["md5"]
    assert text.startswith(b"BSD 3-Clause License") and parsed.var("LICENSE") == ["BSD-3-Clause"]
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {
        "file": "LICENSE"
    }


# --- the recipe's install logic, run for real ------------------------------------------------


class FakeDatastore:
    """The part of bitbake's datastore `d` that the recipe's functions use."""

    def __init__(self, variables: dict[str, str]) -> None:
        self.variables = variables

    def getVar(self, name: str) -> str | None:  # noqa: N802 - bitbake's name
        value = self.variables.get(name)
        return None if value is None else self.expand(value)

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: self.getVar(m.group(1)) or "", text)


def run_recipe_install(
    parsed: ParsedRecipe, tmp_path: Path, settings: dict[str, str]
) -> tuple[Path, list[str]]:
    """Run do_install:append and the python postfunc of the recipe; return ${D} and warnings."""
    src = tmp_path / "git"
    (src / "systemd").mkdir(parents=True)
    for f in (UNIT, DEFAULT_FILE, TMPFILES):
        (src / "systemd" / f.name).write_bytes(f.read_bytes())
    dest = tmp_path / "image"
    variables = {
        "S": str(src),
        "D": str(dest),
        "sysconfdir": "/etc",
        "systemd_system_unitdir": "/usr/lib/systemd/system",
        "nonarch_libdir": "/usr/lib",
        **parsed.defaults(),
        **settings,
    }
    d = FakeDatastore(variables)
    script = d.expand(install_script(parsed))
    proc = run(["sh", "-e", "-c", script])
    assert proc.returncode == 0, proc.stderr

    warnings: list[str] = []
    namespace: dict[str, Any] = {"bb": types.SimpleNamespace(warn=warnings.append)}
    for name in ("lmp_autoreg_settings", "lmp_autoreg_token"):
        exec(parsed.python_def(name), namespace)
    task = parsed.function("lmp_autoreg_install_settings")
    assert task.startswith("python lmp_autoreg_install_settings() {\n")
    body = task.split("\n", 1)[1].rstrip().removesuffix("}")
    exec("def lmp_autoreg_install_settings(d):\n" + body, namespace)
    postfunc: Callable[[FakeDatastore], None] = namespace["lmp_autoreg_install_settings"]
    postfunc(d)
    return dest, warnings


def added_settings(dest: Path) -> list[str]:
    text = (dest / "etc/default/lmp-device-auto-register").read_text()
    assert text.startswith(DEFAULT_FILE.read_text())
    return text[len(DEFAULT_FILE.read_text()) :].splitlines()


TOKEN = "ci-token-0123456789abcdef"


def test_install_without_token(parsed: ParsedRecipe, tmp_path: Path) -> None:
    dest, warnings = run_recipe_install(parsed, tmp_path, {})
    assert (dest / "usr/lib/systemd/system" / UNIT_NAME).read_bytes() == UNIT.read_bytes()
    assert (dest / "usr/lib/tmpfiles.d/lmp-autoreg.conf").read_bytes() == TMPFILES.read_bytes()
    assert added_settings(dest) == []  # only what differs from the agent's defaults
    assert not (dest / "etc/lmp-device-register-token").exists()
    assert warnings == []


def test_install_token_for_a_non_production_image(parsed: ParsedRecipe, tmp_path: Path) -> None:
    dest, warnings = run_recipe_install(parsed, tmp_path, {"LMP_DEVICE_REGISTER_TOKEN": TOKEN})
    token_file = dest / "etc/lmp-device-register-token"
    assert token_file.read_text() == TOKEN + "\n"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert not any(line.startswith("PRODUCTION") for line in added_settings(dest))
    assert warnings == []


def test_no_token_in_a_production_image(parsed: ParsedRecipe, tmp_path: Path) -> None:
    settings = {
        "LMP_DEVICE_REGISTER_TOKEN": TOKEN,
        "LMP_AUTOREG_PRODUCTION": "1",
        "LMP_AUTOREG_DEVICE_API": "http://10.0.0.5/sign",
        "LMP_AUTOREG_USE_HOSTNAME": "1",
        "LMP_AUTOREG_START_SERVICES": "",
        "LMP_AUTOREG_FIOCONFIG": "off",
        "LMP_AUTOREG_POWEROFF": "1",
    }
    dest, warnings = run_recipe_install(parsed, tmp_path, settings)
    assert not (dest / "etc/lmp-device-register-token").exists()
    assert TOKEN not in "".join(p.read_text() for p in dest.rglob("*") if p.is_file())
    assert len(warnings) == 1 and "LMP_AUTOREG_PRODUCTION" in warnings[0]
    assert added_settings(dest) == [
        "DEVICE_API=http://10.0.0.5/sign",
        "PRODUCTION=1",
        "USE_HOSTNAME=1",
        "START_SERVICES=",
        "FIOCONFIG=off",
        "POWEROFF=1",
    ]


def test_blank_token_installs_nothing(parsed: ParsedRecipe, tmp_path: Path) -> None:
    dest, _ = run_recipe_install(parsed, tmp_path, {"LMP_DEVICE_REGISTER_TOKEN": "  "})
    assert not (dest / "etc/lmp-device-register-token").exists()
