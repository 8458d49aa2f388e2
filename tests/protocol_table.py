"""One table of inputs and the bytes they must give, from PROTOCOL.md's reading and
writing rules: run against the session itself (test_session.py) and against every
driver over real sockets (test_embed.py). The lookup behind it knows one connection,
40001,6667, owned by alice; every other port pair has no connection."""

from __future__ import annotations

ALICE = b"40001,6667:USERID:UNIX:alice\r\n"
MALFORMED = b"0,0:ERROR:INVALID-PORT\r\n"
# (id, bytes sent, half-close after sending, bytes expected before the server closes)
PROTOCOL_TABLE = [
    ("a query", b"40001,6667\r\n", True, ALICE),
    ("bare LF, spaces and tabs", b" 40001 ,\t6667 \n", True, ALICE),
    ("no such connection", b"1,1\r\n", True, b"1,1:ERROR:NO-USER\r\n"),
    (
        "port 0, then go on",
        b"0,1\r\n1,1\r\n",
        True,
        b"0,1:ERROR:INVALID-PORT\r\n1,1:ERROR:NO-USER\r\n",
    ),
    (
        "port above 65535, echoed as read",
        b"65536,99999\r\n",
        True,
        b"65536,99999:ERROR:INVALID-PORT\r\n",
    ),
    ("letters: 0,0 and close", b"abc\r\n1,1\r\n", True, MALFORMED),
    ("a sign is no number", b"+5,3\r\n", True, MALFORMED),
    ("an underscore is no number", b"1_0,3\r\n", True, MALFORMED),
    ("non-ASCII digits are no number", "\u0665,1\r\n".encode(), True, MALFORMED),
    ("six digits are no port", b"123456,1\r\n", True, MALFORMED),
    ("an empty line", b"\r\n", True, MALFORMED),
    ("a lone CR ends no line", b"1,1\r", True, b""),
    ("1001 bytes without an end of line: closed", b"1" * 1001, False, b""),
    ("1000 bytes with CR LF: a line", b" " * 994 + b"1,1\r\n", True, b"1,1:ERROR:NO-USER\r\n"),
    (
        "pipelined, answered in order",
        b"1,1\r\n40001,6667\r\n2,2\r\n",
        True,
        b"1,1:ERROR:NO-USER\r\n" + ALICE + b"2,2:ERROR:NO-USER\r\n",
    ),
    (
        "max_queries_per_connection; one more already sent hears so",
        b"1,1\r\n" * 25,
        False,
        b"1,1:ERROR:NO-USER\r\n" * 20 + b"1,1:ERROR:UNKNOWN-ERROR\r\n",
    ),
    ("exactly max_queries_per_connection", b"1,1\r\n" * 20, False, b"1,1:ERROR:NO-USER\r\n" * 20),
]
