"""Cold-process benchmark of the agent, beside the interpreter's own floor.

Every agent run is a fresh process registering (or checking) a fresh simulated device
against the test kit's loopback HTTP server, started here in-process. Each agent run is
paired with a run of its baseline (``python -c pass``, the import floor
``python -c "import requests, cryptography.x509"``, or ``python -c "from cryptography
import x509"``) by the same interpreter, interleaved, so that the per-run ratio compares two
processes that saw the same machine load; the reported ratio is the median of those
per-run ratios. Wall time, CPU time (the child's user + system time) and peak RSS come from
``os.wait4``, in a small helper process that starts the children (see ``LAUNCHER``).

The interpreter: by default a throwaway venv of the running Python that sees this checkout
and the running interpreter's site-packages through a plain ``.pth`` path file, with the
console script ``lmp-device-auto-register`` as pip writes it, that is: what a device has.
(An editable install adds an import hook to *every* start-up of its interpreter, ``python
-c pass`` included, about 10 ms of imports a device never pays.) ``--python PY`` measures
``PY -m lmp_autoreg`` with that interpreter as it is instead.

Usage: ``python bench/run.py [--runs N] [--check] [--only A,B] [--skip A,B] [--long]
[--compare 'COMMAND'] [--out DIR]``; ``--list`` names the scenarios. See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import uuid as uuidlib
import venv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lmp_autoreg.testing.device import FakeDevice  # noqa: E402
from lmp_autoreg.testing.server import RegistrationServer  # noqa: E402

SCRIPT = "lmp-device-auto-register"
# The agent's settings variables and systemd's: a run starts from none of them.
AGENT_ENV = {
    "DEVICE_API", "PRODUCTION", "DEVICE_FACTORY", "HARDWARE_ID", "USE_HOSTNAME", "APPS",
    "DEVICE_GROUP", "TOKEN_FILE", "SOTA_DIR", "BACKEND", "LMP_DEVICE_REGISTER", "FIOCONFIG",
    "FIOCONFIG_BIN", "START_SERVICES", "POWEROFF", "REGISTRATION_TIMEOUT", "CACERT",
    "TOKEN_HEADER", "NOTIFY_SOCKET", "JOURNAL_STREAM",
}
BASELINES = {
    "pass": "pass",
    "import floor": "import requests, cryptography.x509",
    "x509": "from cryptography import x509",
}
RECOVERY_DELAY = 3.0
# The HSM scenario: a fresh SoftHSM2 token per run (made before the run, not measured).
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
BENCH_PIN, BENCH_SO_PIN = "bench-pin-1234", "bench-so-pin-5678"
LONG_RECOVERY_DELAY = 60.0
RECOVERY_LIMIT = 2.0
# Budgets (docs/performance.md): (scenario, metric, limit). Ratios are medians of per-run ratios.
BUDGETS: list[tuple[str, str, float]] = [
    ("happy", "wall_ratio", 1.25),
    ("happy", "rss_ratio", 1.25),
    ("registered", "wall_ratio", 2.5),
    ("help", "wall_ratio", 2.5),
    ("status", "wall_ratio", 1.3),
    ("recovery", "after_listen_max_s", RECOVERY_LIMIT),
    ("recovery-60", "after_listen_max_s", RECOVERY_LIMIT),
]
# The console script as pip writes it for the entry point of pyproject.toml.
CONSOLE_SCRIPT = """\
#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from {module} import {function}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({function}())
"""


# -- measuring one process -----------------------------------------------------------------


@dataclass
class Sample:
    wall: float  # seconds, fork to reap
    cpu: float  # seconds, user + system
    rss: int  # KiB, peak resident set
    rc: int
    end: float  # time.monotonic() when it was reaped
    stdout: str
    stderr: str


# The measured processes are started by this small helper process, not by the bench itself:
# Linux counts the RSS a child had between fork and exec (a copy of its parent's) into its
# peak RSS, so a fat parent would inflate every figure. Run with -S -I, the helper is about
# 10 MiB and its children's pre-exec share stays below 5 MiB, under any Python's own peak.
LAUNCHER = """
import json, os, sys, time
for line in sys.stdin:
    job = json.loads(line)
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
            os.dup2(os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
            os.execvpe(job["argv"][0], job["argv"], job["env"])
        except BaseException as e:
            os.write(2, f"cannot run {job['argv'][0]}: {e}\\n".encode())
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall, end = time.perf_counter() - start, time.monotonic()
    result = {"wall": wall, "end": end, "cpu": usage.ru_utime + usage.ru_stime,
              "rss": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}
    sys.stdout.write(json.dumps(result) + "\\n")
    sys.stdout.flush()
"""


class Launcher:
    """Runs commands one at a time through the helper process; see LAUNCHER."""

    def __init__(self, python: str, work: Path) -> None:
        self.out = work / "stdout"
        self.err = work / "stderr"
        self.proc = subprocess.Popen(
            [python, "-S", "-I", "-c", LAUNCHER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
        )

    def measure(self, argv: list[str], env: dict[str, str]) -> Sample:
        """Run ``argv`` to its end: its wall and CPU time and peak RSS, from ``os.wait4``."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        job = {"argv": argv, "env": env, "out": str(self.out), "err": str(self.err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the launcher process died")
        result = json.loads(line)
        return Sample(
            wall=result["wall"],
            cpu=result["cpu"],
            rss=result["rss"],
            rc=result["rc"],
            end=result["end"],
            stdout=self.out.read_text(encoding="utf-8", errors="replace"),
            stderr=self.err.read_text(encoding="utf-8", errors="replace"),
        )

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def child_env() -> dict[str, str]:
    """The environment of every measured process: no PYTHON* and no agent variables."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k not in AGENT_ENV
    }


# -- the interpreter and the agent command --------------------------------------------------


@dataclass
class Interpreter:
    python: str
    agent: list[str]  # the agent command, before its arguments
    description: str


def plain_install(root: Path) -> Interpreter:
    """A venv seeing this checkout and our site-packages via a plain path file, no hooks."""
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "lmp-autoreg-bench.pth").write_text(
        "\n".join([str(REPO), *sorted(ours)]) + "\n", encoding="utf-8"
    )
    with open(REPO / "pyproject.toml", "rb") as f:
        entry = tomllib.load(f)["project"]["scripts"][SCRIPT]
    module, _, function = entry.partition(":")
    script = root / "bin" / SCRIPT
    script.write_text(
        CONSOLE_SCRIPT.format(python=python, module=module, function=function), encoding="utf-8"
    )
    script.chmod(0o755)
    return Interpreter(
        str(python), [str(script)], f"{sys.executable} (plain venv view), agent: {SCRIPT}"
    )


def as_given(python: str) -> Interpreter:
    return Interpreter(python, [python, "-m", "lmp_autoreg"], f"{python}, agent: -m lmp_autoreg")


def compile_package(python: str) -> None:
    """Write the package's bytecode once, as an installed package has it.

    (With PYTHONDONTWRITEBYTECODE set, every run would compile the sources again.)
    """
    subprocess.run(
        [python, "-m", "compileall", "-q", str(REPO / "lmp_autoreg")],
        env=child_env(), check=True, stdout=subprocess.DEVNULL,
    )


# -- scenarios -----------------------------------------------------------------------------


@dataclass
class Case:
    """One agent run to make: its arguments, and a check of its outcome (None when fine)."""

    argv: list[str]
    check: Callable[[Sample], str | None]
    server: RegistrationServer | None = None  # a server of this run only (recovery)
    env: dict[str, str] | None = None  # None: the usual clean environment


@dataclass
class Scenario:
    name: str
    title: str
    baseline: str | None  # a key of BASELINES; None: unpaired
    prepare: Callable[[int], Case]
    runs: int
    warmup: bool = True  # the recovery runs take seconds each: those go without


@dataclass
class Outcome:
    scenario: Scenario
    agent: list[Sample] = field(default_factory=list)
    baseline: list[Sample] = field(default_factory=list)
    after_listen: list[float] = field(default_factory=list)
    failure: str | None = None


def _json_of(sample: Sample) -> dict[str, Any] | None:
    try:
        data = json.loads(sample.stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _last_line(text: str, limit: int = 160) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "(no output)"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def expect(rc: int, **fields: Any) -> Callable[[Sample], str | None]:
    """A check: exit code ``rc`` and, when given, these fields in the JSON on stdout."""

    def check(sample: Sample) -> str | None:
        if sample.rc != rc:
            return f"exit {sample.rc}, expected {rc}: {_last_line(sample.stderr)}"
        if fields:
            data = _json_of(sample)
            if data is None:
                return "no JSON object on stdout"
            for key, want in fields.items():
                got = data.get(key)
                if callable(want) and not want(got) or not callable(want) and got != want:
                    return f"JSON {key} = {got!r}"
        return None

    return check


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, interp: Interpreter) -> None:
        self.args = args
        self.work = work
        self.interp = interp
        self.env = child_env()
        self.launcher = Launcher(interp.python, work)
        self.server = RegistrationServer().start()
        self.devices = 0
        # The already-registered and status scenarios share one device registered up front.
        self.registered: tuple[FakeDevice, str] | None = None

    def close(self) -> None:
        self.server.stop()
        self.launcher.close()

    def device(self, **options: Any) -> FakeDevice:
        """A fresh simulated device (FakeDevice's defaults unless ``options`` say otherwise)."""
        self.devices += 1
        return FakeDevice(self.work / "devices" / str(self.devices), **options).build()

    def register_args(
        self, device: FakeDevice, url: str, *, timeout: float = 30, as_json: bool = True
    ) -> list[str]:
        return [
            *self.interp.agent, "--sysroot", str(device.root), "--device-api", url,
            "--fioconfig", "off", "--no-start", "--timeout", str(timeout),
            *(["--json"] if as_json else []),
        ]

    def _registered_device(self) -> tuple[FakeDevice, str]:
        """The shared registered device, and its uuid."""
        if self.registered is None:
            device = self.device()
            sample = self.launcher.measure(self.register_args(device, self.server.url), self.env)
            data = _json_of(sample)
            if sample.rc != 0 or data is None:
                raise RuntimeError(f"could not register the shared device: {sample.stderr}")
            self.registered = (device, data["uuid"])
        return self.registered

    def scenarios(self) -> list[Scenario]:
        runs = self.args.runs
        items = [
            Scenario("happy", "happy path", "import floor", self._happy, runs),
            Scenario("registered", "already registered", "pass", self._already, runs),
            Scenario("status", "status", "x509", self._status, runs),
            Scenario("dry-run", "--dry-run", "import floor", self._dry_run, runs),
            Scenario("help", "--help", "pass", self._help, runs),
            Scenario("apps1000", "1000 compose apps", "import floor", self._apps1000, runs),
            Scenario("hsm", "HSM (SoftHSM2 token)", "import floor", self._hsm, runs),
            Scenario(
                "recovery", f"recovery ({RECOVERY_DELAY:g} s outage)", None,
                self._recovery(RECOVERY_DELAY), self.args.recovery_runs, warmup=False,
            ),
        ]
        if self.args.long:
            items.append(Scenario(
                "recovery-60", f"recovery ({LONG_RECOVERY_DELAY:g} s outage)", None,
                self._recovery(LONG_RECOVERY_DELAY), 1, warmup=False,
            ))
        if self.args.compare:
            items.append(Scenario(
                "compare", f"compare: {self.args.compare}", "import floor", self._compare, runs
            ))
        return items

    def _happy(self, i: int) -> Case:
        device = self.device()
        return Case(self.register_args(device, self.server.url), expect(0, result="registered"))

    def _already(self, i: int) -> Case:
        # As the systemd unit runs it: no --json (which would add the json import, ~1 ms).
        device, uuid = self._registered_device()

        def check(sample: Sample) -> str | None:
            if sample.rc != 3 or f"uuid {uuid}" not in sample.stderr:
                return f"exit {sample.rc}, expected 3 naming uuid {uuid}: {sample.stderr.strip()}"
            return None

        return Case(self.register_args(device, self.server.url, as_json=False), check)

    def _status(self, i: int) -> Case:
        device, uuid = self._registered_device()
        argv = [*self.interp.agent, "status", "--sysroot", str(device.root), "--json"]
        return Case(argv, expect(0, registered=True, uuid=uuid))

    def _dry_run(self, i: int) -> Case:
        device = self.device()
        return Case(
            [*self.register_args(device, self.server.url), "--dry-run"], expect(0, result="dry-run")
        )

    def _help(self, i: int) -> Case:
        def check(sample: Sample) -> str | None:
            if sample.rc != 0 or "usage:" not in sample.stdout:
                return f"exit {sample.rc}, no usage text: {_last_line(sample.stderr)}"
            return None

        return Case([*self.interp.agent, "--help"], check)

    def _apps1000(self, i: int) -> Case:
        device = self.device(apps=[f"app{n:04d}" for n in range(1000)])
        check = expect(0, result="registered", apps=lambda apps: len(apps or ()) == 1000)
        return Case(self.register_args(device, self.server.url), check)

    def _hsm(self, i: int) -> Case:
        """A registration whose key is generated on a fresh SoftHSM2 token."""
        store = self.work / "softhsm" / str(self.devices + 1)
        (store / "tokens").mkdir(parents=True)
        conf = store / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {store / 'tokens'}\n"
                        "objectstore.backend = file\nlog.level = ERROR\n", encoding="utf-8")
        env = {**self.env, "SOFTHSM2_CONF": str(conf)}
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "aktualizr",
                        "--pin", BENCH_PIN, "--so-pin", BENCH_SO_PIN],
                       env=env, check=True, capture_output=True)
        device = self.device(hsm={"HSM_MODULE": SOFTHSM_MODULE, "HSM_PIN": BENCH_PIN,
                                  "HSM_SOPIN": BENCH_SO_PIN})
        return Case(self.register_args(device, self.server.url), expect(0, result="registered"),
                    env=env)

    def _recovery(self, delay: float) -> Callable[[int], Case]:
        def prepare(i: int) -> Case:
            device = self.device()
            server = RegistrationServer(listen_delay=delay)
            # The port is bound now (connections are refused) and listens after ``delay``.
            server.start()
            argv = self.register_args(device, server.url, timeout=delay + 60)
            return Case(argv, expect(0, result="registered"), server)

        return prepare

    def compare_values(self, device: FakeDevice) -> dict[str, str]:
        return {
            "python": self.interp.python,
            "url": self.server.url,
            "sysroot": str(device.root),
            "sota": str(device.sota),
            "token_file": str(device.path("/etc/lmp-device-register-token")),
            "token": device.token or "",
            "factory": device.factory or "",
            "hwid": device.machine or "",
            "tag": device.tag or "",
            "uuid": str(uuidlib.uuid4()),
        }

    def _compare(self, i: int) -> Case:
        device = self.device()
        values = self.compare_values(device)
        argv = [word.format(**values) for word in shlex.split(self.args.compare)]
        env = {
            **self.env,
            "DEVICE_API": values["url"],
            **{f"BENCH_{key.upper()}": value for key, value in values.items()},
        }
        return Case(argv, expect(0), env=env)

    # -- running ---------------------------------------------------------------------------

    def baseline_argv(self, name: str) -> list[str]:
        return [self.interp.python, "-c", BASELINES[name]]

    def run(self, scenario: Scenario) -> Outcome:
        outcome = Outcome(scenario)
        base_argv = self.baseline_argv(scenario.baseline) if scenario.baseline else None
        warmup = self.args.warmup if scenario.warmup else 0
        for i in range(-warmup, scenario.runs):
            try:
                case = scenario.prepare(i)
            except Exception as e:  # a broken scenario must not hide the others
                outcome.failure = f"could not prepare: {type(e).__name__}: {e}"
                return outcome
            base: Sample | None = None
            try:
                # Alternate the order, so that neither side always runs first.
                if base_argv and i % 2:
                    base = self.launcher.measure(base_argv, self.env)
                sample = self.launcher.measure(case.argv, case.env or self.env)
                if base_argv and base is None:
                    base = self.launcher.measure(base_argv, self.env)
            finally:
                if case.server is not None:
                    case.server.stop()
            problem = case.check(sample)
            if problem is None and case.server is not None:
                since = case.server.listening_since
                if since is None or sample.end < since:
                    problem = "the agent finished before the server listened"
                elif i >= 0:
                    outcome.after_listen.append(sample.end - since)
            if problem is not None:
                outcome.failure = f"run {max(i, 0) + 1}: {problem}"
                return outcome
            if base is not None and base.rc != 0:
                outcome.failure = f"baseline failed: {_last_line(base.stderr)}"
                return outcome
            if i < 0:
                continue  # warm-up
            outcome.agent.append(sample)
            if base is not None:
                outcome.baseline.append(base)
        return outcome


