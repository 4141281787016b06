"""Bytes from outside become checked values, with an error naming where they came from.

Everything the agent takes from outside itself passes through one function of this module,
at the place it enters, before the rest of the code uses it: the server's answers, and the
device's files and settings (the command line, the environment, the default file,
``/etc/os-release`` and the other device files). What comes back is a value of a known
shape and a bounded size, or the error of docs/spec.md section 6 that fits where the bytes
came from (an answer of the server: ``BadAnswer``, exit 5, retried until the deadline; a
setting or a device file: ``ConfigError``, exit 2), naming its place. Nothing from outside
reaches a parser that can recurse without bound, a codec that can take seconds, a read
that can block, or a write that can fail on a lone surrogate.

Only ``os``, ``re``, ``stat`` and ``errors`` at the top: the guard reads its settings
through this module on every start (docs/performance.md); what only answers need is
imported where they are read.
"""

from __future__ import annotations

import errno
import os
import re
import select
import stat
import time

from .errors import BadAnswer, ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from cryptography import x509

# --- Server answers ---
#
# The bounds of docs/spec.md section 2. The largest answer a real server sends is a few
# kB (four PEM and TOML files); each bound is a hundred times that or more, and small
# enough that a device holds it in memory without noticing.

# The body of one answer that is read at most; a 201 answer longer than this is refused
# (its Content-Length alone is enough), of an error only this much is kept.
ANSWER_BYTES = 1024 * 1024
# One file of a 201 answer, in UTF-8; and how many files one answer may carry.
FILE_BYTES = 256 * 1024
ANSWER_FILES = 64
# How deep a 201 answer's JSON may nest: one object of strings is depth 1.
ANSWER_DEPTH = 1
# Of an error answer, the bytes decoded to find the server's message, how deep their JSON
# may nest to be read for a "message", and the characters of that message shown.
MESSAGE_BYTES = 4096
MESSAGE_DEPTH = 8
MESSAGE_CHARS = 500
# The charsets an error answer's text is decoded with (their codecs' names); any other
# (idna and punycode, which can fail or take seconds; an unknown name) is read as UTF-8.
# All of them decode any bytes with replacement, in time linear in their length.
CHARSETS = frozenset({
    "utf-8", "ascii", "iso8859-1", "iso8859-15", "cp1252", "utf-16", "utf-16-le", "utf-16-be",
})

# The characters of JSON that can open or close a level, or a string, or escape.
_JSON_MARKS = re.compile(r'["\\\[\]{}]')


