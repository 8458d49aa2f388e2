"""Properties that hold for any input (Hypothesis): the query reader, the reply
formatter, the config loader and the /proc parser; and every parser's known worst
inputs (fuzz/worst_cases.py) give a result or the parser's planned error."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import string
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procident.config import ConfigError, parse_config
from procident.lookup import Endpoint, SocketEntry, TcpState
from procident.lookup.procfs import parse_line, parse_table
from procident.protocol import (
    MAX_LINE,
    ErrorReply,
    ErrorType,
    InvalidPort,
    Malformed,
    Overlong,
    Query,
    QueryReader,
    ReplyError,
    UserIdReply,
    format_reply,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that matter to the reader, often; any byte, sometimes.
query_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"1", b"0", b"9", b"65535", b"65536", b",", b" ", b"\t", b"\r", b"\n"]),
        st.sampled_from([b"+", b"-", b"_", b"a", b"\x00", b"\xff", "\u0665".encode()]),
        st.binary(max_size=4),
    ),
    max_size=60,
).map(b"".join)
STRICT_LINE = re.compile(rb"[ \t]*[0-9]{1,5}[ \t]*,[ \t]*[0-9]{1,5}[ \t]*\r?")


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    return [*pieces, data[start:]]


@SETTINGS
@given(query_bytes, st.lists(st.integers(0, 80), max_size=6))
def test_reader_any_bytes_any_split(data: bytes, cuts: list[int]) -> None:
    """Never raises; the same events however the stream is split; never more events than
    lines; a Query or InvalidPort only for a line PROTOCOL.md accepts, with ports as
    read; nothing after Malformed or Overlong."""
    whole = QueryReader().feed(data)
    reader = QueryReader()
    pieces = [event for piece in splits(data, cuts) for event in reader.feed(piece)]
    assert pieces == whole
    lines = data.split(b"\n")
    complete = lines[:-1]
    assert len([e for e in whole if not isinstance(e, Overlong)]) <= len(complete)
    for index, event in enumerate(whole):
        if isinstance(event, (Malformed, Overlong)):
            assert index == len(whole) - 1
            continue
        line = complete[index]
        assert STRICT_LINE.fullmatch(line), line
        numbers = [int(n) for n in re.findall(rb"[0-9]+", line)]
        assert [event.server_port, event.client_port] == numbers
        in_range = all(1 <= n <= 65535 for n in numbers)
        assert isinstance(event, Query) == in_range
        assert isinstance(event, InvalidPort) == (not in_range)


@SETTINGS
@given(
    st.binary(min_size=MAX_LINE + 2, max_size=MAX_LINE + 200).map(lambda b: b.replace(b"\n", b"x"))
)
def test_reader_overlong_line(data: bytes) -> None:
    """More than 1000 bytes without an end of line is Overlong, and nothing else."""
    assert QueryReader().feed(data) == [Overlong()]


REPLY_LINE = re.compile(
    rb"[0-9]{1,5},[0-9]{1,5}:(?:ERROR:(?:INVALID-PORT|NO-USER|HIDDEN-USER|UNKNOWN-ERROR)"
    rb"|USERID:[\x21-\x2b\x2d-\x39\x3b-\x7e]{1,64}(?:,[\x21-\x2b\x2d-\x39\x3b-\x7e]{1,64})?"
    rb":[^\x00-\x1f\x7f]{1,512})\r\n"
)


@SETTINGS
@given(
    st.integers(1, 65535),
    st.integers(1, 65535),
    st.text(max_size=600),
    st.text(max_size=70),
    st.none() | st.text(max_size=70),
)
def test_formatter_output_is_always_rfc(server_port, client_port, user_id, os, charset) -> None:
    """Whatever the id and tokens, the formatter either refuses them (ReplyError) or
    writes a line of the RFC grammar: one line, id of 1 to 512 octets without a C0 or C1
    control character, DEL or a Unicode line or paragraph separator."""
    try:
        line = format_reply(server_port, client_port, UserIdReply(user_id, os, charset))
    except ReplyError:
        return
    assert REPLY_LINE.fullmatch(line), line
    assert line.count(b"\n") == 1
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", user_id)


@SETTINGS
@given(st.integers(0, 99999), st.integers(0, 99999), st.sampled_from(list(ErrorType)))
def test_formatter_errors(server_port, client_port, error) -> None:
    """Error replies always format, echoing the ports."""
    line = format_reply(server_port, client_port, ErrorReply(error))
    assert line == b"%d,%d:ERROR:%s\r\n" % (server_port, client_port, error.value.encode())


KNOWN = {
    "server": ["listen", "user", "group", "keep_root"],
    "limits": ["idle_timeout", "max_connections", "per_client_rate", "over_limit"],
    "reply": ["os", "charset", "inbound", "reply_all", "fallback", "mask_errors"],
    "users": ["noident", "max_file_size"],
    "access": ["allow", "deny"],
    "metrics": ["listen", "interval"],
    "log": ["level", "format"],
}
RULE_KEYS = ["users", "uids", "clients", "server_ports", "action", "reply", "forward", "user_may"]
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["hide", "real", "reply", "127.0.0.1:113", "10.0.0.0/8", "1-9", "spoof"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, object]:
    data: dict[str, object] = {}
    for section in draw(st.lists(st.sampled_from([*KNOWN, "rules", "bogus"]), max_size=4)):
        if section == "rules":
            data["rules"] = draw(
                st.lists(
                    st.dictionaries(st.sampled_from(RULE_KEYS), toml_values, max_size=4)
                    | toml_values,
                    max_size=3,
                )
            )
        elif section == "bogus":
            data[draw(st.text(max_size=6))] = draw(toml_values)
        else:
            keys = st.sampled_from(KNOWN[section]) | st.text(max_size=6)
            data[section] = draw(st.dictionaries(keys, toml_values, max_size=3) | toml_values)
    return data


@SETTINGS
@given(configs())
def test_config_loader_gives_config_or_config_error(data: dict[str, object]) -> None:
    """Any TOML data gives a Config or a ConfigError naming the file; never another error."""
    try:
        parse_config(data, "f.toml")
    except ConfigError as err:
        assert str(err).startswith("f.toml: ")


hex_text = st.text(alphabet=string.hexdigits + ": +_x-", max_size=40)


@SETTINGS
@given(st.lists(st.one_of(hex_text, st.text(max_size=12)), min_size=0, max_size=14))
def test_proc_line_parses_or_refuses(fields: list[str]) -> None:
    """Any row gives a SocketEntry or a ValueError."""
    with contextlib.suppress(ValueError):
        parse_line(" ".join(fields))


def kernel_row(entry: SocketEntry, index: int) -> str:
    """A row as the kernel writes it (net/ipv4/tcp_ipv4.c, net/ipv6/tcp_ipv6.c)."""

    def address(endpoint: Endpoint) -> str:
        raw = endpoint.address.packed
        words = [int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, len(raw), 4)]
        return "".join(f"{word:08X}" for word in words) + f":{endpoint.port:04X}"

    return (
        f"{index:4d}: {address(entry.local)} {address(entry.remote)} {entry.state:02X} "
        f"00000000:00000000 00:00000000 00000000 {entry.uid:5d}        0 {entry.inode} "
        "1 0000000000000000 20 4 30 10 -1"
    )


addresses4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
addresses6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))


@st.composite
def entries(draw: st.DrawFn, addresses: st.SearchStrategy[object]) -> SocketEntry:
    def endpoint() -> Endpoint:
        return Endpoint(draw(addresses), draw(st.integers(0, 65535)))  # type: ignore[arg-type]

    return SocketEntry(
        endpoint(),
        endpoint(),
        draw(st.sampled_from(list(TcpState))),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**40)),
    )


@SETTINGS
@given(st.lists(entries(addresses4), max_size=5), st.lists(entries(addresses6), max_size=5))
def test_proc_table_round_trip(rows4: list[SocketEntry], rows6: list[SocketEntry]) -> None:
    """A table written the kernel's way parses back to the same entries, IPv4 and IPv6."""
    header = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
        "   uid  timeout inode"
    )
    for rows, source in ((rows4, "/proc/net/tcp"), (rows6, "/proc/net/tcp6")):
        text = "\n".join([header, *(kernel_row(e, i) for i, e in enumerate(rows))]) + "\n"
        parsed = list(parse_table(text, source))
        assert [(e.local, e.remote, e.state, e.uid, e.inode) for e in parsed] == [
            (e.local, e.remote, e.state, e.uid, e.inode) for e in rows
        ]