# -- results -------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(outcome: Outcome) -> dict[str, Any]:
    s = outcome.scenario
    agent, base = outcome.agent, outcome.baseline
    row: dict[str, Any] = {
        "name": s.name,
        "title": s.title,
        "runs": len(agent),
        "ok": outcome.failure is None,
        "failure": outcome.failure,
        "baseline": s.baseline,
        "baseline_command": BASELINES.get(s.baseline or ""),
        "wall_ms": _ms(_median([x.wall for x in agent])),
        "cpu_ms": _ms(_median([x.cpu for x in agent])),
        "rss_mib": _mib(_median([x.rss for x in agent])),
        "samples": [
            {"wall_ms": x.wall * 1e3, "cpu_ms": x.cpu * 1e3, "rss_kib": x.rss} for x in agent
        ],
    }
    if base:
        pairs = list(zip(agent, base, strict=True))
        row.update(
            baseline_wall_ms=_ms(_median([b.wall for b in base])),
            baseline_cpu_ms=_ms(_median([b.cpu for b in base])),
            baseline_rss_mib=_mib(_median([b.rss for b in base])),
            wall_ratio=_median([a.wall / b.wall for a, b in pairs]),
            cpu_ratio=_median([a.cpu / b.cpu for a, b in pairs if b.cpu > 0]),
            rss_ratio=_median([a.rss / b.rss for a, b in pairs]),
            baseline_samples=[
                {"wall_ms": x.wall * 1e3, "cpu_ms": x.cpu * 1e3, "rss_kib": x.rss} for x in base
            ],
        )
    if outcome.after_listen:
        row.update(
            after_listen_median_s=_median(outcome.after_listen),
            after_listen_max_s=max(outcome.after_listen),
        )
    row["budgets"] = []
    for name, metric, limit in BUDGETS:
        if name != s.name:
            continue
        value = row.get(metric)
        met = value is not None and value <= limit and outcome.failure is None
        row["budgets"].append({"metric": metric, "limit": limit, "value": value, "met": met})
    return row


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _budget_text(budget: dict[str, Any]) -> str:
    metric, limit = budget["metric"], budget["limit"]
    if metric == "after_listen_max_s":
        what = f"≤ {limit:g} s after listen"
    else:
        what = f"{metric.removesuffix('_ratio')} ≤ {limit:g}×"
    return f"{what} {'✓' if budget['met'] else '✗'}"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | runs | wall ms | CPU ms | peak RSS MiB | baseline "
        "| × baseline: wall / CPU / RSS | budget |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        if not row["ok"]:
            lines.append(f"| {row['title']} | | failed: {row['failure']} | | | | | |")
            continue
        if row.get("wall_ratio") is not None:
            ratios = " / ".join(
                _fmt(row[k], 2) + "×" for k in ("wall_ratio", "cpu_ratio", "rss_ratio")
            )
        elif row.get("after_listen_max_s") is not None:
            ratios = (f"registered {_fmt(row['after_listen_median_s'], 2)} s after the server "
                      f"listened (max {_fmt(row['after_listen_max_s'], 2)} s)")
        else:
            ratios = ""
        budgets = "; ".join(_budget_text(b) for b in row["budgets"])
        lines.append(
            f"| {row['title']} | {row['runs']} | {_fmt(row['wall_ms'])} | {_fmt(row['cpu_ms'])} "
            f"| {_fmt(row['rss_mib'])} | {row['baseline'] or ''} | {ratios} | {budgets} |"
        )
    if meta["baselines"]:
        lines += [
            "",
            "| baseline | command | wall ms | CPU ms | peak RSS MiB |",
            "|---|---|---:|---:|---:|",
        ]
    for name, stats in meta["baselines"].items():
        lines.append(
            f"| {name} | `python -c \"{BASELINES[name]}\"` | {_fmt(stats['wall_ms'])} "
            f"| {_fmt(stats['cpu_ms'])} | {_fmt(stats['rss_mib'])} |"
        )
    lines += [
        "",
        f"Medians ({meta['date']}, {meta['python']}, {meta['machine']}, "
        f"load {meta['load_before']} → {meta['load_after']}). Ratios are medians of per-run "
        "ratios, each agent run paired with its own baseline run.",
    ]
    return "\n".join(lines) + "\n"


