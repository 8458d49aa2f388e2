"""RFC 1413 reading and writing, as PROTOCOL.md fixes it; no I/O."""

from __future__ import annotations

import pytest

from procident.protocol import (
    MAX_LINE,
    ErrorReply,
    ErrorType,
    Event,
    InvalidPort,
    Malformed,
    Overlong,
    Query,
    QueryReader,
    ReplyError,
    UserIdReply,
    format_reply,
    parse_reply,
)

# input bytes -> the events they must produce, whatever the split
READ_TABLE: list[tuple[bytes, list[Event]]] = [
    (b"6193,23\r\n", [Query(6193, 23)]),
    (b"6193,23\n", [Query(6193, 23)]),
    (b"6193, 23\r\n", [Query(6193, 23)]),
    (b" \t6193 \t, \t23 \t\r\n", [Query(6193, 23)]),
    (b"00080,00113\r\n", [Query(80, 113)]),
    (b"1,65535\r\n", [Query(1, 65535)]),
    (b"65535,1\n", [Query(65535, 1)]),
    (b"0,23\r\n", [InvalidPort(0, 23)]),
    (b"23,0\r\n", [InvalidPort(23, 0)]),
    (b"65536,23\r\n", [InvalidPort(65536, 23)]),
    (b"99999,99999\r\n", [InvalidPort(99999, 99999)]),
    (b"00000,5\r\n", [InvalidPort(0, 5)]),
    # not a port pair: answered 0,0 and the reader is finished
    (b"\r\n", [Malformed()]),
    (b"\n", [Malformed()]),
    (b"6193\r\n", [Malformed()]),
    (b"6193;23\r\n", [Malformed()]),
    (b"6193,23,5\r\n", [Malformed()]),
    (b"abc,def\r\n", [Malformed()]),
    (b"+5,23\r\n", [Malformed()]),
    (b"-5,23\r\n", [Malformed()]),
    (b"1_0,23\r\n", [Malformed()]),
    (b"1 0,23\r\n", [Malformed()]),
    (b"123456,23\r\n", [Malformed()]),
    ("\u0665,23\r\n".encode(), [Malformed()]),  # ARABIC-INDIC DIGIT FIVE
    ("\uff15,23\r\n".encode(), [Malformed()]),  # FULLWIDTH DIGIT FIVE
    (b"6193,23\x00\r\n", [Malformed()]),
    (b"6193,23 x\r\n", [Malformed()]),
    (b"6193\r,23\r\n", [Malformed()]),  # a lone CR is not white space either
    (b"6193,23\r\r\n", [Malformed()]),
    (b"\xff\xfe,23\r\n", [Malformed()]),
    # several queries, answered in order; nothing after a malformed line
    (b"1,2\r\n3,4\n5,6\r\n", [Query(1, 2), Query(3, 4), Query(5, 6)]),
    (b"1,2\r\n0,4\r\n5,6\r\n", [Query(1, 2), InvalidPort(0, 4), Query(5, 6)]),
    (b"1,2\r\nfoo\r\n5,6\r\n", [Query(1, 2), Malformed()]),
    # incomplete lines are no event: a lone CR does not end a line
    (b"6193,23", []),
    (b"6193,23\r", []),
    (b"6193,23\r 5,6", []),
    # length: the line's bytes without its end of line, at most MAX_LINE
    (b" " * (MAX_LINE - 3) + b"1,2\r\n", [Query(1, 2)]),
    (b" " * (MAX_LINE - 3) + b"1,2\n", [Query(1, 2)]),
    (b" " * (MAX_LINE - 2) + b"1,2\r\n", [Overlong()]),
    (b" " * (MAX_LINE - 2) + b"1,2\n", [Overlong()]),
    (b"x" * (MAX_LINE + 1), [Overlong()]),
    (b"x" * MAX_LINE, []),
    (b"x" * MAX_LINE + b"\r", []),
    (b"x" * MAX_LINE + b"\r\r", [Overlong()]),
    (b"1,2\n" + b"x" * 5000, [Query(1, 2), Overlong()]),
]


def feed_whole(data: bytes) -> list[Event]:
    return QueryReader().feed(data)


def feed_bytewise(data: bytes) -> list[Event]:
    reader = QueryReader()
    return [event for i in range(len(data)) for event in reader.feed(data[i : i + 1])]


def feed_in_chunks(data: bytes) -> list[Event]:
    reader = QueryReader()
    return [event for i in range(0, len(data), 7) for event in reader.feed(data[i : i + 7])]


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise, feed_in_chunks])
@pytest.mark.parametrize(("data", "expected"), READ_TABLE, ids=lambda v: repr(v)[:40])
def test_reader_table(feed, data: bytes, expected: list[Event]) -> None:
    """Each input gives exactly the events PROTOCOL.md names, however it is split."""
    assert feed(data) == expected


@pytest.mark.parametrize(("data", "expected"), READ_TABLE, ids=lambda v: repr(v)[:40])
def test_trailing_data_after_final_event(data: bytes, expected: list[Event]) -> None:
    """After Malformed or Overlong, further input yields nothing; otherwise it is read on."""
    reader = QueryReader()
    events = reader.feed(data)
    more = reader.feed(b"7,8\r\n")
    assert events == expected
    if expected and isinstance(expected[-1], (Malformed, Overlong)):
        assert reader.finished and more == []
    elif data.endswith(b"\n"):
        assert more == [Query(7, 8)]