def json_deeper_than(text: str, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays and objects more than ``limit`` deep.

    A scan of the brackets outside strings, linear in the length of ``text``, that stops at
    the first level past ``limit``: ``json.loads`` recurses once per level, and a few
    thousand levels end in ``RecursionError``. Meant to run before ``json.loads``, which
    says whether the text is JSON at all.
    """
    depth = 0
    in_string = False
    escaped = -1  # the position of the character a backslash escapes
    for mark in _JSON_MARKS.finditer(text):
        at = mark.start()
        if at == escaped:
            continue
        char = mark.group()
        if in_string:
            if char == "\\":
                escaped = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _text(value: str, where: str) -> bytes:
    """``value`` as the UTF-8 bytes a file gets; a lone surrogate (a JSON ``\\ud800``) or a
    NUL character is not text."""
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadAnswer(f"{where} is not text: {e.reason} at character {e.start}") from e
    if b"\0" in data:
        raise BadAnswer(f"{where} is not text: it holds a NUL character")
    return data


def answer_files(content: bytes) -> dict[str, str]:
    """The files of a 201 answer's body: one JSON object of file names to text.

    Refused (``BadAnswer``): a body over ``ANSWER_BYTES``, not UTF-8, not JSON, nested
    deeper than an object of strings, more than ``ANSWER_FILES`` files, a file over
    ``FILE_BYTES``, a name or a file that is not text.
    """
    import json

    if len(content) > ANSWER_BYTES:
        raise BadAnswer(f"the server said 201 but its answer is larger than {ANSWER_BYTES} "
                        "bytes")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadAnswer(f"the server said 201 but its answer is not UTF-8: {e.reason} at "
                        f"byte {e.start}") from e
    if json_deeper_than(text, ANSWER_DEPTH):
        raise BadAnswer("the server said 201 but its answer nests deeper than one object "
                        "of file names to text")
    try:
        files = json.loads(text)
    except ValueError as e:
        raise BadAnswer(f"the server said 201 but its answer is not JSON: {e}") from e
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise BadAnswer("the server said 201 but its answer is not a map of file names to text")
    if len(files) > ANSWER_FILES:
        raise BadAnswer(f"the answer carries {len(files)} files, more than {ANSWER_FILES}")
    for name, value in files.items():
        _text(name, f"the name of a file in the answer ({name!r})")
        if len(_text(value, f"{name!r} in the answer")) > FILE_BYTES:
            raise BadAnswer(f"{name!r} in the answer is larger than {FILE_BYTES} bytes")
    return files


def charset(name: str | None) -> str:
    """The codec an error answer's text is decoded with: its charset when that is one of
    ``CHARSETS``, else UTF-8."""
    import codecs

    try:
        codec = codecs.lookup(name or "utf-8").name
    except (LookupError, ValueError):  # an unknown name; a NUL in it
        return "utf-8"
    return codec if codec in CHARSETS else "utf-8"


def server_message(content: bytes, encoding: str | None, token: str | None) -> str:
    """The server's own words in an error answer, short and on one line.

    Only the first ``MESSAGE_BYTES`` are decoded, with ``charset(encoding)`` and
    replacement; a JSON object's ``message``, ``detail`` or ``error`` is taken when it has
    one. Characters that are not printable become spaces, the token (a server that echoes
    the request) ``<redacted>``. Empty when the server said nothing.
    """
    import json

    text = content[:MESSAGE_BYTES].decode(charset(encoding), "replace").strip()
    data = None
    if text[:1] == "{" and not json_deeper_than(text, MESSAGE_DEPTH):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
    if isinstance(data, dict):
        for key in ("message", "detail", "error"):
            if isinstance(data.get(key), str):
                text = data[key]
                break
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if token:
        text = text.replace(token, "<redacted>")
    return text[:MESSAGE_CHARS]


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds: a finite number, not negative; None for anything
    else (absent, an HTTP date, ``nan``, ``-5``, garbage), which leaves the wait to the
    agent's own backoff."""
    import math

    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def certificate(pem: str | bytes, where: str) -> x509.Certificate:
    """One PEM certificate from the server, every field the agent reads from it readable:
    its subject's common name, its issuer, serial and expiry, and its public key (a
    damaged EC point, an unknown algorithm). ``BadAnswer`` naming ``where`` otherwise."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm

    data = pem.encode("utf-8") if isinstance(pem, str) else pem
    try:
        cert = x509.load_pem_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as e:
        raise BadAnswer(f"{where} is not an X.509 certificate: {e}") from e
    try:
        _read_fields(cert)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadAnswer(f"{where} is a damaged certificate: {e}") from e
    return cert


def _read_fields(cert: Any) -> tuple[object, ...]:
    """Every field of ``cert`` that the agent reads (cryptography parses most of them only
    when asked, and raises then)."""
    from cryptography.x509.oid import NameOID

    names = [name.rfc4514_string() for name in (cert.subject, cert.issuer)]
    common = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return (*names, *common, cert.serial_number, cert.not_valid_after_utc, cert.public_key())


def toml_document(text: str, where: str) -> dict[str, Any]:
    """A TOML file from the server, parsed. ``tomllib`` recurses once per level of nested
    arrays and inline tables: past Python's recursion limit that is a file nested too
    deep, refused like any other that is not TOML."""
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BadAnswer(f"{where} is not valid TOML: {e}") from e
    except RecursionError as e:
        raise BadAnswer(f"{where} is not valid TOML: it nests too deep") from e


# --- Device files and settings ---

# Linux's limits on a path (with its NUL) and on one name in it, in bytes.
PATH_MAX = 4096
NAME_MAX = 255
# A device file the agent reads for a setting (os-release, the default file, the tag, a
# token...) is a few hundred bytes; this bounds what a damaged image can make it hold.
MAX_DEVICE_FILE = 1 << 20
# The characters of an HTTP header's name (RFC 9110 section 5.6.2, "tchar").
HEADER_NAME_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class NotAFile(OSError):
    """Something other than a regular file (a directory, a FIFO, a device) where the agent
    reads a file; raised before anything could block on it."""

    def __init__(self, path: str | os.PathLike[str], kind: str) -> None:
        super().__init__(f"{os.fspath(path)} is a {kind}, not a regular file")
        self.strerror = f"a {kind}, not a regular file"
        self.filename = os.fspath(path)


def kind(mode: int) -> str:
    """What a file of ``mode`` (``st_mode``) is, for a message."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o600,
                 ) -> int:
    """A descriptor of the regular file at ``path``, opened so that nothing can block:
    ``O_NONBLOCK`` (a FIFO opens at once, with no writer), then ``fstat`` on what was
    opened, which is refused (``NotAFile``) unless it is a regular file. ``flags`` adds to
    them (``O_CREAT``, ``O_NOFOLLOW``); OSError as ``os.open`` raises it."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise NotAFile(path, kind(st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: str | os.PathLike[str], limit: int = MAX_DEVICE_FILE, flags: int = 0,
              ) -> bytes | None:
    """The bytes of the regular file at ``path``; None when there is nothing there.

    Never blocks (``open_regular``, with ``flags`` added, ``O_NOFOLLOW`` say); OSError when
    it cannot be read, is not a regular file (``NotAFile``) or holds more than ``limit``
    bytes (``EFBIG``).
    """
    try:
        fd = open_regular(path, os.O_RDONLY | flags)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        size = 0
        while chunk := os.read(fd, min(65536, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(27, f"larger than {limit} bytes", os.fspath(path))  # EFBIG
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_line(fd: int, limit: int, seconds: float) -> bytes:
    """The first line of what ``fd`` (a pipe, a file) gives, without its newline: read
    until a newline or the end, at most ``limit`` bytes, within ``seconds``. Nothing is
    waited for past a newline. OSError: ``ETIMEDOUT`` when no line ended in time,
    ``EFBIG`` when the line is longer than ``limit``."""
    end = time.monotonic() + seconds
    data = b""
    while b"\n" not in data:
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"a line longer than {limit} bytes")
        left = end - time.monotonic()
        if left <= 0:
            raise OSError(errno.ETIMEDOUT, f"no whole line within {seconds:g} s")
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    line = data.split(b"\n", 1)[0]
    if len(line) > limit:
        raise OSError(errno.EFBIG, f"a line longer than {limit} bytes")
    return line


def decode(data: bytes) -> str:
    """A device file's text. Bytes that are not UTF-8 stay what they are (as surrogates):
    a setting that holds one is refused by ``setting``, naming its place; a comment or a
    line the agent does not read may hold what it likes."""
    return data.decode("utf-8", "surrogateescape")


def shown(value: str) -> str:
    """``value`` for a message: quoted, every byte that is not printable UTF-8 escaped.

    Bytes that the file system or the command line gave as surrogates show as the bytes
    they were; a surrogate no byte stands for (JSON can carry ``"\\ud800"``) as an escape.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return repr(value.encode("utf-8", "surrogateescape"))[1:]
        except UnicodeEncodeError:
            return ascii(value)
    return ascii(value) if any(_is_control(c) for c in value) else repr(value)


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code < 0xA0


