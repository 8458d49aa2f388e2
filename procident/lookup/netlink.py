"""The sock_diag netlink backend: one exact request per lookup, whatever the table size.

A SOCK_DIAG_BY_FAMILY request that names a full 4-tuple (see sock_diag(7) and
linux/inet_diag.h) makes the kernel look the socket up in its hash tables, as
it would for an incoming packet. Two consequences, both checked against the
kernel in the tests:

- an IPv4 request also finds dual-stack IPv6 sockets speaking IPv4;
- when no connection matches but the local port has a listening socket, the
  kernel answers with that listener. That answer means "no such connection";
  it is also how the inbound check asks whether a listener exists.

Within a batch (a turn of the daemon's loop, up to 64 queries), the inbound check of
every lookup after the first comes from one dump of the host's listeners instead
(inbound_from), and asks the kernel only where that cannot tell (an IPv6 wildcard
listener and an IPv4 connection: IPV6_V6ONLY decides): 15 -> 11 us per lookup in
batches of 64. A gateway's search (find_any_remote) is one dump filtered by both ports.

pack_request and unpack_response are pure and tested on hand-built bytes.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

from procident.lookup.types import (
    ConnectionId,
    Endpoint,
    Found,
    IPAddress,
    LookupFailed,
    SocketEntry,
    TcpState,
    normalize_address,
)

NETLINK_SOCK_DIAG = 4  # linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
SOURCE = "netlink sock_diag"
TIMEOUT = 1.0  # seconds; the kernel answers within the send, so this only bounds a fault

# struct nlmsghdr: length, type, flags, sequence, port id (host byte order)
_HEADER = struct.Struct("=IHHII")
# struct inet_diag_req_v2 head: family, protocol, ext, pad, states
_REQUEST_HEAD = struct.Struct("=BBBBI")
# struct inet_diag_sockid: ports and addresses in network order, then the
# interface and the cookie in host order
_SOCKID_ADDRESSES = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# struct inet_diag_msg: family, state, timer, retrans, sockid, then expires,
# rqueue, wqueue, uid, inode (host order)
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_ERROR = struct.Struct("=i")
# A remote end no connection can have (address unspecified, port 0).
_NOWHERE4 = Endpoint(ipaddress.IPv4Address("0.0.0.0"), 0)
_NOWHERE6 = Endpoint(ipaddress.IPv6Address("::"), 0)
_ANY4, _ANY6 = ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv6Address("::")
_MSG_SIZE = _MSG_HEAD.size + _SOCKID_ADDRESSES.size + _SOCKID_TAIL.size + _MSG_TAIL.size


_AF_INET, _AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)  # not enums: per query


def _family(address: IPAddress) -> int:
    return _AF_INET if isinstance(address, ipaddress.IPv4Address) else _AF_INET6


# The parts of a request that do not depend on the connection, packed once.
_HEADS = {
    family: _REQUEST_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES)
    for family in (_AF_INET, _AF_INET6)
}
_TAIL = _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
_REQUEST_SIZE = _HEADER.size + _REQUEST_HEAD.size + _SOCKID_ADDRESSES.size + _SOCKID_TAIL.size


def pack_request(local: Endpoint, remote: Endpoint, seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request for the TCP socket local <-> remote."""
    addresses = _SOCKID_ADDRESSES.pack(
        local.port,
        remote.port,
        local.address.packed.ljust(16, b"\0"),
        remote.address.packed.ljust(16, b"\0"),
    )
    header = _HEADER.pack(_REQUEST_SIZE, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
    return header + _HEADS[_family(local.address)] + addresses + _TAIL


def _address(family: int, raw: bytes) -> IPAddress:
    if family == _AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    if family == _AF_INET6:
        return ipaddress.IPv6Address(raw)
    raise ValueError(f"address family {family} in a TCP diag message")


def _messages(data: bytes, seq: int) -> Iterator[tuple[int, bytes]]:
    """The (type, body) of each message of one datagram that answers request `seq`;
    ValueError when a length does not fit."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, message_seq, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise ValueError(f"netlink message length {length} does not fit the datagram")
        body = data[offset + _HEADER.size : offset + length]
        offset += (length + 3) & ~3  # messages are 4-byte aligned
        if message_seq == seq:
            yield kind, body


def unpack_response(
    data: bytes, seq: int, asked: tuple[Endpoint, Endpoint] | None = None
) -> SocketEntry | None | bool:
    """Read the kernel's answer to request `seq` from one datagram.

    Returns the socket entry, None when the kernel says there is no such
    socket (ENOENT), or False when the datagram holds no message for `seq`
    (a late answer to an earlier request). ValueError: malformed data;
    OSError: the kernel refused the request. `asked`: see _entry.
    """
    for kind, body in _messages(data, seq):
        if kind == NLMSG_ERROR:
            (code,) = _ERROR.unpack_from(body)
            if code == -errno.ENOENT:
                return None
            raise OSError(-code, f"sock_diag: {errno.errorcode.get(-code, -code)}")
        if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MSG_SIZE:
            raise ValueError(f"netlink message of type {kind} and {len(body)} bytes")
        return _entry(body, asked)
    return False


NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_DONE = 3
INET_DIAG_REQ_BYTECODE = 1
# inet_diag bytecode (linux/inet_diag.h): struct inet_diag_bc_op {code, yes, no}; a
# port condition is followed by an op whose `no` holds the port.
_BC_OP = struct.Struct("=BBH")
_BC_S_GE, _BC_S_LE, _BC_D_GE, _BC_D_LE = 2, 3, 4, 5
_ATTR = struct.Struct("=HH")
_NOT_LISTENING = ALL_STATES & ~(1 << TcpState.LISTEN)


def pack_dump_request(family: int, local_port: int, remote_port: int, seq: int) -> bytes:
    """A sock_diag dump of the TCP sockets of `family` with this local and this remote
    port, listeners left out: the kernel runs the bytecode filter over its table, so
    only the sockets asked for come back (a NAT gateway's query: the remote address is
    the gateway's outer peer, which the query cannot name)."""
    ops = (
        (_BC_S_GE, local_port),
        (_BC_S_LE, local_port),
        (_BC_D_GE, remote_port),
        (_BC_D_LE, remote_port),
    )
    size = len(ops) * 2 * _BC_OP.size
    code = b"".join(
        # yes: on to the next condition; no: past the end (+4), which rejects the socket
        _BC_OP.pack(op, 2 * _BC_OP.size, size - at * 2 * _BC_OP.size + 4) + _BC_OP.pack(0, 0, port)
        for at, (op, port) in enumerate(ops)
    )
    attribute = _ATTR.pack(_ATTR.size + len(code), INET_DIAG_REQ_BYTECODE) + code
    return pack_states_dump(family, _NOT_LISTENING, seq, attribute)


def pack_states_dump(family: int, states: int, seq: int, attribute: bytes = b"") -> bytes:
    """A sock_diag dump of every TCP socket of `family` in `states` (a bit per state),
    with a request attribute (a bytecode filter) if given."""
    body = (
        _REQUEST_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, states)
        + _SOCKID_ADDRESSES.pack(0, 0, bytes(16), bytes(16))
        + _TAIL
        + attribute
    )
    header = _HEADER.pack(
        _HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def unpack_dump(data: bytes, seq: int) -> tuple[list[SocketEntry], bool]:
    """The entries of one datagram of the answer to dump `seq`, and whether it ends the
    dump (NLMSG_DONE). ValueError: malformed data; OSError: the kernel refused."""
    entries: list[SocketEntry] = []
    for kind, body in _messages(data, seq):
        if kind == NLMSG_DONE:
            return entries, True
        if kind == NLMSG_ERROR:
            (code,) = _ERROR.unpack_from(body)
            raise OSError(-code, f"sock_diag dump: {errno.errorcode.get(-code, -code)}")
        if kind != SOCK_DIAG_BY_FAMILY or len(body) < _MSG_SIZE:
            raise ValueError(f"netlink message of type {kind} and {len(body)} bytes")
        entries.append(_entry(body))
    return entries, False


def _entry(body: bytes, asked: tuple[Endpoint, Endpoint] | None = None) -> SocketEntry:
    """The socket of one inet_diag_msg. With `asked` (the ends an exact request named),
    an end the kernel gives back byte for byte is that Endpoint itself, not a new one
    parsed from the bytes: the same value, without building two addresses per lookup."""
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body)
    sport, dport, src, dst = _SOCKID_ADDRESSES.unpack_from(body, _MSG_HEAD.size)
    tail = _MSG_HEAD.size + _SOCKID_ADDRESSES.size + _SOCKID_TAIL.size
    _expires, _rqueue, _wqueue, uid, inode = _MSG_TAIL.unpack_from(body, tail)
    local = remote = None
    if asked is not None and family == _family(asked[0].address):
        size = 4 if family == _AF_INET else 16
        if sport == asked[0].port and src[:size] == asked[0].address.packed:
            local = asked[0]
        if dport == asked[1].port and dst[:size] == asked[1].address.packed:
            remote = asked[1]
    return SocketEntry(
        local=local or Endpoint(_address(family, src), sport),
        remote=remote or Endpoint(_address(family, dst), dport),
        state=TcpState(state),
        uid=uid,
        inode=inode,
        source=SOURCE,
    )


MAX_DUMP_ENTRIES = 4096  # sockets one dump may bring back: bounded


def inbound_from(listeners: Iterable[IPAddress], local: Endpoint) -> bool | None:
    """Whether a listener of `listeners` (the addresses listening on local's port)
    takes connections to `local`, as the kernel's lookup would say: True or False, or
    None where only the socket itself knows (an IPv6 wildcard and an IPv4 address: it
    takes them unless IPV6_V6ONLY): ask the kernel then."""
    here = normalize_address(local.address)
    unsure = False
    for address in listeners:
        if address.version == 4:
            if here.version == 4 and address in (here, _ANY4):
                return True
        elif address == _ANY6:
            if here.version == 6:
                return True
            unsure = True
        elif normalize_address(address) == here:
            return True
    return None if unsure else False


class NetlinkBackend:
    """Look connections up with exact sock_diag requests; cost flat in the table size."""

    name = "netlink"

    def __init__(self) -> None:
        """Open the netlink socket; OSError if the kernel offers no sock_diag."""
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        # Non-blocking, not a timeout: a timeout costs a poll() before every send and
        # recv, and the kernel queues its answer within the send anyway.
        self._sock.setblocking(False)
        self._sock.bind((0, 0))
        self._seq = 0
        # Within a batch: the gateway searches made so far, by (local end, remote port);
        # the connections found, and the listeners (usable, by port) once dumped.
        self._dumps: dict[tuple[Endpoint, int], list[Found]] | None = None
        self._found = 0
        self._listeners: tuple[bool, dict[int, list[IPAddress]]] | None = None

    def close(self) -> None:
        self._sock.close()

    def batch(self) -> AbstractContextManager[None]:
        """Exact requests share nothing; a gateway's dumps (find_any_remote) are shared
        by the queries of one block (a turn of the daemon's loop)."""
        return self._batch()

    @contextmanager
    def _batch(self) -> Iterator[None]:
        self._dumps = {}
        self._found = 0
        self._listeners = None
        try:
            yield
        finally:
            self._dumps = None
            self._listeners = None

    def find_any_remote(self, local: Endpoint, remote_port: int) -> list[Found]:
        """Every connection of `local` to port `remote_port` at any address, listeners
        left out, those a process holds first: one filtered dump per address family
        (an IPv4 connection may be a dual-stack IPv6 socket), instead of reading
        /proc/net/tcp and tcp6 whole. Shared within a batch."""
        dumps = self._dumps
        if dumps is not None and (local, remote_port) in dumps:
            return dumps[local, remote_port]
        here = normalize_address(local.address)
        families = (_AF_INET, _AF_INET6) if here.version == 4 else (_AF_INET6,)
        entries = [
            entry
            for family in families
            for entry in self._dump(family, local.port, remote_port)
            if normalize_address(entry.local.address) == here
            and entry.remote.port == remote_port
            and entry.state != TcpState.LISTEN
        ]
        found: list[Found] = []
        if entries:
            nowhere = _NOWHERE4 if local.address.version == 4 else _NOWHERE6
            listener = self._ask(local, nowhere)
            inbound = listener is not None and listener.state == TcpState.LISTEN
            entries.sort(key=lambda entry: not entry.owned)
            found = [Found(entry, inbound=inbound) for entry in entries]
        if dumps is not None:
            dumps[local, remote_port] = found
        return found

    def _dump(self, family: int, local_port: int, remote_port: int) -> list[SocketEntry]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._dumped(pack_dump_request(family, local_port, remote_port, self._seq))

    def _dump_states(self, family: int, states: int) -> list[SocketEntry]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._dumped(pack_states_dump(family, states, self._seq))

    def _dumped(self, request: bytes) -> list[SocketEntry]:
        seq = self._seq
        entries: list[SocketEntry] = []
        try:
            self._sock.send(request)
            while True:
                more, done = unpack_dump(self._recv(), seq)
                entries += more
                if done:
                    return entries
                if len(entries) > MAX_DUMP_ENTRIES:
                    raise ValueError(f"more than {MAX_DUMP_ENTRIES} sockets in one dump")
        except (OSError, ValueError) as err:
            # A dump cut short leaves datagrams behind: their sequence number is skipped.
            raise LookupFailed(f"sock_diag dump failed: {err}") from err

    def find(self, conn: ConnectionId) -> Found | None:
        """Look `conn` up; a listener in the answer means there is no such connection."""
        entry = self._ask(conn.local, conn.remote)
        if entry is None or entry.state == TcpState.LISTEN:
            return None
        inbound = None
        if self._dumps is not None:  # in a batch: the turn's listeners, from the second
            self._found += 1
            if self._listeners is None and self._found >= 2:
                self._listeners = self._listening()
            if self._listeners is not None and self._listeners[0]:
                inbound = inbound_from(self._listeners[1].get(conn.local.port, ()), conn.local)
        if inbound is None:
            # Is there a listener on the local port? Ask for a remote end no
            # connection can have: the kernel falls back to the listener, if any.
            nowhere = _NOWHERE4 if conn.local.address.version == 4 else _NOWHERE6
            listener = self._ask(conn.local, nowhere)
            inbound = listener is not None and listener.state == TcpState.LISTEN
        return Found(entry, inbound=inbound)

    def _listening(self) -> tuple[bool, dict[int, list[IPAddress]]]:
        """Every listening socket's address, by port: one dump per address family, for
        the queries of a batch (a loop turn answers up to 64: one dump instead of a
        probe each). (False, {}) when they are too many to hold."""
        by_port: dict[int, list[IPAddress]] = {}
        try:
            for family in (_AF_INET, _AF_INET6):
                for entry in self._dump_states(family, 1 << TcpState.LISTEN):
                    by_port.setdefault(entry.local.port, []).append(entry.local.address)
        except LookupFailed:
            return False, {}
        return True, by_port

    def _recv(self) -> bytes:
        try:
            return self._sock.recv(65536)
        except BlockingIOError:  # not answered within the send (never seen): wait a little
            if not select.select([self._sock], [], [], TIMEOUT)[0]:
                raise OSError(errno.ETIMEDOUT, f"no answer in {TIMEOUT:g}s") from None
            return self._sock.recv(65536)

    def _ask(self, local: Endpoint, remote: Endpoint) -> SocketEntry | None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        try:
            self._sock.send(pack_request(local, remote, self._seq))
            while True:
                result = unpack_response(self._recv(), self._seq, (local, remote))
                if result is not False:
                    return result  # type: ignore[return-value]
        except (OSError, ValueError) as err:
            raise LookupFailed(f"sock_diag lookup failed: {err}") from err
