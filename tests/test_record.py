"""The line's record (lmp_autoreg.testing.record): a row from whatever the agent printed.

The line reads each agent's JSON result; a result of any shape (a broken or another
agent's) still makes a row of the record's columns and an operator case with a remedy.
"""

import csv
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmp_autoreg.testing.record import COLUMNS, attempts, row, write_csv, write_jsonl
from lmp_autoreg.testing.report import operator_case

from conftest import any_text

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text(20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text(10), inner,
                                                               max_size=3),
    max_leaves=10)
KEYS = st.sampled_from(["result", "uuid", "name", "certificate", "board", "error"])


@pytest.mark.props
@given(result=st.dictionaries(KEYS | any_text(10), JSON, max_size=6),
       exit_code=st.integers(-9, 255), stderr=any_text())
def test_any_result_makes_a_row_and_an_operator_case(tmp_path_factory, result, exit_code,
                                                     stderr):
    entry = row(station=1, result=result, exit_code=exit_code, stderr=stderr, seconds=1.0,
                group=None, config_files=[])
    assert tuple(entry) == COLUMNS and isinstance(entry["result"], str)
    why, remedy = operator_case(result, exit_code, stderr)
    assert isinstance(why, str) and why and isinstance(remedy, str) and remedy
    out = tmp_path_factory.getbasetemp()
    write_jsonl(out / "r.jsonl", [entry])
    write_csv(out / "r.csv", [entry])
    assert list(json.loads((out / "r.jsonl").read_text(encoding="utf-8"))) == list(COLUMNS)


def test_attempts_counts_the_agents_requests():
    log = ("x: sending the registration request to https://h/sign\n"
           "x: warning: attempt 1 failed: HTTP 503\n"
           "x: sending the registration request to https://h/sign: attempt 2\n")
    assert attempts(log) == 2 and attempts("") == 0


def test_the_csv_joins_lists_and_leaves_missing_values_empty(tmp_path):
    entry = row(station=3, result={"uuid": "u", "certificate": {"serial": "ab"}},
                exit_code=0, stderr="", seconds=1.23456, group="g",
                config_files=["b", "a"])
    write_csv(tmp_path / "r.csv", [entry])
    with open(tmp_path / "r.csv", newline="") as handle:
        header, values = list(csv.reader(handle))
    assert tuple(header) == COLUMNS
    assert dict(zip(header, values, strict=True)) == {
        "station": "3", "board_serial": "", "uuid": "u", "name": "", "group": "g",
        "certificate_serial": "ab", "not_after": "", "exit_code": "0", "result": "no result",
        "attempts": "0", "seconds": "1.235", "config_files": "a;b"}


def test_a_lone_surrogate_in_a_result_is_written_as_its_escape(tmp_path):
    entry = row(station=0, result=json.loads('{"name": "a\\ud800"}'), exit_code=0, stderr="",
                seconds=0, group=None, config_files=[])
    write_csv(tmp_path / "r.csv", [entry])
    write_jsonl(tmp_path / "r.jsonl", [entry])
    assert "a\\ud800" in (tmp_path / "r.csv").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "r.jsonl").read_text())["name"] == "a\ud800"
