"""The line's accounting (lmp_autoreg.testing.report): each outcome from crafted records.

The functions are pure, so a duplicate, an orphan and a ghost (which a working kit never
produces) are fed to them as records; tests/test_line.py produces the others end to end.
"""

from lmp_autoreg.testing.record import COLUMNS
from lmp_autoreg.testing.report import (
    Board,
    Issued,
    operator_case,
    percentile,
    summarize,
)


def entry(station, uuid, exit_code=0, serial=None, seconds=1.0):
    values = dict.fromkeys(COLUMNS)
    values.update(station=station, uuid=uuid, exit_code=exit_code, board_serial=serial,
                  seconds=seconds, attempts=1, config_files=["motd"],
                  result="registered" if exit_code == 0 else "error")
    return values


def account(rows, boards, issued=(), api=(), events=(), partially_detached=False):
    return summarize(rows, boards, issued=list(issued), api_devices=list(api),
                     events=list(events), partially_detached=partially_detached,
                     wall_seconds=60.0, checked_in=True)


def test_registered_once_passes_with_its_figures():
    rows = [entry(0, "u0", serial="B0", seconds=1.0), entry(1, "u1", serial="B1", seconds=3.0)]
    boards = {0: Board("B0", "f0"), 1: Board("B1", "f1")}
    summary = account(rows, boards, issued=[Issued("u0", "f0", 1), Issued("u1", "f1", 2)],
                      api=[{"uuid": "u0"}, {"uuid": "u1"}])
    assert summary["passed"] and summary["problems"] == []
    assert summary["registered"] == 2 and summary["operator"] == []
    assert (summary["duplicates"], summary["orphan_certificates"], summary["ghosts"]) == (
        [], [], [])
    assert (summary["p50_seconds"], summary["max_seconds"]) == (1.0, 3.0)
    assert summary["devices_per_minute"] == 2.0


def test_a_board_with_two_identities_is_a_duplicate():
    rows = [entry(0, "u0", serial="B0"), entry(1, "u1", serial="B0")]
    boards = {0: Board("B0", "f0"), 1: Board("B0", "f1")}
    summary = account(rows, boards)
    assert summary["duplicates"] == [{"kind": "board", "board_serial": "B0",
                                      "uuids": ["u0", "u1"]}]
    assert not summary["passed"]


def test_a_uuid_on_two_boards_with_two_certificates_is_a_duplicate():
    rows = [entry(0, "u0", serial="B0"), entry(1, "u0", serial="B1")]
    boards = {0: Board("B0", "f0"), 1: Board("B1", "f1")}
    summary = account(rows, boards)
    assert summary["duplicates"] == [{"kind": "uuid", "uuid": "u0",
                                      "board_serials": ["B0", "B1"], "certificates": 2}]
    assert not summary["passed"]


def test_an_issued_certificate_never_installed_is_an_orphan_explained_only_by_a_lost_answer():
    rows = [entry(0, "u0", serial="B0")]
    boards = {0: Board("B0", "f0")}
    lost = account(rows, boards, issued=[Issued("u0", "old", 1, lost=True),
                                         Issued("u0", "f0", 2)])
    assert lost["orphan_certificates"] == [{"uuid": "u0", "fingerprint": "old",
                                            "issued_at": 1, "why": "lost-answer"}]
    assert lost["passed"]
    unexplained = account(rows, boards, issued=[Issued("u0", "old", 1), Issued("u0", "f0", 2)])
    assert unexplained["orphan_certificates"][0]["why"] is None
    assert not unexplained["passed"]
    restart = account(rows, boards, issued=[Issued("u0", "old", 9), Issued("u0", "f0", 20)],
                      events=[{"kind": "restart", "time": 10.0}])
    assert restart["orphan_certificates"][0]["why"] == "restart" and restart["passed"]


def test_a_device_in_the_api_without_a_board_is_a_ghost():
    rows = [entry(0, "u0", serial="B0")]
    summary = account(rows, {0: Board("B0", "f0")},
                      api=[{"uuid": "u0"}, {"uuid": "gone", "name": "n", "group": "g"}])
    assert summary["ghosts"] == [{"uuid": "gone", "name": "n", "group": "g"}]
    assert not summary["passed"]


def test_an_operator_case_passes_only_where_a_lost_answer_predicts_it():
    rows = [entry(0, "u0", exit_code=4, serial="B0")]
    boards = {0: Board("B0", None, "HTTP 409", "delete the device u0, run again")}
    issued = [Issued("u0", "f0", 1, lost=True)]
    predicted = account(rows, boards, issued=issued, api=[{"uuid": "u0"}],
                        partially_detached=True)
    assert predicted["operator"] == [{"uuid": "u0", "board_serial": "B0", "why": "HTTP 409",
                                      "remedy": "delete the device u0, run again"}]
    assert predicted["registered"] == 0 and predicted["refused"] == 1
    assert predicted["passed"]
    fully = account(rows, boards, issued=issued, api=[{"uuid": "u0"}])
    assert not fully["passed"]


def test_an_answer_signed_before_a_restart_may_have_arrived():
    rows = [entry(0, "u0", serial="B0")]
    summary = account(rows, {0: Board("B0", "f0")}, issued=[Issued("u0", "f0", 9)],
                      api=[{"uuid": "u0"}], events=[{"kind": "restart", "time": 10.0}],
                      partially_detached=True)
    assert summary["passed"], summary["problems"]


def test_a_board_reporting_another_serial_fails_the_line():
    summary = account([entry(0, "u0", serial="B9")], {0: Board("B0", "f0")})
    assert any("reported board B9" in p for p in summary["problems"])


def test_a_registered_device_without_configuration_fails_a_checked_in_line():
    rows = [entry(0, "u0", serial="B0")]
    rows[0]["config_files"] = []
    assert not account(rows, {0: Board("B0", "f0")})["passed"]


def test_the_operator_remedy_is_the_agents_else_one_by_exit_code():
    result = {"error": {"kind": "refused", "message": "HTTP 409",
                        "remedy": {"case": "c", "text": "delete it"}}}
    assert operator_case(result, 4, "") == ("HTTP 409", "delete it")
    why, remedy = operator_case({"error": None}, 5, "line 1\nno answer from server\n")
    assert why == "no answer from server" and "run the agent again" in remedy


def test_percentile_is_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
