"""The /proc/net/tcp and /proc/net/tcp6 backend.

The parser is pure (text in, entries out) and tested on fixture text; the
backend is a thin reader around it.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator

from procident.lookup import (
    ConnectionId,
    Endpoint,
    Found,
    IPAddress,
    LookupFailed,
    SocketEntry,
    TcpState,
    normalize_address,
)

TCP4_PATH = "/proc/net/tcp"
TCP6_PATH = "/proc/net/tcp6"
MAX_UID = 2**32 - 1  # uids are unsigned 32-bit


def _parse_address(text: str, byteorder: str) -> IPAddress:
    # The kernel prints each 32-bit word of the network-order address as a
    # native integer (%08X), so on a little-endian host the bytes of each word
    # appear reversed.
    if len(text) == 8:
        return ipaddress.IPv4Address(int(text, 16).to_bytes(4, byteorder))  # type: ignore[arg-type]
    if len(text) == 32:
        raw = b"".join(
            int(text[i : i + 8], 16).to_bytes(4, byteorder)  # type: ignore[arg-type]
            for i in range(0, 32, 8)
        )
        return ipaddress.IPv6Address(raw)
    raise ValueError(f"address {text!r} is neither 8 nor 32 hex digits")


def _parse_endpoint(text: str, byteorder: str) -> Endpoint:
    address, sep, port = text.partition(":")
    if not sep or len(port) != 4:
        raise ValueError(f"endpoint {text!r} is not ADDRESS:PORT")
    return Endpoint(_parse_address(address, byteorder), int(port, 16))


def parse_table(
    text: str, source: str = "", byteorder: str = sys.byteorder
) -> Iterator[SocketEntry]:
    """Parse the text of /proc/net/tcp or /proc/net/tcp6; ValueError names a bad line."""
    lines = text.splitlines()
    for number, line in enumerate(lines[1:], start=2):  # line 1 is the header
        fields = line.split()
        if not fields:
            continue
        try:
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            uid, inode = int(fields[7]), int(fields[9])
            if not 0 <= uid <= MAX_UID:
                raise ValueError(f"uid {uid} is not an unsigned 32-bit number")
            yield SocketEntry(
                local=_parse_endpoint(fields[1], byteorder),
                remote=_parse_endpoint(fields[2], byteorder),
                state=TcpState(int(fields[3], 16)),
                uid=uid,
                inode=inode,
                source=source,
            )
        except (IndexError, ValueError) as err:
            raise ValueError(f"{source or 'table'} line {number}: {err}: {line.strip()!r}") from err


def _mapped(address: IPAddress) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def find_in_tables(
    conn: ConnectionId, tcp4: str, tcp6: str, byteorder: str = sys.byteorder
) -> Found | None:
    """Find `conn` in the text of the two tables; all four values must match (RFC 1413 §3).

    An IPv4 connection may sit in tcp6 as ::ffff:a.b.c.d when its socket is
    dual-stack. Among several matches (a TIME_WAIT ghost beside a new socket
    with the same four values) the one a process holds wins.
    """
    match: SocketEntry | None = None
    listening = False
    port = conn.local.port
    for entry in _candidates(conn, tcp4, tcp6, byteorder):
        local = normalize_address(entry.local.address)
        if entry.state == TcpState.LISTEN:
            if entry.local.port == port and (local == conn.local.address or local.is_unspecified):
                listening = True
        elif (
            entry.local.port == port
            and entry.remote.port == conn.remote.port
            and local == conn.local.address
            and normalize_address(entry.remote.address) == conn.remote.address
            and (match is None or (entry.owned and not match.owned))
        ):
            match = entry
    return Found(match, inbound=listening) if match is not None else None


def _candidates(conn: ConnectionId, tcp4: str, tcp6: str, byteorder: str) -> Iterator[SocketEntry]:
    if conn.local.address.version == 4:
        yield from parse_table(tcp4, TCP4_PATH, byteorder)
    # tcp6 holds IPv6 sockets and dual-stack sockets speaking IPv4 (::ffff:...).
    # An unspecified :: listener accepts IPv4 too unless it is IPV6_V6ONLY,
    # which /proc does not show; counting it as listening errs towards privacy.
    yield from parse_table(tcp6, TCP6_PATH, byteorder)


class ProcfsBackend:
    """Look connections up by reading /proc/net/tcp and /proc/net/tcp6."""

    name = "procfs"

    def __init__(self, tcp4_path: str = TCP4_PATH, tcp6_path: str = TCP6_PATH) -> None:
        self.tcp4_path = tcp4_path
        self.tcp6_path = tcp6_path

    def find(self, conn: ConnectionId) -> Found | None:
        """Look `conn` up in the kernel's tables."""
        ipv4 = conn.local.address.version == 4
        # An IPv6 connection can only be in tcp6; an IPv4 one in either.
        tcp4 = _read(self.tcp4_path, required=True) if ipv4 else ""
        tcp6 = _read(self.tcp6_path, required=not ipv4)
        try:
            return find_in_tables(conn, tcp4, tcp6)
        except ValueError as err:
            raise LookupFailed(f"cannot parse the kernel's socket table: {err}") from err


def _read(path: str, required: bool) -> str:
    try:
        # Bytes, decoded here: a text-mode open() would import a codec module
        # lazily, which fails once root is dropped if Python lives in /root.
        with open(path, "rb") as table:
            return table.read().decode("ascii")
    except FileNotFoundError:
        if required:
            raise LookupFailed(f"{path} does not exist") from None
        return ""  # no IPv6 (or no IPv4) on this host: nothing can be there
    except (OSError, UnicodeDecodeError) as err:
        raise LookupFailed(f"cannot read {path}: {err}") from err
