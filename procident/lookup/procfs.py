"""The /proc/net/tcp and /proc/net/tcp6 backend.

The parser is pure (text in, entries out) and tested on fixture text; the
backend is a thin reader around it.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from procident.lookup.types import (
    ConnectionId,
    Endpoint,
    Found,
    IPAddress,
    LookupFailed,
    SocketEntry,
    TcpState,
    lines_with,
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


def parse_line(line: str, source: str = "", byteorder: str = sys.byteorder) -> SocketEntry:
    """Parse one row of /proc/net/tcp or tcp6; ValueError if it is not one."""
    fields = line.split()
    try:
        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        uid, inode = int(fields[7]), int(fields[9])
        if not 0 <= uid <= MAX_UID:
            raise ValueError(f"uid {uid} is not an unsigned 32-bit number")
        return SocketEntry(
            local=_parse_endpoint(fields[1], byteorder),
            remote=_parse_endpoint(fields[2], byteorder),
            state=TcpState(int(fields[3], 16)),
            uid=uid,
            inode=inode,
            source=source,
        )
    except IndexError:
        raise ValueError("too few fields") from None


def parse_table(
    text: str, source: str = "", byteorder: str = sys.byteorder
) -> Iterator[SocketEntry]:
    """Parse the whole text of /proc/net/tcp or /proc/net/tcp6; ValueError names a bad line."""
    for number, line in enumerate(text.splitlines()[1:], start=2):  # line 1 is the header
        if line.strip():
            try:
                yield parse_line(line, source, byteorder)
            except ValueError as err:
                where = f"{source or 'table'} line {number}"
                raise ValueError(f"{where}: {err}: {line.strip()!r}") from err


def _hex(address: IPAddress, port: int, byteorder: str) -> str:
    """An endpoint spelt as the kernel prints it: each 32-bit word of the address as a
    native integer in upper-case hex, then the port."""
    raw = address.packed
    words = "".join(
        f"{int.from_bytes(raw[i : i + 4], byteorder):08X}"  # type: ignore[arg-type]
        for i in range(0, len(raw), 4)
    )
    return f"{words}:{port:04X}"


def _check_header(text: str, source: str) -> None:
    # The search below never looks at lines that do not match, so a kernel that
    # printed its rows differently would turn every answer into NO-USER; a
    # header with other field names is refused instead.
    if not text:
        return  # no such table on this host
    names = text[: text.find("\n")].split()
    if names[:2] != ["sl", "local_address"] or names[9:12] != ["uid", "timeout", "inode"]:
        raise ValueError(f"{source}: unexpected header {' '.join(names)!r}")


_IPV4_ANY = ipaddress.IPv4Address("0.0.0.0")
_IPV6_ANY = ipaddress.IPv6Address("::")


def _mapped(address: IPAddress) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


class Table:
    """One read of /proc/net/tcp or tcp6, searched by the kernel's spelling of endpoints.

    The first lookup searches the raw text, which costs less than indexing it for a
    single query. A second lookup in the same read (queries that arrived in the same
    loop turn) builds an index once, and every lookup after that is a dict access
    instead of a scan of the whole text.
    """

    def __init__(self, text: str, source: str) -> None:
        _check_header(text, source)
        self.text = text
        self.source = source
        self._lookups = 0
        self._rows: dict[str, list[str]] | None = None  # "LOCAL REMOTE" -> its lines
        self._listening: set[str] = set()  # LOCAL of every listener

    def start_lookup(self) -> None:
        """Count a lookup; the second one builds the index."""
        self._lookups += 1
        if self._lookups == 2:
            rows: dict[str, list[str]] = {}
            for line in self.text.splitlines()[1:]:
                fields = line.split(None, 4)
                if len(fields) < 4:
                    continue  # blank; a malformed row is reported when it is looked up
                rows.setdefault(f"{fields[1]} {fields[2]}", []).append(line)
                # A listener's remote end is all zeros and its state 0A (TCP_LISTEN).
                if fields[3] == f"{TcpState.LISTEN:02X}" and set(fields[2]) <= {"0", ":"}:
                    self._listening.add(fields[1])
            self._rows = rows

    def rows(self, local: str, remote: str) -> list[str]:
        """The lines whose local and remote fields are these (kernel spelling)."""
        if self._rows is not None:
            return self._rows.get(f"{local} {remote}", [])
        # Anchored on the "sl:" colon, the needle can only match the local field.
        return list(lines_with(self.text, f": {local} {remote} "))

    def listening(self, local: str, nowhere: str) -> bool:
        """Whether a listener is bound to `local` (its remote end being `nowhere`)."""
        if self._rows is not None:
            return local in self._listening
        return f": {local} {nowhere} {TcpState.LISTEN:02X} " in self.text


# Where a connection of one local address may be listed: the table, the address as
# spelt there, the addresses a listener that covers it may be bound to, and the
# table's unspecified address (a listener's remote end).
_View = tuple[Table, IPAddress, tuple[IPAddress, ...], IPAddress]


def _views(address: IPAddress, tcp4: str | Table, tcp6: str | Table) -> list[_View]:
    """The tables (text is made a Table) a connection of local `address` may be in: an
    IPv4 one also in tcp6, as ::ffff:a.b.c.d, when its socket is dual-stack."""
    if isinstance(tcp4, str):
        tcp4 = Table(tcp4, TCP4_PATH)
    if isinstance(tcp6, str):
        tcp6 = Table(tcp6, TCP6_PATH)
    if address.version == 6:
        return [(tcp6, address, (address, _IPV6_ANY), _IPV6_ANY)]
    mapped = _mapped(address)
    return [
        (tcp4, address, (address, _IPV4_ANY), _IPV4_ANY),
        (tcp6, mapped, (mapped, _IPV6_ANY, _mapped(_IPV4_ANY)), _IPV6_ANY),
    ]


def _listening(views: list[_View], port: int, byteorder: str) -> bool:
    """Whether a listener holds `port` on the address or a wildcard that covers it; the
    IPv6 wildcard counts for IPv4 too, since /proc does not show IPV6_V6ONLY (which
    errs towards privacy)."""
    return any(
        table.listening(_hex(address, port, byteorder), _hex(nowhere, 0, byteorder))
        for table, _, listen_on, nowhere in views
        for address in listen_on
    )


def find_in_tables(
    conn: ConnectionId,
    tcp4: str | Table,
    tcp6: str | Table,
    byteorder: str = sys.byteorder,
) -> Found | None:
    """Find `conn` in the two tables (their text, or Tables); all four values must match
    (RFC 1413 §3). Only the lines that hold the connection are parsed.

    Among several matches (a TIME_WAIT ghost beside a new socket with the same four
    values) the one a process holds wins. The connection is inbound when a listener
    holds its local port (see _listening).
    """
    local, remote, port = conn.local.address, conn.remote.address, conn.local.port
    views = _views(local, tcp4, tcp6)
    match: SocketEntry | None = None
    for table, here, _, _ in views:
        there = remote if here == local else _mapped(remote)
        table.start_lookup()
        rows = table.rows(_hex(here, port, byteorder), _hex(there, conn.remote.port, byteorder))
        for line in rows:
            entry = parse_line(line, table.source, byteorder)
            if match is None or (entry.owned and not match.owned):
                match = entry
    if match is None:
        return None  # what scanners mostly ask: no listener search needed
    return Found(match, inbound=_listening(views, port, byteorder))


def find_any_remote(
    local: Endpoint,
    remote_port: int,
    tcp4: str | Table,
    tcp6: str | Table,
    byteorder: str = sys.byteorder,
) -> list[Found]:
    """Every connection of `local` to port `remote_port` at any address (listeners left
    out), for a query forwarded by a NAT gateway: the gateway asks from its own address
    about a connection whose remote end is the gateway's outer peer, which it cannot
    name in an RFC 1413 query. Entries with a process holding them come first.
    """
    views = _views(local.address, tcp4, tcp6)
    entries: list[SocketEntry] = []
    for table, here, _, _ in views:
        for line in lines_with(table.text, f": {_hex(here, local.port, byteorder)} "):
            entry = parse_line(line, table.source, byteorder)
            if entry.remote.port == remote_port and entry.state != TcpState.LISTEN:
                entries.append(entry)
    if not entries:
        return []
    inbound = _listening(views, local.port, byteorder)
    entries.sort(key=lambda entry: not entry.owned)
    return [Found(entry, inbound=inbound) for entry in entries]


class ProcfsBackend:
    """Look connections up by reading /proc/net/tcp and /proc/net/tcp6."""

    name = "procfs"

    def __init__(self, tcp4_path: str = TCP4_PATH, tcp6_path: str = TCP6_PATH) -> None:
        self.tcp4_path = tcp4_path
        self.tcp6_path = tcp6_path
        self._batched: dict[str, Table] | None = None  # path -> its read, inside a batch

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Read each table at most once in this block: reading /proc/net/tcp costs the
        kernel a walk of its whole connection hash table, so queries that arrive
        together share one read."""
        self._batched = {}
        try:
            yield
        finally:
            self._batched = None

    def find(self, conn: ConnectionId) -> Found | None:
        """Look `conn` up in the kernel's tables."""
        ipv4 = conn.local.address.version == 4
        try:
            # An IPv6 connection can only be in tcp6; an IPv4 one in either.
            tcp4 = self._table(self.tcp4_path, required=True) if ipv4 else Table("", TCP4_PATH)
            tcp6 = self._table(self.tcp6_path, required=not ipv4)
            return find_in_tables(conn, tcp4, tcp6)
        except ValueError as err:
            raise LookupFailed(f"cannot parse the kernel's socket table: {err}") from err

    def find_any_remote(self, local: Endpoint, remote_port: int) -> list[Found]:
        """Connections of `local` to `remote_port` at any address (see find_any_remote)."""
        ipv4 = local.address.version == 4
        try:
            tcp4 = self._table(self.tcp4_path, required=True) if ipv4 else Table("", TCP4_PATH)
            tcp6 = self._table(self.tcp6_path, required=not ipv4)
            return find_any_remote(local, remote_port, tcp4, tcp6)
        except ValueError as err:
            raise LookupFailed(f"cannot parse the kernel's socket table: {err}") from err

    def _table(self, path: str, required: bool) -> Table:
        if self._batched is None:
            return Table(_read(path, required), path)
        if path not in self._batched:
            self._batched[path] = Table(_read(path, required), path)
        return self._batched[path]


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
