"""NAT: the kernel's connection-tracking table, /proc/net/nf_conntrack: parsing (pure) and
a reader.

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
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from procident.lookup.types import (
    ConnectionId,
    Endpoint,
    IPAddress,
    LookupFailed,
    lines_with,
    normalize_address,
)

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


def _spell(address: IPAddress) -> str:
    """An address as the kernel prints it in nf_conntrack: IPv6 uncompressed (%pI6)."""
    return address.exploded if address.version == 6 else str(address)


def find_translated(
    chunks: Iterable[str], local: Endpoint, remote_port: int, remote: IPAddress | None
) -> list[ConnectionId]:
    """The inner connections behind a query to the gateway, from the table's text given
    in pieces (read as it streams: only the lines that can match are parsed).

    The query names the gateway's end `local` (its address and the server port) and the
    querier's port `remote_port`, and the querier's address `remote`; None when any
    address will do (a query forwarded by the next gateway out, which names only ports).
    A match is the reply tuple of a translated connection seen from the gateway: its
    source is the querier, its destination the gateway. Each result is the original
    tuple as the inner host sees it: local = the inner host and its port, remote = the
    querier. Connections the gateway made itself (not translated) are left out.
    """
    dst = f"dst={_spell(local.address)} sport={remote_port} dport={local.port} "
    needle = f"src={_spell(remote)} {dst}" if remote is not None else f" {dst}"
    found: list[ConnectionId] = []
    for line in lines_in(chunks, needle):
        tracked = parse_line(line)
        if tracked is None:
            continue
        reply = tracked.reply
        if reply.dst != local or reply.src.port != remote_port:
            continue  # the needle matched the original tuple, or a longer port
        if remote is not None and reply.src.address != remote:
            continue
        if tracked.original.src == local:
            continue  # not translated: the gateway's own connection
        inner = ConnectionId(tracked.original.src, tracked.original.dst)
        if inner not in found:
            found.append(inner)
    return found


MAX_LINE = 4096  # a longer line is not the kernel's format


def lines_in(chunks: Iterable[str], needle: str) -> Iterator[str]:
    """The lines holding `needle`, in text that comes in pieces cut anywhere."""
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        cut = text.rfind("\n") + 1
        yield from lines_with(text[:cut], needle)
        carry = text[cut:]
        if len(carry) > MAX_LINE:
            raise ValueError(f"a line longer than {MAX_LINE} characters")
    if carry:
        yield from lines_with(carry, needle)


def find_inner(text: str, query: ConnectionId) -> ConnectionId | None:
    """The inner connection behind a query to the gateway about `query` (local = the
    gateway's address and the server port, remote = the querier and the client port),
    or None; see find_translated."""
    found = find_translated([text], query.local, query.remote.port, query.remote.address)
    return found[0] if found else None


PATH = "/proc/net/nf_conntrack"
CHUNK = 1 << 18  # bytes read at a time: what a search outside a batch holds at most


class ConntrackTable:
    """The kernel's connection-tracking table, opened once (as root: the file is
    readable by root only) and read afresh, from its start, for every search.

    A seq_file in /proc produces its text again from the kernel's table after a seek to
    the start; the permission check was made at open, so the daemon can drop root and
    keep reading. Reading costs a walk of the whole table, which is why only queries
    that find no local socket get here. ctnetlink could ask for one tuple, but the
    kernel checks CAP_NET_ADMIN on every message, which a daemon that dropped root lacks.
    """

    def __init__(self, path: str = PATH) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # OSError for the caller
        self._batch: list[str] | None = None  # inside a batch: its one read, once made
        self.reads = 0  # reads of the whole table so far

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Searches in this block share one read of the table (held whole until the
        block ends): queries that arrive together cost one walk of the kernel's table,
        however many they are. Outside a batch each search streams a read of its own."""
        self._batch = []
        try:
            yield
        finally:
            self._batch = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _chunks(self) -> Iterator[str]:
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.reads += 1
        while data := os.read(self.fd, CHUNK):
            yield data.decode("ascii", "replace")

    def _text(self) -> Iterable[str]:
        if self._batch is None:
            return self._chunks()
        if not self._batch:
            self._batch.append("".join(self._chunks()))
        return self._batch

    def find(
        self, local: Endpoint, remote_port: int, remote: IPAddress | None
    ) -> list[ConnectionId]:
        """Inner connections behind a query (find_translated); LookupFailed when the table
        cannot be read or understood."""
        try:
            return find_translated(self._text(), local, remote_port, remote)
        except OSError as err:
            raise LookupFailed(f"cannot read {self.path}: {err.strerror}") from err
        except ValueError as err:
            raise LookupFailed(f"cannot parse {self.path}: {err}") from err
