"""The connection-tracking parser on fixture text (tests/data/nf_conntrack.txt)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from procident.lookup import ConnectionId, Endpoint
from procident.lookup.conntrack import find_inner, parse_line, parse_table

TABLE = (Path(__file__).parent / "data" / "nf_conntrack.txt").read_text()
GATEWAY = ipaddress.ip_address("203.0.113.1")
PEER = ipaddress.ip_address("198.51.100.7")


def ep(address: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(address), port)


def test_tcp_entries_only() -> None:
    """TCP lines are read, in every state, with accounting fields or [UNREPLIED]; UDP and
    ICMP lines are skipped."""
    entries = list(parse_table(TABLE))
    assert [e.state for e in entries] == [
        "ESTABLISHED",
        "SYN_SENT",
        "ESTABLISHED",
        "ESTABLISHED",
        "TIME_WAIT",
    ]
    first = entries[0]
    assert (first.original.src, first.original.dst) == (ep("10.0.0.2", 40001), ep(str(PEER), 6667))
    assert (first.reply.src, first.reply.dst) == (ep(str(PEER), 6667), ep(str(GATEWAY), 50123))


def test_find_inner_ipv4() -> None:
    """A query to the gateway about (its port 50123, the peer's 6667) names the inner host's
    connection from 10.0.0.2 port 40001."""
    query = ConnectionId(Endpoint(GATEWAY, 50123), Endpoint(PEER, 6667))
    assert find_inner(TABLE, query) == ConnectionId(ep("10.0.0.2", 40001), ep(str(PEER), 6667))


def test_find_inner_ipv6() -> None:
    """IPv6 tuples, written uncompressed by the kernel, are matched too."""
    query = ConnectionId(ep("2001:db8:1::1", 50124), ep("2001:db8::7", 6667))
    assert find_inner(TABLE, query) == ConnectionId(ep("fd00::2", 40002), ep("2001:db8::7", 6667))


@pytest.mark.parametrize(
    ("local", "remote"),
    [
        (("203.0.113.1", 45000), ("198.51.100.7", 6697)),  # the gateway's own connection
        (("203.0.113.1", 50123), ("198.51.100.8", 6667)),  # another querier
        (("203.0.113.1", 50999), ("198.51.100.7", 6667)),  # no such port
        (("203.0.113.2", 50123), ("198.51.100.7", 6667)),  # another local address
    ],
)
def test_find_inner_none(local, remote) -> None:
    """Untranslated, absent, or asked by another host: no inner connection."""
    assert find_inner(TABLE, ConnectionId(ep(*local), ep(*remote))) is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ipv4 2 tcp", "too few fields"),
        ("ipx 2 tcp 6 1 ESTABLISHED", "unknown layer 3 protocol"),
        ("ipv4 2 tcp six 1", "is not a number"),
        ("ipv4 2 tcp 6 1 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2", "two complete"),
        (
            "ipv4 2 tcp 6 1 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1 dport=70000 "
            "src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1",
            "'70000' is not a port",
        ),
        (
            "ipv4 2 tcp 6 1 ESTABLISHED src=10.0.0.999 dst=10.0.0.2 sport=1 dport=2 "
            "src=10.0.0.2 dst=10.0.0.1 sport=2 dport=1",
            "does not appear to be an IPv4 or IPv6 address",
        ),
    ],
)
def test_bad_lines(line: str, message: str) -> None:
    """A line that is not a conntrack entry is a ValueError with the reason."""
    with pytest.raises(ValueError, match=message):
        parse_line(line)


def test_bad_line_named_in_table() -> None:
    """parse_table names the line number of a bad line."""
    with pytest.raises(ValueError, match="nf_conntrack line 2: too few fields"):
        list(parse_table(TABLE.splitlines()[0] + "\nipv4 2\n"))
