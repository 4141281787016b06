"""Broken and hostile answers of the server (docs/reliability.md section 9.1), one test per
kind that was seen to end in exit 1, past the deadline, or with a damaged file installed:
the real agent as a subprocess against the kit's server.

A bad answer is retried until the deadline; so that no test waits for it, the server's
next answer is a 503 whose Retry-After passes any deadline (``Reply.give_up()``): the
agent gives up at once, exit 5, and its message names the first answer's fault.
"""

import json
import time

import pytest

from lmp_autoreg import checked
from lmp_autoreg.testing.server import Reply

from answers import flip_point_byte, nested, snapshot, unknown_algorithm
from conftest import device_args, run_cli

GIVE_UP = Reply.give_up()


def register(device, server, *extra: str, timeout: float = 60):
    return run_cli(*device_args(device, server, "--json", *extra), timeout=timeout)


def refused(device, server, reply: Reply, message: str) -> None:
    """``reply``, then GIVE_UP: the agent refuses the answer (exit 5, ``message``), installs
    nothing and leaves the sota dir as it was, but its state dir (the pending identity)."""
    server.enqueue(reply)
    server.default = GIVE_UP
    before = snapshot(device.sota, skip=device.sota / ".lmp-autoreg")
    run = register(device, server)
    assert run.returncode == 5, run.stderr
    assert "Traceback" not in run.stderr
    assert run.json["exit_code"] == 5
    [failed] = [line for line in run.stderr.splitlines() if "attempt 1 failed:" in line]
    assert message in failed, run.stderr
    assert snapshot(device.sota, skip=device.sota / ".lmp-autoreg") == before
    assert len(server.posts) == 2
    # An answer is read as sent, never inflated past its bound.
    assert server.posts[0].headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("body", [nested(5000), nested(5000, "{")], ids=["arrays", "objects"])
def test_an_answer_nested_deep_is_refused(device_root, registration_server, body):
    refused(device_root, registration_server,
            Reply(body=body, headers={"Content-Type": "application/json"}), "nests deeper")


def test_a_sota_toml_nested_deep_is_refused(device_root, registration_server):
    deep = "a = " + "[" * 5000 + "]" * 5000 + "\n"
    refused(device_root, registration_server,
            Reply(files=lambda f: {**f, "sota.toml": f["sota.toml"] + deep}),
            "sota.toml is not valid TOML")


@pytest.mark.parametrize("charset,body", [
    ("idna", b"a\xffb" + b"." * 70),
    ("undefined", b"refused"),
    ("punycode", b"refused-r\xffequest"),
])
def test_an_error_in_a_charset_that_cannot_decode_is_shown(device_root, registration_server,
                                                           charset, body):
    registration_server.enqueue(Reply(status=400, body=body, headers={
        "Content-Type": f"text/plain; charset={charset}"}))
    run = register(device_root, registration_server)
    assert run.returncode == 4, run.stderr
    assert "Traceback" not in run.stderr
    assert run.json["exit_code"] == 4
    assert "HTTP 400" in run.json["error"]["message"]


def test_a_large_punycode_error_is_shown_at_once(device_root, registration_server):
    """5 MiB of an error in punycode took Python's codec minutes; the agent decodes a few
    kB as UTF-8. The bound is the deadline: the test's own timeout stops a run past it."""
    registration_server.enqueue(Reply(status=400, body=b"-" + b"a" * (5 * 1024 * 1024), headers={
        "Content-Type": "text/plain; charset=punycode"}))
    run = register(device_root, registration_server, "--timeout", "10", timeout=40)
    assert run.returncode == 4, run.stderr
    assert len(run.json["error"]["message"]) < 600


@pytest.mark.parametrize("damage,message", [
    (flip_point_byte, "client.pem is a damaged certificate"),
    (unknown_algorithm, "client.pem is a damaged certificate"),
], ids=["EC point byte flipped", "algorithm OID changed"])
def test_a_client_pem_with_a_damaged_key_is_refused(device_root, registration_server, damage,
                                                    message):
    def edit(files):
        pem = damage(files["client.pem"])
        return {**files, "client.pem": pem, "client.chained": pem + "\n"}

    refused(device_root, registration_server, Reply(files=edit), message)


@pytest.mark.parametrize("name", ["sota.toml", "client.chained", "extra.txt"])
def test_a_lone_surrogate_in_a_file_is_refused(device_root, registration_server, name):
    # The server's json.dumps writes it as the escape "\ud800", which JSON allows.
    def edit(files):
        return {**files, name: files.get(name, "") + "# \ud800\n"}

    refused(device_root, registration_server, Reply(files=edit), f"'{name}' in the answer is "
            "not text")


def test_a_50_mb_file_is_refused_unread(device_root, registration_server):
    big = "x" * 50_000_000
    refused(device_root, registration_server,
            Reply(files=lambda f: {**f, "big.bin": big}), f"more than {checked.ANSWER_BYTES}")


def test_a_trickled_answer_ends_at_the_deadline(device_root, registration_server):
    """Headers at once, then a byte every 0.5 s: each read is in time, the whole answer
    never is. The deadline (3 s) bounds the whole exchange."""
    registration_server.default = Reply(pace=0.5)
    run = register(device_root, registration_server, "--timeout", "3", timeout=40)
    ended = time.monotonic()
    assert run.returncode == 5, run.stderr
    assert "within" in run.json["error"]["message"]
    first = registration_server.posts[0].time
    assert ended - first < 3 + 5  # the deadline began before the request arrived
    assert not (device_root.sota / "sota.toml").exists()


@pytest.mark.parametrize("status,value", [(429, "0"), (503, "nan"), (429, "-5")])
def test_a_retry_after_of_no_time_is_not_a_storm(device_root, registration_server, status,
                                                  value):
    """Every wait between two requests is at least the agent's own backoff (0.75 s, then
    1.5 s, ...): within a 3 s deadline no more than a handful of requests, where no floor
    sent thousands."""
    registration_server.default = Reply(status=status, body="slow down",
                                        headers={"Retry-After": value})
    run = register(device_root, registration_server, "--timeout", "3", timeout=40)
    assert run.returncode == 5, run.stderr
    posts = registration_server.posts
    assert len(posts) <= 5, len(posts)
    gaps = [b.time - a.time for a, b in zip(posts, posts[1:], strict=False)]
    assert all(gap >= 0.7 for gap in gaps[:-1]), gaps  # the last may be cut to fit
    assert json.loads(run.stdout)["exit_code"] == 5
