"""The benchmark harness (bench/run.py) works: it runs, checks outcomes, writes its results.

No timing is asserted here (this machine is shared and noisy): ``make bench-check`` is the
place for budgets. One or two runs per scenario keep these tests quick.
"""

import json
import subprocess
import sys
from pathlib import Path

from conftest import clean_env, require_tool

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), "--warmup", "0", *args],
        capture_output=True, text=True, env=clean_env(), timeout=timeout,
    )


def results(out: Path) -> dict:
    return json.loads((out / "latest.json").read_text())


def test_runs_scenarios_and_writes_json_and_markdown(tmp_path):
    run = bench("--runs", "2", "--only", "registered,help,status", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    data = results(tmp_path)
    rows = {row["name"]: row for row in data["scenarios"]}
    assert sorted(rows) == ["help", "registered", "status"]
    for row in rows.values():
        assert row["ok"], row["failure"]
        assert row["runs"] == 2 and len(row["samples"]) == len(row["baseline_samples"]) == 2
        assert row["wall_ms"] > 0 and row["cpu_ms"] > 0 and row["rss_mib"] > 0
        assert row["wall_ratio"] > 0 and row["budgets"]
    assert rows["registered"]["baseline"] == "pass" and rows["status"]["baseline"] == "x509"
    # Peak RSS is the child's own, not inflated by the bench process it was forked from.
    baselines = data["meta"]["baselines"]
    assert baselines["pass"]["rss_mib"] < baselines["x509"]["rss_mib"]
    table = (tmp_path / "latest.md").read_text()
    assert "| already registered |" in table and "| --help |" in table
    assert table in run.stdout


def test_compare_fills_placeholders_and_environment(tmp_path):
    # The agent itself as the "other tool": it must register a fresh device every run.
    command = ("{python} -m lmp_autoreg --sysroot {sysroot} --device-api {url} "
               "--fioconfig off --no-start --uuid {uuid} --json")
    run = bench("--runs", "2", "--only", "compare", "--compare", command, "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    [row] = results(tmp_path)["scenarios"]
    assert row["ok"], row["failure"]
    assert row["title"] == f"compare: {command}" and row["baseline"] == "import floor"
    env_probe = "sh -c 'test \"$DEVICE_API\" = \"$BENCH_URL\" && test -d \"$BENCH_SOTA\"'"
    run = bench("--runs", "1", "--only", "compare", "--compare", env_probe, "--check",
                "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr


def test_check_fails_on_a_failing_scenario_but_a_plain_run_does_not(tmp_path):
    args = ("--runs", "1", "--only", "compare", "--compare", "false", "--out", str(tmp_path))
    assert bench(*args).returncode == 0
    run = bench(*args, "--check")
    assert run.returncode == 1
    [row] = results(tmp_path)["scenarios"]
    assert not row["ok"] and "exit 1" in row["failure"]
    assert "missed: compare: false" in run.stderr


def test_unknown_scenario_is_a_usage_error(tmp_path):
    run = bench("--only", "nonesuch", "--out", str(tmp_path))
    assert run.returncode == 2 and "nonesuch" in run.stderr
    listing = bench("--list", "--out", str(tmp_path))
    assert listing.returncode == 0
    names = [line.split()[0] for line in listing.stdout.splitlines()]
    assert names == ["happy", "registered", "status", "dry-run", "help", "apps1000", "hsm",
                     "recovery"]


def test_the_hsm_scenario_registers_with_a_softhsm_token(tmp_path):
    require_tool("softhsm2-util")
    run = bench("--runs", "1", "--only", "hsm", "--check", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    [row] = results(tmp_path)["scenarios"]
    assert row["ok"], row["failure"]
    assert row["baseline"] == "import floor" and row["wall_ratio"] > 0
