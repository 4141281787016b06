"""The factory line (python -m lmp_autoreg.testing line), end to end on small lines: real
agent processes against the kit's server in its own process, with each chaos kind.

Big lines are the benchmark's (bench/line.py, docs/performance.md), never here.
"""

import csv
import io
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from lmp_autoreg.testing.chaos import BURST, SLOW_SECONDS
from lmp_autoreg.testing.line import Line, LineOptions, Progress, Station
from lmp_autoreg.testing.record import COLUMNS

SUMMARY_KEYS = {"registered", "refused", "operator", "duplicates", "orphan_certificates",
                "ghosts", "p50_seconds", "p95_seconds", "max_seconds", "devices_per_minute",
                "chaos"}


def line(tmp_path, devices, **options):
    out = tmp_path / "line"
    with open(tmp_path / "progress.txt", "w") as progress:
        summary = Line(LineOptions(out=out, devices=devices, parallel=2, **options),
                       progress=progress).run()
    records = [json.loads(text) for text in (out / "record.jsonl").read_text().splitlines()]
    return summary, records, out


def test_a_clean_line_registers_each_board_once_and_writes_the_record(tmp_path):
    summary, records, out = line(tmp_path, 3)
    assert summary["passed"], summary["problems"]
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["registered"] == 3 and summary["operator"] == []
    assert [r["board_serial"] for r in records] == [f"LINE0000-0000{i}" for i in range(3)]
    assert len({r["uuid"] for r in records}) == 3
    assert all(r["exit_code"] == 0 and r["attempts"] == 1 for r in records)
    assert all(r["config_files"] == ["line.conf", "motd"] for r in records)
    for r in records:  # the record names the certificate each board holds
        pem = (out / "devices" / f"{r['station']:04d}" / "var/sota/client.pem").read_text()
        assert r["certificate_serial"] and r["uuid"] and r["not_after"]
        # The kit's serial is the uuid as an integer (the agent shows it without 0s in front).
        assert int(r["uuid"].replace("-", ""), 16) == int(r["certificate_serial"], 16)
        assert "BEGIN CERTIFICATE" in pem
    with open(out / "record.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 4
    assert all(tuple(r) == COLUMNS for r in records)
    assert rows[1][COLUMNS.index("config_files")] == "line.conf;motd"
    # The progress without a terminal: one line a device.
    assert len((tmp_path / "progress.txt").read_text().splitlines()) == 3


def test_restart_starts_the_server_again_from_its_state_dir(tmp_path):
    summary, records, out = line(tmp_path, 4, chaos=("restart",))
    assert summary["passed"], summary["problems"]
    (restart,) = summary["chaos"]
    assert restart["kind"] == "restart" and restart["at_device"] == 2
    assert restart["until"] > restart["time"]
    # Boards registered before and after it trust the same root: the restarted server
    # loaded its CA from the state dir rather than making a new one.
    roots = {(out / "devices" / f"{r['station']:04d}" / "var/sota/root.crt").read_text()
             for r in records}
    assert len(roots) == 1 and summary["registered"] == 4


def test_a_lost_answer_fully_detached_is_signed_again_for_one_device(tmp_path):
    summary, records, _ = line(tmp_path, 3, chaos=("lost-answer",))
    assert summary["passed"], summary["problems"]
    (orphan,) = summary["orphan_certificates"]
    assert orphan["why"] == "lost-answer"
    (hit,) = [r for r in records if r["uuid"] == orphan["uuid"]]
    assert hit["exit_code"] == 0 and hit["attempts"] == 2
    assert summary["registered"] == 3 and summary["duplicates"] == []


def test_a_lost_answer_partially_detached_is_an_operator_case_with_its_remedy(tmp_path):
    summary, records, _ = line(tmp_path, 3, chaos=("lost-answer",), partially_detached=True,
                               group="line-1")
    assert summary["passed"], summary["problems"]
    (case,) = summary["operator"]
    (hit,) = [r for r in records if r["uuid"] == case["uuid"]]
    assert hit["exit_code"] == 4 and hit["result"] != "registered"
    assert case["board_serial"] == hit["board_serial"]
    assert f"fioctl devices delete {case['uuid']}" in case["remedy"]
    assert summary["registered"] == 2 and summary["ghosts"] == []
    assert {r["group"] for r in records} == {"line-1"}


def test_a_burst_of_503s_costs_one_attempt_each(tmp_path):
    summary, records, _ = line(tmp_path, 3, chaos=("5xx",))
    assert summary["passed"], summary["problems"]
    assert sum(r["attempts"] for r in records) == 3 + BURST


def test_slow_answers_take_their_seconds_and_the_pictures_are_an_svg_and_a_png(tmp_path):
    summary, records, out = line(tmp_path, 2, chaos=("slow",))
    assert summary["passed"], summary["problems"]
    assert max(r["seconds"] for r in records) >= SLOW_SECONDS
    root = ET.parse(out / "line.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert (out / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_exits_1_when_boards_end_without_an_identity(tmp_path, registration_server):
    run = subprocess.run(
        [sys.executable, "-m", "lmp_autoreg.testing", "line", "--devices", "2", "--parallel",
         "2", "--device-api", registration_server.url, "--factory", "not-acme",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["refused"] == 2 and len(summary["operator"]) == 2
    assert "problem: station 0" in run.stdout


@pytest.mark.parametrize("args", [["--chaos", "reboot"],
                                  ["--chaos", "5xx", "--device-api", "http://127.0.0.1:1/"]])
def test_the_cli_refuses_what_it_cannot_do(tmp_path, args):
    run = subprocess.run([sys.executable, "-m", "lmp_autoreg.testing", "line", *args,
                          "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and not (tmp_path / "out").exists()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_progress_is_one_bar_redrawn(tmp_path):
    terminal = Terminal()
    progress = Progress(2, terminal)
    for station, code in ((0, 0), (1, 4)):
        progress.finished(Station(station, f"B{station}", tmp_path, exit_code=code))
    text = terminal.getvalue()
    assert text.count("\r[") == 2 and text.count("\n") == 1 and text.endswith("\n")
    assert "2/2, 1 for an operator" in text
