"""Who owns a connection: the types every lookup backend shares (a leaf: the backends
import it, and procident.lookup re-exports it).

A backend answers one question for a fully specified connection (RFC 1413 §3):
the kernel's entry for it, or None when there is none. "Not found" is None;
"could not look" is LookupFailed.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class LookupFailed(Exception):
    """The kernel's tables could not be read or understood."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a TCP connection."""

    address: IPAddress
    port: int

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConnectionId:
    """A connection of interest as seen from this host (RFC 1413 §3).

    local: the address a query arrived on, with the query's server port;
    remote: the querier's address, with the query's client port.
    """

    local: Endpoint
    remote: Endpoint


class TcpState(enum.IntEnum):
    """TCP states as the kernel numbers them in /proc/net/tcp and sock_diag."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


@dataclass(frozen=True, slots=True)
class SocketEntry:
    """One socket as the kernel lists it."""

    local: Endpoint
    remote: Endpoint
    state: TcpState
    uid: int
    inode: int
    source: str = ""  # where it was found, for explanations: "/proc/net/tcp6", ...

    @property
    def owned(self) -> bool:
        """Whether a process holds this socket.

        The kernel lists a socket that no process holds (closed by its owner:
        TIME_WAIT, FIN_WAIT2, orphans; or not accepted yet) with inode 0 and a
        uid that names nobody, often 0; such a socket has no owner to name.
        """
        return self.inode != 0


@dataclass(frozen=True, slots=True)
class Found:
    """The lookup result: the connection's entry and whether it is inbound.

    inbound: the local port has a listening socket on this host, so the
    connection was most likely made to a local service (PROTOCOL.md, privacy).
    """

    entry: SocketEntry
    inbound: bool


class Backend(Protocol):
    """A way to ask the kernel who owns a connection."""

    name: str

    def find(self, conn: ConnectionId) -> Found | None:
        """Return the kernel's entry for `conn`, None if there is none; raise LookupFailed."""
        ...

    def batch(self) -> AbstractContextManager[None]:
        """A block whose lookups may share one read of the kernel's tables: the server
        answers each loop turn's queries inside one. Outside a batch every lookup is fresh."""
        ...


def normalize_address(address: IPAddress) -> IPAddress:
    """Turn an IPv4-mapped IPv6 address (::ffff:a.b.c.d) into the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def lines_with(text: str, needle: str) -> Iterator[str]:
    """The lines of `text` that contain `needle`, found by str.find (no split of the text)."""
    at = text.find(needle)
    while at >= 0:
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        yield text[text.rfind("\n", 0, at) + 1 : end]
        at = text.find(needle, end)


# Socket address text -> address, for endpoint_from_sockaddr: a host's own addresses and
# its clients' repeat on every accept. Bounded: emptied when full.
_ADDRESSES: dict[str, IPAddress] = {}
_ADDRESSES_SIZE = 4096


def endpoint_from_sockaddr(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
    """An Endpoint from a socket address as Python returns it (scope ids dropped)."""
    text = sockaddr[0]
    address = _ADDRESSES.get(text)
    if address is None:
        host = text.split("%", 1)[0]
        # From the packed bytes: four times cheaper than parsing the text.
        parsed: IPAddress
        if ":" in host:
            parsed = ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, host))
        else:
            parsed = ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, host))
        address = normalize_address(parsed)
        if len(_ADDRESSES) >= _ADDRESSES_SIZE:
            _ADDRESSES.clear()
        _ADDRESSES[text] = address
    return Endpoint(address, sockaddr[1])
