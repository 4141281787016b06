"""``checked``, the server's answers (docs/reliability.md section 9.1): each function turns
any bytes into a checked value or ``BadAnswer``, never another error, within its bounds."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmp_autoreg import checked
from lmp_autoreg.errors import BadAnswer
from lmp_autoreg.retry import backoff
from lmp_autoreg.testing.ca import ThrowawayCA

from answers import bad_version, flip_point_byte, nested, unknown_algorithm


def answer(files) -> bytes:
    return json.dumps(files).encode()


@pytest.mark.parametrize("text,depth", [
    ('"x"', 0), ("{}", 1), ('{"a": "[[[["}', 1), ('{"a": "\\"[[["}', 1), ('{"a\\\\": [1]}', 2),
    ('[[{"a": []}]]', 4), ("[" * 5000, 5000),
])
def test_json_depth(text, depth):
    assert not checked.json_deeper_than(text, depth)
    assert checked.json_deeper_than(text, depth - 1) == (depth > 0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12,
)


def depth_of(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


@pytest.mark.props
@given(json_values, st.booleans())
def test_json_depth_is_the_depth_json_reads(value, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only)
    depth = depth_of(value)
    assert not checked.json_deeper_than(text, depth)
    assert checked.json_deeper_than(text, depth - 1) == (depth > 0)


def test_the_largest_answer_within_the_bounds_is_taken():
    files = {f"f{i}": "x" * 1000 for i in range(checked.ANSWER_FILES - 1)}
    files["big"] = "é" * (checked.FILE_BYTES // 2)
    assert checked.answer_files(answer(files)) == files


@pytest.mark.parametrize("content,message", [
    (answer({"a": "x" * (checked.FILE_BYTES + 1)}), "larger than"),
    (answer({"a": "é" * (checked.FILE_BYTES // 2 + 1)}), "larger than"),  # counted in UTF-8
    (answer({f"f{i}": "" for i in range(checked.ANSWER_FILES + 1)}), "more than"),
    (b" " * (checked.ANSWER_BYTES + 1), "larger than"),
    (nested(5000), "nests deeper"),
    (b'{"a": ["x"]}', "nests deeper"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b'{"a": "\\ud800"}', "'a' in the answer is not text"),
    (b'{"\\udfff": "x"}', "the name of a file in the answer"),
    (b'{"a": "x\\u0000"}', "NUL"),
    (b'["a"]', "not a map"),
    (b'{"a": 1}', "not a map"),
    (b"{", "not JSON"),
])
def test_an_answer_out_of_bounds_is_refused(content, message):
    with pytest.raises(BadAnswer, match=message):
        checked.answer_files(content)


@pytest.mark.props
@given(st.binary(max_size=300) | st.builds(json.dumps, json_values).map(str.encode))
def test_any_answer_is_files_or_refused(content):
    try:
        files = checked.answer_files(content)
    except BadAnswer:
        return
    for name, text in files.items():
        name.encode("utf-8"), text.encode("utf-8")  # noqa: B018 - they must encode


@pytest.mark.parametrize("name,codec", [
    ("UTF-8", "utf-8"), ("us-ascii", "ascii"), ("ISO-8859-1", "iso8859-1"),
    ("windows-1252", "cp1252"), ("utf-16le", "utf-16-le"), (None, "utf-8"),
    ("idna", "utf-8"), ("punycode", "utf-8"), ("undefined", "utf-8"), ("x-unknown", "utf-8"),
    ("utf\0-8", "utf-8"), ("rot13", "utf-8"), ("base64", "utf-8"),
])
def test_charsets(name, codec):
    assert checked.charset(name) == codec


def test_the_message_of_an_error():
    assert checked.server_message(b'{"message": "no\\nway"}', "utf-8", None) == "no way"
    assert checked.server_message(b"abc \x1b[31mred", None, None) == "abc [31mred"
    assert checked.server_message(b"the token is s3cret", "ascii", "s3cret") == (
        "the token is <redacted>")
    assert checked.server_message(b'{"a": ' + nested(5000), "utf-8", None).startswith('{"a"')
    assert len(checked.server_message(b"x" * 10**6, "utf-8", None)) == checked.MESSAGE_CHARS
    assert checked.server_message(b"caf\xe9", "latin-1", None) == "café"
    # Only the first MESSAGE_BYTES are decoded: what comes after is never read.
    late = b" " * checked.MESSAGE_BYTES + b"late"
    assert checked.server_message(late, "utf-8", None) == ""


@pytest.mark.props
@given(st.binary(max_size=600), st.one_of(st.none(), st.text(max_size=20),
                                          st.sampled_from(["idna", "punycode", "utf-16",
                                                           "undefined", "utf-7", "hex"])))
def test_any_error_answer_has_a_message(content, encoding):
    message = checked.server_message(content, encoding, "tok")
    assert len(message) <= checked.MESSAGE_CHARS
    assert message.isprintable()
    message.encode("utf-8")


@pytest.mark.parametrize("value,seconds", [
    ("0", 0.0), ("2.5", 2.5), ("120", 120.0), ("1e3", 1000.0), (None, None), ("", None),
    ("nan", None), ("-5", None), ("inf", None), ("-inf", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("soon", None),
])
def test_retry_after(value, seconds):
    assert checked.retry_after(value) == seconds


@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999])
@pytest.mark.parametrize("failures", [1, 2, 5, 20])
def test_a_retry_after_of_no_time_never_shortens_the_backoff(failures, rand):
    own = backoff(failures, unreachable=False, retry_after=None, rand=rand)
    assert backoff(failures, unreachable=False, retry_after=0.0, rand=rand) == own
    assert own >= 0.75


@pytest.fixture(scope="module")
def client_pem() -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = ThrowawayCA("acme")
    subject_key = ec.generate_private_key(ec.SECP256R1())
    return ca.cert_for_key_with_other_cn(subject_key.public_key(), "x")


def test_a_certificate_is_read_whole(client_pem):
    cert = checked.certificate(client_pem, "client.pem")
    assert cert.public_key() is not None


@pytest.mark.parametrize("damage", [flip_point_byte, unknown_algorithm, bad_version,
                                    lambda pem: pem.replace("A", "B", 1), lambda pem: "x"])
def test_a_damaged_certificate_is_refused(client_pem, damage):
    with pytest.raises(BadAnswer, match="client.pem is"):
        checked.certificate(damage(client_pem), "client.pem")


@pytest.mark.props
@given(st.integers(0, 2000), st.integers(1, 255))
def test_any_byte_of_a_certificate_damaged_is_refused_or_read(client_pem, index, mask):
    import base64

    lines = client_pem.strip().splitlines()
    der = bytearray(base64.b64decode("".join(lines[1:-1])))
    der[index % len(der)] ^= mask
    text = base64.b64encode(bytes(der)).decode()
    pem = "-----BEGIN CERTIFICATE-----\n" + text + "\n-----END CERTIFICATE-----\n"
    try:
        checked.certificate(pem, "client.pem")
    except BadAnswer:
        pass


def test_a_toml_file_nested_deep_is_refused():
    with pytest.raises(BadAnswer, match="sota.toml is not valid TOML: it nests too deep"):
        checked.toml_document("a = " + "[" * 5000, "sota.toml")
    assert checked.toml_document("a = [[1]]", "sota.toml") == {"a": [[1]]}