def pooled_baselines(outcomes: list[Outcome]) -> dict[str, dict[str, float | None]]:
    pooled: dict[str, list[Sample]] = {}
    for outcome in outcomes:
        if outcome.scenario.baseline:
            pooled.setdefault(outcome.scenario.baseline, []).extend(outcome.baseline)
    return {
        name: {
            "wall_ms": _ms(_median([x.wall for x in samples])),
            "cpu_ms": _ms(_median([x.cpu for x in samples])),
            "rss_mib": _mib(_median([x.rss for x in samples])),
            "runs": len(samples),
        }
        for name, samples in pooled.items()
        if samples
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="Cold-process benchmark of lmp-device-auto-register."
    )
    parser.add_argument("--runs", type=int, default=10, help="measured runs per scenario (10)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs first (2)")
    parser.add_argument("--recovery-runs", type=int, default=3,
                        help="runs of the recovery scenario, each at least 3 s (3)")
    parser.add_argument("--long", action="store_true", help="add a 60 s outage recovery run")
    parser.add_argument("--only", metavar="A,B", help="run only these scenarios")
    parser.add_argument("--skip", metavar="A,B", help="leave these scenarios out")
    parser.add_argument("--compare", metavar="COMMAND",
                        help="also time COMMAND registering a fresh device against the same "
                        "server; placeholders {url} {sysroot} {sota} {token_file} {token} "
                        "{factory} {hwid} {tag} {uuid} {python}, also in the environment as "
                        "BENCH_URL ... BENCH_PYTHON, plus DEVICE_API")
    parser.add_argument("--python", metavar="PY",
                        help="measure PY -m lmp_autoreg with PY as it is (default: a plain "
                        "venv view of this checkout and its console script)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a scenario fails or a budget is missed")
    parser.add_argument("--out", metavar="DIR", default=str(REPO / "bench" / "results"),
                        help="where latest.json and latest.md go (bench/results)")
    parser.add_argument("--list", action="store_true", help="name the scenarios and exit")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.recovery_runs < 1:
        parser.error("--runs and --recovery-runs must be at least 1, --warmup at least 0")
    return args


