"""Property-based tests of the family "the server's answer" (docs/reliability.md sections 9.1
and 9.4): Hypothesis makes the kit's real loopback server answer with any status, headers,
charset, body (the real answer edited, any bytes, any JSON, nested JSON) and pacing, and
the real agent runs against it. Each case asserts the README's promises:

- an exit code of docs/spec.md section 6 that fits the answer, never 1 (a run that met its
  deadline may always end 5: a loaded machine may be that slow);
- no traceback; with ``--json``, one JSON object on stdout whose ``exit_code`` is the code;
- after a failure the sysroot as it was (but the pending identity in the state dir);
  after a success the files the server sent; nothing written beside the sysroot;
- the end within the deadline plus a margin, counted from the first request's arrival;
- no request storm: the server counts the requests.

The first answer is the generated one; every later one is a 503 whose Retry-After passes
the deadline (``Reply.give_up()``), so a retried case costs one wait, not a deadline.
Most cases run the agent in-process (``cli.main``, as the console script does, minus the
process), which costs a fraction of a subprocess; ``test_answers_in_a_subprocess`` runs a
few as the real program, where a crash or a traceback would show as a process shows it.
"""

import contextlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmp_autoreg import cli
from lmp_autoreg.testing.device import FakeDevice
from lmp_autoreg.testing.server import RegistrationServer, Reply

from answers import flip_point_byte, nested, snapshot
from conftest import AGENT_ENV, clean_env

TIMEOUT = 1.2  # the agent's deadline: a first attempt, a wait of at most 0.2 s, GIVE_UP
MARGIN = 8.0  # past the deadline, for a loaded machine to end the process
STATE = Path("var/sota/.lmp-autoreg")  # the pending identity stays after a failure
REGISTERED = {"client.chained", "client.pem", "pkey.pem", "root.crt", "sota.toml"}
# Headers the server writes itself; any other name may be generated.
OWN_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server"}


@dataclass
class Case:
    """One generated answer and the exit codes that fit it."""

    reply: Reply
    fits: frozenset[int]
    repeat: bool = False  # answer every request so (a busy server), not GIVE_UP after one
    edited: bool = False  # the real answer with one edit: installed as sent, or refused


def expected(status: int) -> frozenset[int]:
    """The exit code an answer of ``status`` (its body aside) ends with."""
    if status == 201:
        return frozenset({0})
    if status == 429 or status >= 500:
        return frozenset({5})  # busy or failing: retried until the deadline
    if 400 <= status < 500:
        return frozenset({4})
    return frozenset({5})  # another 2xx, a 3xx: not the answer the agent asked for


class Edit:
    """An edit of the real answer's files, named for the report of a failing case."""

    def __init__(self, label: str, edit) -> None:
        self.label = label
        self.edit = edit

    def __call__(self, files: dict[str, str]) -> dict[str, str]:
        return self.edit(files)

    def __repr__(self) -> str:
        return f"Edit({self.label!r})"


def labelled(label: str, edit) -> Edit:
    return Edit(label, edit)


# Latin-1 text without controls: what an HTTP header can carry.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    blacklist_characters="\x7f"), max_size=30)
charsets = st.sampled_from(["utf-8", "idna", "punycode", "undefined", "latin-1", "utf-16",
                            "utf-7", "hex", "rot13", "x-unknown", ""]) | header_text