def _why_not_text(value: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "it holds bytes that are not UTF-8"
    if any(_is_control(c) for c in value):
        return "it holds a control character"
    return None


def setting(value: str, place: str) -> str:
    """A setting's value from ``place`` (``--tag``, ``$APPS``, ``LMP_FACTORY in
    /etc/os-release``...): text that UTF-8, JSON, TOML and a log line all carry as it is,
    so UTF-8 without control characters. ``ConfigError`` (exit 2) otherwise."""
    why = _why_not_text(value)
    if why is not None:
        raise ConfigError(f"{place} is invalid: {shown(value)}: {why}")
    return value


def secret(value: str, place: str) -> str:
    """A secret setting (a PIN): checked as ``setting`` is, never shown."""
    why = _why_not_text(value)
    if why is not None:
        raise ConfigError(f"{place} is invalid: {why} (the value is secret: not shown)")
    return value


def path(value: str, place: str, room: int = 0) -> str:
    """A path setting: a ``setting`` the kernel can take as a path (no NUL, under
    ``PATH_MAX`` bytes with ``room`` to spare for what goes under it or before it, no name
    in it over ``NAME_MAX``). ``ConfigError`` otherwise."""
    setting(value, place)
    size = len(value.encode("utf-8"))
    if size + room >= PATH_MAX:
        raise ConfigError(f"{place} is invalid: a path of {size} bytes (at most "
                          f"{PATH_MAX - 1 - room} here)")
    longest = max((len(name.encode("utf-8")) for name in value.split("/")), default=0)
    if longest > NAME_MAX:
        raise ConfigError(f"{place} is invalid: a name of {longest} bytes in the path "
                          f"(at most {NAME_MAX})")
    return value


def header_name(value: str, place: str) -> str:
    """The name of an HTTP header (the token header): RFC 9110's token characters."""
    setting(value, place)
    if not value or not set(value) <= HEADER_NAME_CHARS:
        raise ConfigError(f"{place} is invalid: {shown(value)} is not an HTTP header name "
                          "(letters, digits and !#$%&'*+-.^_`|~)")
    return value


def token(value: str, place: str) -> str:
    """The API token, sent as an HTTP header's value: printable ASCII without spaces, as
    every token the factory issues is. Never shown, not even in part."""
    if not all("!" <= c <= "~" for c in value):
        raise ConfigError(f"the API token in {place} is invalid: it holds characters other "
                          "than printable ASCII, which an HTTP header cannot carry (the "
                          "token is secret: not shown)")
    return value


def app_name(name: str, place: str) -> str:
    """An app's name (``--apps``, ``APPS``, a directory of ``compose-apps``): a
    ``setting`` without the comma that separates the names in a list."""
    setting(name, place)
    if "," in name:
        raise ConfigError(f"{place} is invalid: the app name {shown(name)} holds a comma")
    return name