# -- the conntrack parser ------------------------------------------------------------

conntrack_words = st.sampled_from(
    [
        "ipv4",
        "ipv6",
        "2",
        "10",
        "tcp",
        "6",
        "udp",
        "17",
        "ESTABLISHED",
        "[ASSURED]",
        "src=10.0.0.1",
        "dst=10.0.0.2",
        "sport=1",
        "dport=65535",
        "sport=70000",
        "src=::1",
        "dst=x",
        "use=1",
        "packets=3",
        "=",
    ]
)


@SETTINGS
@given(st.lists(st.one_of(conntrack_words, st.text(max_size=10)), max_size=20))
def test_conntrack_line_parses_or_refuses(words: list[str]) -> None:
    """Any line gives a tracked connection, None (not TCP) or a ValueError."""
    from procident.lookup.conntrack import parse_line as parse_conntrack

    with contextlib.suppress(ValueError):
        parse_conntrack(" ".join(words))


@st.composite
def tracked_connections(draw: st.DrawFn) -> tuple[str, list[Endpoint]]:
    six = draw(st.booleans())
    addresses = addresses6 if six else addresses4
    ends = [Endpoint(draw(addresses), draw(st.integers(0, 65535))) for _ in range(4)]  # type: ignore[arg-type]

    def show(endpoint: Endpoint) -> str:
        address = endpoint.address
        if address.version == 6:  # the kernel's %pI6: eight groups of four digits
            return address.exploded
        return str(address)

    tuples = " ".join(
        f"src={show(a)} dst={show(b)} sport={a.port} dport={b.port}"
        for a, b in ((ends[0], ends[1]), (ends[2], ends[3]))
    )
    family = "ipv6     10" if six else "ipv4     2"
    return f"{family} tcp      6 431999 ESTABLISHED {tuples} [ASSURED] mark=0 use=1", ends