def test_reader_keeps_at_most_one_line() -> None:
    """The reader holds only the incomplete tail, never the lines it answered."""
    reader = QueryReader()
    reader.feed(b"1,2\r\n" * 500 + b"3,")
    assert reader.pending == 2


# reply -> the exact line on the wire
WRITE_TABLE: list[tuple[int, int, object, bytes]] = [
    (6193, 23, UserIdReply("alice", "UNIX"), b"6193,23:USERID:UNIX:alice\r\n"),
    (6193, 23, UserIdReply("3000000000", "OTHER"), b"6193,23:USERID:OTHER:3000000000\r\n"),
    (
        6193,
        23,
        UserIdReply("j\u00fcrgen", "UNIX", "UTF-8"),
        "6193,23:USERID:UNIX,UTF-8:j\u00fcrgen\r\n".encode(),
    ),
    (6193, 23, UserIdReply(" a b ", "UNIX"), b"6193,23:USERID:UNIX: a b \r\n"),
    (6193, 23, UserIdReply("x" * 512, "UNIX"), b"6193,23:USERID:UNIX:" + b"x" * 512 + b"\r\n"),
    (6193, 23, ErrorReply(ErrorType.NO_USER), b"6193,23:ERROR:NO-USER\r\n"),
    (6193, 23, ErrorReply(ErrorType.HIDDEN_USER), b"6193,23:ERROR:HIDDEN-USER\r\n"),
    (6193, 23, ErrorReply(ErrorType.UNKNOWN_ERROR), b"6193,23:ERROR:UNKNOWN-ERROR\r\n"),
    (0, 0, ErrorReply(ErrorType.INVALID_PORT), b"0,0:ERROR:INVALID-PORT\r\n"),
    (99999, 5, ErrorReply(ErrorType.INVALID_PORT), b"99999,5:ERROR:INVALID-PORT\r\n"),
]


@pytest.mark.parametrize(("server_port", "client_port", "reply", "line"), WRITE_TABLE)
def test_format_table(server_port: int, client_port: int, reply, line: bytes) -> None:
    """Replies are compact, upper-case, CR LF terminated, nothing after the user id."""
    assert format_reply(server_port, client_port, reply) == line


@pytest.mark.parametrize(("server_port", "client_port", "reply", "line"), WRITE_TABLE)
def test_parse_reply_reads_what_format_writes(server_port, client_port, reply, line) -> None:
    """The client-side parser gives back exactly the reply that was formatted."""
    parsed = parse_reply(line[:-2])
    assert (parsed.server_port, parsed.client_port, parsed.reply) == (
        server_port,
        client_port,
        reply,
    )


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (UserIdReply("", "UNIX"), "empty"),
        (UserIdReply("a\rb", "UNIX"), "CR"),
        (UserIdReply("a\nb", "UNIX"), "LF"),
        (UserIdReply("a\0b", "UNIX"), "NUL"),
        (UserIdReply("x" * 513, "UNIX"), "513 octets"),
        (UserIdReply("\u00e9" * 257, "UNIX"), "514 octets"),
        (UserIdReply("alice", ""), "OS token"),
        (UserIdReply("alice", "UN IX"), "OS token"),
        (UserIdReply("alice", "UNIX:"), "OS token"),
        (UserIdReply("alice", "UNIX,"), "OS token"),
        (UserIdReply("alice", "X" * 65), "OS token"),
        (UserIdReply("alice", "\u00dcNIX"), "OS token"),
        (UserIdReply("alice", "UNIX", "UTF 8"), "charset"),
        (UserIdReply("alice", "UNIX", ""), "charset"),
    ],
)
def test_format_refuses_invalid_replies(reply: UserIdReply, reason: str) -> None:
    """No reply that breaks RFC 1413's rules reaches the wire."""
    with pytest.raises(ReplyError, match=reason):
        format_reply(1, 2, reply)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"6193, 23 : USERID : UNIX : stjohns", UserIdReply(" stjohns", "UNIX")),
        (b" 6193 , 23 : userid : UNIX , US-ASCII :x", UserIdReply("x", "UNIX", "US-ASCII")),
        (b"6193,23: ERROR : NO-USER ", ErrorReply(ErrorType.NO_USER)),
        (b"6193,23:ERROR:X-CUSTOM", "X-CUSTOM"),
        (b"6193,23:USERID:UNIX:a:b", UserIdReply("a:b", "UNIX")),
    ],
)
def test_parse_reply_liberal(line: bytes, expected: object) -> None:
    """The client accepts white space around tokens; the user id runs to the end of line."""
    assert parse_reply(line).reply == expected


@pytest.mark.parametrize(
    "line", [b"", b"garbage", b"1,2:USERID:UNIX", b"1,2:WHAT:x", b"1:ERROR:NO-USER"]
)
def test_parse_reply_rejects_malformed(line: bytes) -> None:
    """A reply that is not RFC 1413 is an error, not a guess."""
    with pytest.raises(ValueError):
        parse_reply(line)
