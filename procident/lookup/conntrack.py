"""NAT: the kernel's connection-tracking table, /proc/net/nf_conntrack. Pure parsing.

Each line is one tracked connection: the layer 3 and 4 protocols, the timeout, for
TCP its state, then the tuple of the original direction and the tuple of the reply
direction (net/netfilter/nf_conntrack_standalone.c):

    ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.2 dst=198.51.100.7 sport=40001
    dport=6667 src=198.51.100.7 dst=203.0.113.1 sport=6667 dport=50123 [ASSURED] mark=0 use=1

(one line in the file). With accounting on, each tuple is followed by packets=
and bytes=. For a masqueraded connection the original tuple is the inner host's
(src=inner address, sport=inner port) and the reply tuple is what the outer peer
sees (dst=the gateway's outer address, dport=the port it was given): an ident
query to the gateway names the reply tuple.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from procident.lookup import ConnectionId, Endpoint, IPAddress, normalize_address

TCP = 6
_TUPLE_KEYS = ("src", "dst", "sport", "dport")


@dataclass(frozen=True, slots=True)
class Direction:
    """One direction's tuple: its source and destination ends."""

    src: Endpoint
    dst: Endpoint


@dataclass(frozen=True, slots=True)
class Tracked:
    """One tracked TCP connection: as its initiator sent it (original) and as the
    other end answers it (reply)."""

    state: str
    original: Direction
    reply: Direction


def _address(text: str) -> IPAddress:
    return normalize_address(ipaddress.ip_address(text))


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise ValueError(f"{text!r} is not a port")
    return int(text)


def parse_line(line: str) -> Tracked | None:
    """One line of nf_conntrack: a TCP connection, None for other protocols; ValueError
    for a line that is not one."""
    fields = line.split()
    if len(fields) < 4:
        raise ValueError("too few fields")
    if fields[0] not in ("ipv4", "ipv6") or fields[1] not in ("2", "10"):
        raise ValueError(f"unknown layer 3 protocol {fields[0]!r} {fields[1]!r}")
    if not fields[3].isascii() or not fields[3].isdigit():
        raise ValueError(f"layer 4 protocol number {fields[3]!r} is not a number")
    if int(fields[3]) != TCP:
        return None
    # After the timeout comes TCP's state name (SYN_SENT, ESTABLISHED, TIME_WAIT, ...).
    state = fields[5] if len(fields) > 5 and "=" not in fields[5] else ""
    tuples: list[dict[str, str]] = [{}]
    for field in fields[4:]:
        key, equals, value = field.partition("=")
        if not equals or key not in _TUPLE_KEYS:
            continue
        if key in tuples[-1]:
            tuples.append({})
        tuples[-1][key] = value
    if len(tuples) != 2 or any(set(t) != set(_TUPLE_KEYS) for t in tuples):
        raise ValueError("not two complete src/dst/sport/dport tuples")
    original, reply = (
        Direction(
            Endpoint(_address(t["src"]), _port(t["sport"])),
            Endpoint(_address(t["dst"]), _port(t["dport"])),
        )
        for t in tuples
    )
    return Tracked(state, original, reply)


def parse_table(text: str) -> Iterator[Tracked]:
    """Every TCP connection in the text of /proc/net/nf_conntrack; ValueError names a bad
    line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tracked = parse_line(line)
        except ValueError as err:
            raise ValueError(f"nf_conntrack line {number}: {err}: {line.strip()[:120]!r}") from err
        if tracked is not None:
            yield tracked


def find_inner(text: str, query: ConnectionId) -> ConnectionId | None:
    """The inner connection behind a query to the gateway, or None.

    `query` is the connection the gateway was asked about: local = the gateway's
    address and the server port, remote = the querier and the client port. It is the
    reply tuple of a translated connection seen from the gateway (the reply's source is
    the querier, its destination the gateway). The result is the original tuple as the
    inner host sees it: local = the inner host and its port, remote = the querier.
    """
    for tracked in parse_table(text):
        if tracked.reply.src == query.remote and tracked.reply.dst == query.local:
            if tracked.original.src == query.local:
                return None  # not translated: the gateway's own connection
            return ConnectionId(tracked.original.src, tracked.original.dst)
    return None
