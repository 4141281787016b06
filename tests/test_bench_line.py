"""The line's benchmark harness (bench/line.py) works: it runs each level, writes its
results and draws its curve. No timing is asserted (the figures are docs/performance.md's,
from ``make bench-line``)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "line.py"


def test_runs_each_level_and_writes_its_table_and_curve(tmp_path):
    run = subprocess.run(
        [sys.executable, str(BENCH), "--devices", "2", "--parallel", "1,2", "--rounds", "1",
         "--out", str(tmp_path), "--plot", str(tmp_path / "curve.png")],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "line.json").read_text())["rows"]
    assert [r["parallel"] for r in rows] == [1, 2]
    assert all(r["devices"] == 2 and 0 < r["kit_server_share"] < 1 for r in rows)
    assert "| 2 | 2 |" in (tmp_path / "line.md").read_text()
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
