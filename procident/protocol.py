"""RFC 1413 on the wire: read queries, write replies. No I/O here.

Bytes go in through `QueryReader.feed`, events come out; an incomplete line is
a normal result (no event yet), not an error. The behaviour profile is
PROTOCOL.md; section numbers below refer to RFC 1413.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# §6 note 2: clients may give up after 1000 characters without an end of line;
# we hold queries to the same bound.
MAX_LINE = 1000
MAX_USER_ID_OCTETS = 512  # §6 note 3
MAX_TOKEN_CHARS = 64  # §6 note 3
MAX_PORT = 65535

# Spaces and tabs anywhere except inside a number (§6 note 1); a number is
# 1 to 5 ASCII digits. A bytes pattern: [0-9] never matches non-ASCII digits,
# and int() never sees "+5", "1_0" or " 5 ".
_QUERY = re.compile(rb"[ \t]*([0-9]{1,5})[ \t]*,[ \t]*([0-9]{1,5})[ \t]*")
# OS and charset tokens: printable ASCII without space, ':' or ','.
_TOKEN = re.compile(rf"[\x21-\x2b\x2d-\x39\x3b-\x7e]{{1,{MAX_TOKEN_CHARS}}}")


class ErrorType(enum.Enum):
    """The error tokens of §5; each value is the token sent on the wire."""

    INVALID_PORT = "INVALID-PORT"
    NO_USER = "NO-USER"
    HIDDEN_USER = "HIDDEN-USER"
    UNKNOWN_ERROR = "UNKNOWN-ERROR"


@dataclass(frozen=True, slots=True)
class Query:
    """A well-formed query whose ports are both in 1..65535."""

    server_port: int
    client_port: int


@dataclass(frozen=True, slots=True)
class InvalidPort:
    """A well-formed port pair with a port of 0 or above 65535; answered, then go on."""

    server_port: int
    client_port: int


@dataclass(frozen=True, slots=True)
class Malformed:
    """A line that is no port pair: answer 0,0:ERROR:INVALID-PORT, then close."""


@dataclass(frozen=True, slots=True)
class Overlong:
    """More than MAX_LINE bytes without an end of line: close without a reply."""


Event = Query | InvalidPort | Malformed | Overlong


@dataclass(frozen=True, slots=True)
class UserIdReply:
    """A USERID reply: a user id with its operating-system token and optional charset."""

    user_id: str
    os: str
    charset: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An ERROR reply carrying one of the RFC error tokens."""

    error: ErrorType


Reply = UserIdReply | ErrorReply


class ReplyError(ValueError):
    """A reply that must not reach the wire (PROTOCOL.md, 'Writing replies')."""


def parse_query(line: bytes) -> Query | InvalidPort | Malformed:
    """Parse one query line, its end of line already removed."""
    match = _QUERY.fullmatch(line)
    if match is None:
        return Malformed()
    server_port, client_port = int(match[1]), int(match[2])
    if 1 <= server_port <= MAX_PORT and 1 <= client_port <= MAX_PORT:
        return Query(server_port, client_port)
    return InvalidPort(server_port, client_port)


class QueryReader:
    """Incremental query reader: feed it bytes in any split, get events back.

    After a Malformed or Overlong event the reader is finished: the connection
    is to be closed, and further input yields nothing.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.finished = False

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes of the stream; return the events they complete."""
        if self.finished:
            return []
        self._buffer += data
        events: list[Event] = []
        start = 0
        while True:
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buffer[start:end])
            start = end + 1
            # CR LF or a bare LF ends a line; a lone CR does not (PROTOCOL.md).
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_LINE:
                events.append(self._finish(Overlong()))
                return events
            event = parse_query(line)
            events.append(event)
            if isinstance(event, Malformed):
                self._finish(event)
                return events
        del self._buffer[:start]
        if self._incomplete_too_long():
            events.append(self._finish(Overlong()))
        return events

    @property
    def pending(self) -> int:
        """Bytes held for a line not yet complete."""
        return len(self._buffer)

    def _incomplete_too_long(self) -> bool:
        # A full-length line may be waiting for the LF of its CR LF.
        size = len(self._buffer)
        return size > MAX_LINE + 1 or (size == MAX_LINE + 1 and not self._buffer.endswith(b"\r"))

    def _finish(self, event: Malformed | Overlong) -> Event:
        self.finished = True
        self._buffer.clear()
        return event