@SETTINGS
@given(tracked_connections())
def test_conntrack_round_trip(case: tuple[str, list[Endpoint]]) -> None:
    """A line written the kernel's way parses back to the same four ends."""
    from procident.lookup import normalize_address
    from procident.lookup.conntrack import parse_line as parse_conntrack

    line, ends = case
    tracked = parse_conntrack(line)
    assert tracked is not None and tracked.state == "ESTABLISHED"
    expected = [Endpoint(normalize_address(e.address), e.port) for e in ends]
    got = [tracked.original.src, tracked.original.dst, tracked.reply.src, tracked.reply.dst]
    assert got == expected


# -- the worst inputs known for each parser ------------------------------------

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent.parent / "fuzz"))
import worst_cases  # noqa: E402

WORST = [(parser, case) for parser, cases in worst_cases.CASES.items() for case in cases]


@pytest.mark.parametrize(("parser", "case"), WORST, ids=[f"{p}-{c}" for p, c in WORST])
@pytest.mark.parametrize("size", [1, 1000, 65536])
def test_worst_cases_give_a_result_or_the_planned_error(parser, case, size, tmp_path) -> None:
    """Each worst case, at a few sizes up to 64 KiB, gives a result or the error the parser
    plans for bad input (UserFileError, ConfigError, ValueError), never another exception
    (parse lets any other through); and that error is said on one line."""
    answer = worst_cases.parse(parser, worst_cases.CASES[parser][case](size), str(tmp_path))
    assert answer and "\n" not in answer and "\r" not in answer