def _names(value: str | None) -> set[str]:
    return {n.strip() for n in (value or "").split(",") if n.strip()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="lmp-autoreg-bench-") as tmp:
        work = Path(tmp)
        interp = as_given(args.python) if args.python else plain_install(work / "venv")
        compile_package(interp.python)
        bench = Bench(args, work, interp)
        try:
            scenarios = bench.scenarios()
            known = {s.name for s in scenarios}
            if args.list:
                for s in scenarios:
                    print(f"{s.name:12} {s.title}")
                return 0
            only, skip = _names(args.only), _names(args.skip)
            unknown = (only | skip) - known - {"recovery-60", "compare"}
            if unknown:
                print(f"unknown scenarios: {', '.join(sorted(unknown))} (--list names them)",
                      file=sys.stderr)
                return 2
            chosen = [s for s in scenarios if (not only or s.name in only) and s.name not in skip]
            outcomes = []
            for scenario in chosen:
                print(f"bench: {scenario.title} ...", file=sys.stderr, flush=True)
                outcomes.append(bench.run(scenario))
        finally:
            bench.close()
    rows = [summarize(o) for o in outcomes]
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "python": f"Python {platform.python_version()}",
        "interpreter": interp.description,
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs",
        "runs": args.runs,
        "warmup": args.warmup,
        "load_before": load_before,
        "load_after": _load(),
        "seconds": round(time.monotonic() - started, 1),
        "baselines": pooled_baselines(outcomes),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(meta, rows)
    (out / "latest.json").write_text(
        json.dumps({"meta": meta, "scenarios": rows}, indent=2) + "\n", encoding="utf-8"
    )
    (out / "latest.md").write_text(table, encoding="utf-8")
    print(table)
    missed = [f"{r['title']}: {r['failure']}" for r in rows if not r["ok"]]
    missed += [
        f"{r['title']}: {b['metric']} {_fmt(b['value'], 2)} > {b['limit']:g}"
        for r in rows for b in r["budgets"] if r["ok"] and not b["met"]
    ]
    for line in missed:
        print(f"bench: missed: {line}", file=sys.stderr)
    print(f"bench: {meta['seconds']} s; results in {out}/latest.json and latest.md",
          file=sys.stderr)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
