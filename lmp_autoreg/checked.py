"""Bytes from outside become checked values, with an error naming where they came from.

Everything the agent takes from outside passes through here once, at the place it enters:
the server's answers, and the device's files and settings (the command line, the
environment, the default file, ``/etc/os-release`` and the other device files). A value
that cannot be used is refused with the error of its exit code (docs/spec.md section 6),
naming its place; it never reaches code that would fail on it with a bug (exit 1).

Only ``os`` and ``errors``: the guard reads its settings through this module on every
start (docs/performance.md).
"""

import os
import stat

from .errors import ConfigError

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

    def __init__(self, path: "str | os.PathLike[str]", kind: str) -> None:
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


def open_regular(path: "str | os.PathLike[str]", flags: int = os.O_RDONLY, mode: int = 0o600,
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


def read_file(path: "str | os.PathLike[str]", limit: int = MAX_DEVICE_FILE, flags: int = 0,
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


def decode(data: bytes) -> str:
    """A device file's text. Bytes that are not UTF-8 stay what they are (as surrogates):
    a setting that holds one is refused by ``setting``, naming its place; a comment or a
    line the agent does not read may hold what it likes."""
    return data.decode("utf-8", "surrogateescape")


def shown(value: str) -> str:
    """``value`` for a message: quoted, every byte that is not printable UTF-8 escaped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return repr(value.encode("utf-8", "surrogateescape"))[1:]
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