# Characters that must never reach the wire in an id or token, nor a terminal or a log
# line unescaped: C0 controls (NUL, CR, LF, ESC, VT, FF ...), DEL, C1 controls (NEL,
# CSI ...) and the Unicode line and paragraph separators. In a user id read with
# surrogateescape, raw octets 0x80 to 0x9F (C1 controls to an 8-bit terminal) too.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udc9f]")
# For display, also what makes text look other than it is: the format characters
# (zero-width, bidirectional overrides and isolates, BOM, tags) and lone surrogates.
UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]"
)
_CONTROL_NAMES = {0: "NUL", 10: "LF", 13: "CR", 27: "ESC", 11: "VT", 12: "FF", 0x85: "NEL"}


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    if 0xDC80 <= code <= 0xDCFF:  # a raw octet kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str, limit: int = 0) -> str:
    """`text` safe to print or log: every control, separator and format character written
    as a backslash escape (\\x1b, \\u2028), so what others wrote can neither end a log
    line nor drive a terminal; with `limit`, cut to that many characters and "...".
    Fast when there is nothing to escape (the common case)."""
    if limit and len(text) > limit:
        text = text[:limit] + "..."
    if text.isascii() and text.isprintable():  # nothing to escape, found in C
        return text
    if UNPRINTABLE.search(text) is None:
        return text
    return UNPRINTABLE.sub(_escape, text)


def check_user_id(user_id: str) -> bytes:
    """Encode a user id for the wire, refusing what must not be sent (§6; PROTOCOL.md):
    empty, a control character or separator (_CONTROL), or more than 512 octets."""
    raw = user_id.encode("utf-8", "surrogateescape")
    if not raw:
        raise ReplyError("the user id is empty")
    bad = _CONTROL.search(user_id)
    if bad is not None:
        code = ord(bad[0])
        if code >= 0xDC00:
            code -= 0xDC00
        name = _CONTROL_NAMES.get(code, f"U+{code:04X}")
        raise ReplyError(f"the user id contains the control character {name}")
    if len(raw) > MAX_USER_ID_OCTETS:
        raise ReplyError(
            f"the user id is {len(raw)} octets long; the limit is {MAX_USER_ID_OCTETS}"
        )
    return raw


def check_token(token: str, what: str = "token") -> str:
    """Check an OS or charset token: 1 to 64 printable ASCII characters, no ':' or ','."""
    if not _TOKEN.fullmatch(token):
        raise ReplyError(
            f"the {what} {token!r} is not 1 to {MAX_TOKEN_CHARS} printable ASCII characters "
            "without space, ':' or ','"
        )
    return token


def format_reply(server_port: int, client_port: int, reply: Reply) -> bytes:
    """Format one compact reply line, CR LF included; raise ReplyError if invalid."""
    head = b"%d,%d:" % (server_port, client_port)
    if isinstance(reply, ErrorReply):
        return head + b"ERROR:" + reply.error.value.encode("ascii") + b"\r\n"
    opsys = check_token(reply.os, "OS token")
    if reply.charset is not None:
        opsys += "," + check_token(reply.charset, "charset")
    # §6 note 1: everything after the colon that follows the OS field is the
    # user id, so nothing is put between them, and nothing after the id.
    return head + b"USERID:" + opsys.encode("ascii") + b":" + check_user_id(reply.user_id) + b"\r\n"


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """A reply line as read by a client."""

    server_port: int
    client_port: int
    reply: Reply | str  # str: an error token outside the RFC's four (e.g. "X-...")


_REPLY_HEAD = re.compile(
    rb"[ \t]*([0-9]{1,5})[ \t]*,[ \t]*([0-9]{1,5})[ \t]*:[ \t]*([A-Za-z-]+)[ \t]*:(.*)", re.S
)


def parse_reply(line: bytes) -> ParsedReply:
    """Parse a reply line from an ident server (end of line removed); ValueError if malformed.

    Liberal in what it accepts (§6 note 1): white space around every token,
    except that the user id is everything after the colon following the OS field.
    """
    match = _REPLY_HEAD.fullmatch(line)
    if match is None:
        raise ValueError(f"not an ident reply: {line[:80]!r}")
    server_port, client_port = int(match[1]), int(match[2])
    kind, rest = match[3].upper(), match[4]
    if kind == b"ERROR":
        token = rest.strip(b" \t").decode("ascii", "replace")
        try:
            return ParsedReply(server_port, client_port, ErrorReply(ErrorType(token.upper())))
        except ValueError:
            return ParsedReply(server_port, client_port, token)
    if kind != b"USERID":
        raise ValueError(f"unknown reply type {kind.decode('ascii', 'replace')!r}")
    opsys, colon, user_id = rest.partition(b":")
    if not colon:
        raise ValueError("USERID reply without a user id")
    os_token, _, charset = opsys.partition(b",")
    return ParsedReply(
        server_port,
        client_port,
        UserIdReply(
            user_id=user_id.decode("utf-8", "surrogateescape"),
            os=os_token.strip(b" \t").decode("ascii", "replace"),
            charset=charset.strip(b" \t").decode("ascii", "replace") or None,
        ),
    )
