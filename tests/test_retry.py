"""The retry policy (docs/reliability.md section 1): the pure backoff, the loop, and the
agent's timing."""

import logging
import re
import subprocess
import sys
import time

import pytest

from lmp_autoreg.errors import BadAnswer, LocalFailure, NoAnswer, ServerRefused, Unreachable
from lmp_autoreg.retry import (
    CONNECT_CAP,
    MIN_ATTEMPT,
    SERVER_CAP,
    Deadline,
    backoff,
    next_wait,
    retry,
)
from lmp_autoreg.testing.server import RegistrationServer, Reply

from conftest import clean_env, device_args, run_cli


def waits(unreachable: bool, rand: float, n: int = 8) -> list[float]:
    return [backoff(i, unreachable=unreachable, retry_after=None, rand=rand)
            for i in range(1, n + 1)]


def test_connection_failures_start_near_half_a_second_and_cap_at_2():
    assert waits(True, 0.0) == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert waits(True, 0.999)[0] == pytest.approx(0.375, abs=0.001)
    for rand in (0.0, 0.3, 0.999):
        assert max(waits(True, rand, 40)) <= CONNECT_CAP


def test_server_failures_grow_to_30_seconds():
    assert waits(False, 0.0) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    for rand in (0.0, 0.5, 0.999):
        assert max(waits(False, rand, 100)) <= SERVER_CAP


def test_jitter_only_shortens_computed_waits():
    for n in range(1, 10):
        low = backoff(n, unreachable=False, retry_after=None, rand=0.999)
        high = backoff(n, unreachable=False, retry_after=None, rand=0.0)
        assert 0.75 * high <= low < high


def test_retry_after_is_honoured_never_shortened():
    assert backoff(1, unreachable=False, retry_after=7.0, rand=0.0) == 7.0
    assert 7.0 < backoff(1, unreachable=False, retry_after=7.0, rand=0.5) <= 7.0 * 1.25
    # Beyond the 30 s cap too: the server knows best when it will be back.
    assert backoff(1, unreachable=False, retry_after=120.0, rand=0.0) == 120.0


def test_next_wait_fits_one_last_attempt_before_the_deadline():
    # Plenty of time: the plain backoff.
    assert next_wait(3, unreachable=False, retry_after=None, remaining=100, rand=0) == 4.0
    # Little time: shortened so one more attempt still fits.
    assert next_wait(3, unreachable=False, retry_after=None, remaining=1.0,
                     rand=0) == pytest.approx(1.0 - MIN_ATTEMPT)
    # No time for an attempt: give up.
    assert next_wait(1, unreachable=True, retry_after=None, remaining=0.1, rand=0) is None


def test_next_wait_gives_up_when_retry_after_is_past_the_deadline():
    assert next_wait(1, unreachable=False, retry_after=5.0, remaining=60, rand=0) == 5.0
    assert next_wait(1, unreachable=False, retry_after=50.0, remaining=20, rand=0) is None
    # Jitter never pushes past the deadline, and never below the server's wish.
    wait = next_wait(1, unreachable=False, retry_after=5.0, remaining=5.0 + MIN_ATTEMPT + 0.5,
                     rand=0.999)
    assert wait == pytest.approx(5.5)


def stated_waits(text: str) -> list[float]:
    """The waits the agent announced ("retrying in 0.9 s"), in order."""
    return [float(w) for w in re.findall(r"retrying in (\d+\.\d) s", text)]


def test_retry_returns_after_failures_with_the_connection_backoff(caplog):
    calls = []

    def attempt(budget: float) -> str:
        calls.append((time.monotonic(), budget))
        if len(calls) < 3:
            raise Unreachable("connection refused")
        return "answer"

    deadline = Deadline(60)
    with caplog.at_level(logging.INFO):
        assert retry(attempt, deadline, what="test") == "answer"
    (t1, b1), (t2, _), (t3, _) = calls
    first, second = stated_waits(caplog.text)
    assert 0.3 <= first <= 0.5 and 0.7 <= second <= 1.0  # 0.5 s, then 1 s, less jitter
    # A sleep may run long on a loaded machine, never short (the message rounds the wait
    # to 0.1 s).
    assert t2 - t1 >= first - 0.05 and t3 - t2 >= second - 0.05
    assert 59 < b1 <= 60  # each attempt gets the time left, never more


def test_retry_stops_at_once_on_final_errors():
    for error in (ServerRefused("HTTP 400", 400), LocalFailure("disk full")):
        calls = []

        def attempt(budget: float, error=error, calls=calls) -> None:
            calls.append(budget)
            raise error

        with pytest.raises(type(error)):
            retry(attempt, Deadline(10), what="test")
        assert len(calls) == 1


