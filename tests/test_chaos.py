"""The line's fault schedule (lmp_autoreg.testing.chaos)."""

import pytest

from lmp_autoreg.testing.chaos import BURST, Event, lost_answers, parse, schedule


def test_parse_takes_the_known_kinds_once_and_refuses_others():
    assert parse("restart, 5xx,restart") == ("restart", "5xx")
    assert parse(None) == ()
    with pytest.raises(ValueError, match="unknown chaos reboot"):
        parse("restart,reboot")


def test_each_kind_strikes_within_the_line_and_the_seed_repeats_it():
    kinds = ("restart", "lost-answer", "5xx", "slow")
    events = schedule(kinds, 200, seed=7)
    assert {e.kind for e in events} == set(kinds)
    assert all(0 <= e.at < 200 for e in events)
    assert Event("restart", 100) in events and Event("5xx", 66, BURST) in events
    assert sum(e.kind == "lost-answer" for e in events) == lost_answers(200) == 5
    assert schedule(kinds, 200, seed=7) == events
    assert schedule(kinds, 200, seed=8) != events


def test_a_line_of_one_device_still_loses_an_answer():
    assert schedule(("lost-answer",), 1, seed=0) == [Event("lost-answer", 0)]