content_types = st.one_of(
    st.none(),
    st.just("application/json"),
    st.builds("text/plain; charset={}".format, charsets),
    st.builds("application/json; charset={}".format, charsets),
    header_text,
)
retry_afters = st.one_of(
    st.none(),
    st.sampled_from(["0", "nan", "-5", "inf", "-inf", "1e-9", "0.1", "soon", "",
                     "Wed, 21 Oct 2015 07:28:00 GMT", "3600"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
extra_headers = st.dictionaries(
    st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
        lambda n: n.lower() not in OWN_HEADERS | {"content-type", "retry-after"}),
    header_text, max_size=2,
)
statuses = st.one_of(st.just(201), st.sampled_from(
    [200, 202, 204, 301, 302, 400, 401, 403, 404, 409, 415, 418, 429, 500, 502, 503, 504]),
    st.integers(200, 599))
file_names = st.sampled_from(["client.pem", "root.crt", "sota.toml", "client.chained",
                              "pkey.pem", "sql.db", "extra.txt", "../evil", ".hidden", ""])
any_text = st.text(max_size=200) | st.sampled_from(["# \ud800", "\x00", "a = [" * 400])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=10,
)


@st.composite
def edits(draw):
    """One edit of the real answer's files."""
    kind = draw(st.sampled_from(["none", "drop", "add", "replace", "append", "damage-key",
                                 "big"]))
    name = draw(file_names)
    if kind == "none":
        return labelled("none", lambda f: f)
    if kind == "drop":
        return labelled(f"drop {name}", lambda f: {k: v for k, v in f.items() if k != name})
    if kind == "damage-key":
        index, mask = draw(st.integers(0, 63)), draw(st.integers(1, 255))
        return labelled(f"flip point byte {index}^{mask}",
                        lambda f: {**f, "client.pem": flip_point_byte(f["client.pem"], index,
                                                                      mask)})
    if kind == "big":
        size = draw(st.sampled_from([256 * 1024 + 1, 2 * 1024 * 1024]))
        return labelled(f"{size} bytes in {name}", lambda f: {**f, name: "x" * size})
    text = draw(any_text)
    if kind == "add":
        return labelled(f"add {name}={text!r}", lambda f: {**f, name: text})
    if kind == "replace":
        return labelled(f"replace {name}={text!r}", lambda f: {**f, name: text})
    return labelled(f"append {text!r} to {name}", lambda f: {**f, name: f.get(name, "") + text})


@st.composite
def cases(draw) -> Case:
    status = draw(statuses)
    headers = dict(draw(extra_headers))
    content_type = draw(content_types)
    if content_type is not None:
        headers["Content-Type"] = content_type
    retry_after = draw(retry_afters)
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    fits = expected(status)
    body_kind = draw(st.sampled_from(["real", "real", "edited", "bytes", "json", "nested"]))
    reply = Reply(status=status, headers=headers)
    edited = False
    if body_kind == "edited" and status == 201:
        reply.files = draw(edits())
        edited = True
        fits = frozenset({0, 5})
    elif body_kind == "bytes":
        reply.body = draw(st.binary(max_size=500))
    elif body_kind == "json":
        reply.body = json.dumps(draw(json_values), ensure_ascii=draw(st.booleans())).encode()
    elif body_kind == "nested":
        reply.body = nested(draw(st.integers(1, 20000)), draw(st.sampled_from("[{")))
    if reply.body is not None and status == 201:
        fits = frozenset({5})  # no generated body is a certificate for this device
    way = draw(st.sampled_from(["whole"] * 8 + ["pace", "truncate", "close", "repeat"]))
    repeat = False
    # A trickled or cut answer is no answer (5), unless it was short enough to arrive whole.
    if way == "pace":
        reply.pace = 0.5
        fits = fits | {5}
    elif way == "truncate":
        reply.truncate = draw(st.integers(0, 100))
        fits = fits | {5}
    elif way == "close":
        reply.close = True
        fits = frozenset({5})
    elif way == "repeat" and (status == 429 or status >= 500):
        repeat = True
    return Case(reply, fits, repeat, edited)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    ended: float


def in_process(argv: list[str]) -> Outcome:
    """``cli.main`` as the console script runs it, with its output captured; the logging
    it sets up is put back as it was for the tests that follow in this process."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger("lmp_autoreg")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        root.handlers[:], root.level, root.propagate = saved
    return Outcome(code, out.getvalue(), err.getvalue(), time.monotonic())


def in_subprocess(argv: list[str], outside: Path) -> Outcome:
    done = subprocess.run(
        [sys.executable, "-m", "lmp_autoreg", *argv], capture_output=True, text=True,
        env=clean_env(HOME=str(outside), TMPDIR=str(outside)), cwd=outside,
        stdin=subprocess.DEVNULL, timeout=TIMEOUT + 60,
    )
    return Outcome(done.returncode, done.stdout, done.stderr, time.monotonic())


def check(case: Case, runner: str) -> None:
    top = Path(tempfile.mkdtemp(prefix="lmp-autoreg-answer-"))
    try:
        outside = top / "outside"
        outside.mkdir()
        device = FakeDevice(top / "device").build()
        before = snapshot(device.root)
        with RegistrationServer() as server:
            server.enqueue(case.reply)
            server.default = case.reply if case.repeat else Reply.give_up()
            argv = ["--sysroot", str(device.root), "--device-api", server.url, "--fioconfig",
                    "off", "--no-start", "--timeout", str(TIMEOUT), "--json"]
            run = in_process(argv) if runner == "in-process" else in_subprocess(argv, outside)
            posts = server.posts
            answered = server.registered
        assert_promises(case, run, posts, answered, device, before, top, outside)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def assert_promises(case, run, posts, answered, device, before, top, outside) -> None:
    code = run.code
    assert code != 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    data = json.loads(run.stdout)  # one object, nothing else
    assert isinstance(data, dict) and data["exit_code"] == code, run.stdout
    # A loaded machine may be slow enough for the deadline to end the one attempt, even
    # before its request is sent: then the agent says so, and any case may end 5.
    timed_out = code == 5 and re.search(r"within [0-9.]+ s", data["error"]["message"])
    assert posts or timed_out, "no request was sent"
    if posts:
        elapsed = run.ended - posts[0].time
        assert elapsed < TIMEOUT + MARGIN, elapsed
    assert code in case.fits | ({5} if timed_out else set()), (code, run.stderr)
    # No storm: one request, GIVE_UP's after a retry; a busy server repeated gets a few,
    # each wait at least the backoff's floor (0.375 s, less only to fit the deadline).
    assert len(posts) <= (2 + int(TIMEOUT / 0.375) if case.repeat else 2), len(posts)
    after = snapshot(device.root)
    state = [k for k in after if Path(k).is_relative_to(STATE) and k not in before]
    if code == 0:
        installed = {k for k in after if k.startswith("var/sota/") and k not in before}
        assert {Path(k).name for k in installed if Path(k).parent == Path("var/sota")} >= (
            REGISTERED - {"client.chained"} if case.edited else REGISTERED)
        assert len(answered) == 1
    else:
        assert {k: v for k, v in after.items() if k not in state} == before
        assert {Path(k).name for k in state} <= {".lmp-autoreg", "identity.json", "lock"}
    assert sorted(p.name for p in top.iterdir()) == ["device", "outside"]
    assert not any(outside.iterdir())


@pytest.mark.props
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_answers(case, monkeypatch):
    for name in AGENT_ENV:
        monkeypatch.delenv(name, raising=False)
    check(case, "in-process")


# A subprocess costs about ten times an in-process run: a few cases in `make test`, a tenth
# of the long profile's.
@pytest.mark.props
@settings(max_examples=max(4, settings().max_examples // 10),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_answers_in_a_subprocess(case):
    check(case, "subprocess")