def test_retry_gives_up_at_the_deadline_with_the_last_error():
    calls = []

    def attempt(budget: float) -> None:
        calls.append(time.monotonic())
        raise BadAnswer("not JSON", 0.05) if len(calls) % 2 else NoAnswer("HTTP 503", 0.05)

    deadline = Deadline(MIN_ATTEMPT + 1.0)
    with pytest.raises(NoAnswer) as info:
        retry(attempt, deadline, what="test")
    # It gave up only once the server's wait and one more attempt no longer fitted; and it
    # did retry in between.
    assert deadline.remaining() < MIN_ATTEMPT + 0.05
    assert len(calls) >= 2
    assert type(info.value) is (BadAnswer if len(calls) % 2 else NoAnswer)
    assert f"gave up after {len(calls)} attempts" in str(info.value)


def test_agent_registers_within_2_s_of_the_server_coming_up(device_root):
    # The port refuses connections (the network is coming up) until the agent has been
    # refused three times; then it listens. The agent's waits between connection attempts
    # never exceed 2 s, so it connects within 2 s of the server coming up.
    with RegistrationServer(listen_delay=None) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmp_autoreg",
             *device_args(device_root, server, "--timeout", "120")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=clean_env(),
        )
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if sum("Connection refused" in seen for seen in lines) == 3:
                server.listen()
        assert proc.wait(60) == 0, "".join(lines)
    stderr = "".join(lines)
    [request] = server.requests
    assert request.time >= server.listening_since
    waits = stated_waits(stderr)
    assert len(waits) >= 3 and max(waits) <= CONNECT_CAP
    assert waits[:3] == sorted(waits[:3])  # growing: 0.5, 1, 2 less jitter


def test_agent_waits_about_a_second_after_a_5xx(device_root, registration_server):
    registration_server.enqueue(Reply.html_500())
    run = run_cli(*device_args(device_root, registration_server, "--timeout", "60"))
    assert run.returncode == 0, run.stderr
    first, second = registration_server.requests
    [wait] = stated_waits(run.stderr)
    assert 0.7 <= wait <= 1.0  # 1 s, less jitter
    # Never sooner (the message rounds to 0.1 s); later when the machine is busy.
    assert second.time - first.time >= wait - 0.05
    assert "attempt 1 failed: server busy or failing (HTTP 500)" in run.stderr


def test_agent_honours_retry_after(device_root, registration_server):
    registration_server.enqueue(Reply(status=429, body="slow down",
                                      headers={"Retry-After": "1.5"}))
    run = run_cli(*device_args(device_root, registration_server, "--timeout", "60"))
    assert run.returncode == 0, run.stderr
    first, second = registration_server.requests
    [wait] = stated_waits(run.stderr)
    assert 1.5 <= wait <= 1.9  # never shorter than asked: jitter only lengthens, 25 % at most
    assert second.time - first.time >= 1.5


def test_a_last_attempt_cut_short_by_the_deadline_keeps_the_reason_before_it():
    """"Timed out" alone would hide why the device is not registered."""
    calls = []

    def attempt(budget: float) -> None:
        calls.append(budget)
        if len(calls) == 1:
            raise NoAnswer("HTTP 503: Service Unavailable")
        time.sleep(budget)  # a hung server: the deadline ends this attempt
        raise NoAnswer(f"no answer within {budget:.1f} s")

    with pytest.raises(NoAnswer) as info:
        retry(attempt, Deadline(MIN_ATTEMPT + 1.5), what="test")
    assert len(calls) == 2
    message = str(info.value)
    assert message.startswith("no answer within")
    assert "the attempt before failed: HTTP 503: Service Unavailable" in message
    assert "gave up after 2 attempts" in message


def test_a_deadline_spent_before_the_first_request_still_gets_one_real_try(
        device_root, registration_server, tmp_path):
    """`--timeout 1` used up before anything is sent (the agent held at before-request
    past it, as a slow board's start-up would): the first attempt still gets a second
    (retry.MIN_ATTEMPT), here enough for an answer that takes 0.3 s, and registers."""
    from pausing import Paused

    registration_server.default = Reply(delay=0.3)
    args = device_args(device_root, registration_server, "--timeout", "1")
    with Paused("before-request", tmp_path / "marker", args) as agent:
        time.sleep(1.5)  # past the deadline, whatever the start-up took
        run = agent.resume()
    assert run.returncode == 0, run.stderr
    assert len(registration_server.posts) == 1
