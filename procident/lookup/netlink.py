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
batches of 64. A gateway's search (find_any_remote) is a dump filtered by both ports;
the gateway queries of a batch share one (prefetch_any_remote), and one dump covers
both address families (the first request type, TCPDIAG_GETSOCK): the kernel walks its
whole table for any dump, so walks are what a gateway's query costs.

pack_request and unpack_response are pure and tested on hand-built bytes.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
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
_MSG_TAIL_AT = _MSG_HEAD.size + _SOCKID_ADDRESSES.size + _SOCKID_TAIL.size
_EXACT_SIZE = _HEADER.size + _MSG_SIZE  # the least a datagram with one entry holds


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
    return _pack_exact(local, remote, local.address.packed, remote.address.packed, seq)


def _pack_exact(
    local: Endpoint, remote: Endpoint, local_packed: bytes, remote_packed: bytes, seq: int
) -> bytes:
    addresses = _SOCKID_ADDRESSES.pack(
        local.port, remote.port, local_packed.ljust(16, b"\0"), remote_packed.ljust(16, b"\0")
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
    data: bytes,
    seq: int,
    asked: tuple[Endpoint, Endpoint] | None = None,
    packed: tuple[bytes, bytes] | None = None,
) -> SocketEntry | None | bool:
    """Read the kernel's answer to request `seq` from one datagram.

    Returns the socket entry, None when the kernel says there is no such
    socket (ENOENT), or False when the datagram holds no message for `seq`
    (a late answer to an earlier request). ValueError: malformed data;
    OSError: the kernel refused the request. `asked`, `packed`: see _entry.
    """
    if len(data) >= _EXACT_SIZE:  # the usual answer, read in place: its first message
        length, kind, _flags, message_seq, _port = _HEADER.unpack_from(data)
        if (
            kind == SOCK_DIAG_BY_FAMILY
            and message_seq == seq
            and _EXACT_SIZE <= length <= len(data)
        ):
            return _entry(data, asked, _HEADER.size, packed)
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
# The first request type (linux/inet_diag.h), still served: its dump has no family, so
# one walk of the kernel's table returns IPv4 and IPv6 sockets alike, where a
# SOCK_DIAG_BY_FAMILY dump walks the same table once per family.
TCPDIAG_GETSOCK = 18
INET_DIAG_REQ_BYTECODE = 1
# inet_diag bytecode (linux/inet_diag.h): struct inet_diag_bc_op {code, yes, no}; a
# port condition is followed by an op whose `no` holds the port.
_BC_OP = struct.Struct("=BBH")
_BC_JMP, _BC_S_GE, _BC_S_LE, _BC_D_GE, _BC_D_LE = 1, 2, 3, 4, 5
_ATTR = struct.Struct("=HH")
# The states of a connection (linux/net/tcp_states.h: ESTABLISHED 1 to NEW_SYN_RECV 12),
# LISTEN left out. Not ALL_STATES: its bit 13, BOUND_INACTIVE (sockets bound and never
# connected, with no remote port), makes the kernel walk its bind table too, a quarter
# more time for every dump (measured: 237 against 172 us).
_CONNECTED = sum(1 << state for state in range(1, 13)) & ~(1 << TcpState.LISTEN)
# struct inet_diag_req (the first request type's): family, source and destination
# prefix lengths, ext, the sockid, states, tables
_COMPAT_HEAD = struct.Struct("=BBBB")
_COMPAT_TAIL = struct.Struct("=II")
MAX_PAIRS = 64  # port pairs one filtered dump asks for (a loop turn's gateway queries)
_ACCEPT, _REJECT = -1, -2  # jump targets: the end of the code, and past it (+4)


def pairs_bytecode(pairs: Sequence[tuple[int, int]]) -> bytes:
    """An INET_DIAG_REQ_BYTECODE attribute that keeps the sockets whose (local port,
    remote port) is one of `pairs`.

    The kernel runs it for every socket of its table, so it is a search tree, not a
    chain: each node compares the local port with the middle one of its range (yes:
    the upper half, laid out next; no: a jump to the lower half), so a socket meets
    about log2(pairs) nodes and then the four port conditions of one local port's
    pairs (each failing to that port's next pair, or past the end: rejected), whose
    last op is a jump to the end (accepted). Every op's yes is the next op: the kernel
    checks that each jump lands where that chain of yes offsets reaches
    (inet_diag_bc_audit)."""
    if not 1 <= len(pairs) <= MAX_PAIRS:
        raise ValueError(f"{len(pairs)} port pairs in one dump (1 to {MAX_PAIRS})")
    remote_ports: dict[int, list[int]] = {}
    for local_port, remote_port in sorted(set(pairs)):
        remote_ports.setdefault(local_port, []).append(remote_port)
    local_ports = sorted(remote_ports)
    ops: list[list[int]] = []  # [offset, op, port, target]; port -1: a jump
    size = 0

    def emit(op: int, port: int, target: int) -> list[int]:
        nonlocal size
        ops.append([size, op, port, target])
        size += _BC_OP.size if port < 0 else 2 * _BC_OP.size
        return ops[-1]

    def tree(low: int, high: int) -> None:
        if high - low > 1:
            middle = (low + high) // 2
            node = emit(_BC_S_GE, local_ports[middle], 0)
            tree(middle, high)
            node[3] = size  # the lower half starts here
            tree(low, middle)
            return
        local_port = local_ports[low]
        for index, remote_port in enumerate(remote_ports[local_port]):
            conditions = [
                emit(_BC_S_GE, local_port, 0),
                emit(_BC_S_LE, local_port, 0),
                emit(_BC_D_GE, remote_port, 0),
                emit(_BC_D_LE, remote_port, 0),
            ]
            emit(_BC_JMP, -1, _ACCEPT)
            failed = _REJECT if index == len(remote_ports[local_port]) - 1 else size
            for condition in conditions:
                condition[3] = failed

    tree(0, len(local_ports))
    code = []
    for at, op, port, target in ops:
        no = size - at if target == _ACCEPT else size - at + 4 if target == _REJECT else target - at
        if port < 0:
            code.append(_BC_OP.pack(op, _BC_OP.size, no))
        else:
            code.append(_BC_OP.pack(op, 2 * _BC_OP.size, no) + _BC_OP.pack(0, 0, port))
    body = b"".join(code)
    return _ATTR.pack(_ATTR.size + len(body), INET_DIAG_REQ_BYTECODE) + body


def pairs_filter(pairs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], bytes]:
    """How a dump asks for the sockets on `pairs`: the request's own (local port, remote
    port) for one pair, which the kernel compares before anything else of a socket, and
    no bytecode (a quarter less time in the kernel with 5,000 connections); else ports
    (0, 0), any, and pairs_bytecode."""
    if len(set(pairs)) == 1 and 0 not in pairs[0]:  # (0 would be any port)
        return pairs[0], b""
    return (0, 0), pairs_bytecode(pairs)


def pack_pairs_dump(pairs: Sequence[tuple[int, int]], seq: int) -> bytes:
    """One dump of the TCP connections of both families whose (local port, remote port)
    is one of `pairs`, listeners left out (the first request type: one walk of the
    kernel's table for IPv4 and IPv6)."""
    ports, attribute = pairs_filter(pairs)
    body = (
        _COMPAT_HEAD.pack(socket.AF_UNSPEC, 0, 0, 0)
        + _SOCKID_ADDRESSES.pack(*ports, bytes(16), bytes(16))
        + _TAIL
        + _COMPAT_TAIL.pack(_CONNECTED, 0)
        + attribute
    )
    header = _HEADER.pack(
        _HEADER.size + len(body), TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def pack_states_dump(
    family: int,
    states: int,
    seq: int,
    attribute: bytes = b"",
    ports: tuple[int, int] = (0, 0),
) -> bytes:
    """A sock_diag dump of every TCP socket of `family` in `states` (a bit per state),
    on the (local port, remote port) `ports` (0: any) and with a request attribute
    (pairs_bytecode) if given."""
    body = (
        _REQUEST_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, states)
        + _SOCKID_ADDRESSES.pack(*ports, bytes(16), bytes(16))
        + _TAIL
        + attribute
    )
    header = _HEADER.pack(
        _HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


_DUMPED = (SOCK_DIAG_BY_FAMILY, TCPDIAG_GETSOCK)  # an entry answers with its request's type


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
        if kind not in _DUMPED or len(body) < _MSG_SIZE:
            raise ValueError(f"netlink message of type {kind} and {len(body)} bytes")
        entries.append(_entry(body))
    return entries, False


def _entry(
    body: bytes,
    asked: tuple[Endpoint, Endpoint] | None = None,
    at: int = 0,
    packed: tuple[bytes, bytes] | None = None,
) -> SocketEntry:
    """The socket of the inet_diag_msg at offset `at` of `body`. With `asked` (the ends
    an exact request named; `packed`: their addresses' bytes, if at hand), an end the
    kernel gives back byte for byte is that Endpoint itself, not a new one parsed from
    the bytes: the same value, without building two addresses per lookup."""
    family, state, _timer, _retrans = _MSG_HEAD.unpack_from(body, at)
    sport, dport, src, dst = _SOCKID_ADDRESSES.unpack_from(body, at + _MSG_HEAD.size)
    _expires, _rqueue, _wqueue, uid, inode = _MSG_TAIL.unpack_from(body, at + _MSG_TAIL_AT)
    local = remote = None
    if asked is not None and family == _family(asked[0].address):
        size = 4 if family == _AF_INET else 16
        if packed is None:
            packed = (asked[0].address.packed, asked[1].address.packed)
        if sport == asked[0].port and src[:size] == packed[0]:
            local = asked[0]
        if dport == asked[1].port and dst[:size] == packed[1]:
            remote = asked[1]
    return SocketEntry(
        local=local or Endpoint(_address(family, src), sport),
        remote=remote or Endpoint(_address(family, dst), dport),
        state=_STATES.get(state) or TcpState(state),  # (ValueError for no such state)
        uid=uid,
        inode=inode,
        source=SOURCE,
    )


_NO_SUCH_TYPE = (errno.EOPNOTSUPP, errno.EINVAL)  # sock_diag's answer to a type it lacks
_STATES = {int(state): state for state in TcpState}  # a dict is cheaper than TcpState()
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
        # Whether a gateway's search asks with TCPDIAG_GETSOCK, both families in one walk
        # of the kernel's table (False where the kernel refuses it: one dump per family).
        self.one_walk = True
        # Dumps of connections asked of the kernel for gateways' searches: each walks its
        # whole table of connections (the listeners' dumps walk a small one, uncounted).
        self.walks = 0

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
        left out, those a process holds first: a dump filtered by both ports in the
        kernel (an IPv4 connection may be a dual-stack IPv6 socket), instead of reading
        /proc/net/tcp and tcp6 whole. Shared within a batch, and with what
        prefetch_any_remote searched for."""
        dumps = self._dumps
        if dumps is not None and (local, remote_port) in dumps:
            return dumps[local, remote_port]
        return self._search([(local, remote_port)])[local, remote_port]

    def prefetch_any_remote(self, asks: Iterable[tuple[Endpoint, int]]) -> None:
        """In a batch: search for the connections of every (local end, remote port) of
        `asks` at once, MAX_PAIRS port pairs to a dump, so that the find_any_remote
        calls of the batch that follow share one walk of the kernel's table (it walks
        all of it for any dump, however narrow the filter: on a host of 262,144 hash
        buckets, 0.1 to 0.3 ms with 100 connections open, 0.7 with 5,000).
        LookupFailed as find_any_remote."""
        dumps = self._dumps
        if dumps is None:
            return
        wanted = list(dict.fromkeys(ask for ask in asks if ask not in dumps))
        if wanted:
            self._search(wanted)

    def _search(self, asks: list[tuple[Endpoint, int]]) -> dict[tuple[Endpoint, int], list[Found]]:
        """The connections of each ask, from dumps of all their port pairs (kept for the
        batch, if in one)."""
        found: dict[tuple[Endpoint, int], list[Found]] = {}
        pairs = list(dict.fromkeys((local.port, remote_port) for local, remote_port in asks))
        entries: list[SocketEntry] = []
        for at in range(0, len(pairs), MAX_PAIRS):
            entries += self._dump_pairs(pairs[at : at + MAX_PAIRS])
        by_pair: dict[tuple[int, int], list[SocketEntry]] = {}
        for entry in entries:
            by_pair.setdefault((entry.local.port, entry.remote.port), []).append(entry)
        more = len(asks)
        for local, remote_port in asks:
            here = normalize_address(local.address)
            matching = [
                entry
                for entry in by_pair.get((local.port, remote_port), ())
                if normalize_address(entry.local.address) == here and entry.state != TcpState.LISTEN
            ]
            results: list[Found] = []
            if matching:
                inbound = self._inbound(local, more)
                more = 1
                matching.sort(key=lambda entry: not entry.owned)
                results = [Found(entry, inbound=inbound) for entry in matching]
            found[local, remote_port] = results
        if self._dumps is not None:
            self._dumps.update(found)
        return found

    def _dump_pairs(self, pairs: list[tuple[int, int]]) -> list[SocketEntry]:
        """The non-listening sockets of both families on any of these port pairs: one
        dump of the first request type; one SOCK_DIAG_BY_FAMILY dump per family where
        that fails, and from then on where the kernel refuses the type itself."""
        refused = False
        if self.one_walk:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self.walks += 1
            try:
                return self._dumped(pack_pairs_dump(pairs, self._seq))
            except LookupFailed as err:
                # EOPNOTSUPP or EINVAL: no such request type here. Anything else (too
                # many sockets, no answer in time) may pass the other way this once.
                cause = err.__cause__
                refused = isinstance(cause, OSError) and cause.errno in _NO_SUCH_TYPE
        ports, attribute = pairs_filter(pairs)
        entries: list[SocketEntry] = []
        for family in (_AF_INET, _AF_INET6):
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self.walks += 1
            request = pack_states_dump(family, _CONNECTED, self._seq, attribute, ports)
            entries += self._dumped(request)
        if refused:  # the kernel answers these but not the first type
            self.one_walk = False
        return entries

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
        return Found(entry, inbound=self._inbound(conn.local))

    def _inbound(self, local: Endpoint, more: int = 1) -> bool:
        """Whether a listener takes connections to `local` (the inbound check of a
        connection found, and `more` to come): in a batch, from its second such check
        on, from the turn's listeners (one dump); else, or where that cannot tell, a
        probe."""
        inbound = None
        if self._dumps is not None:
            self._found += more
            if self._listeners is None and self._found >= 2:
                self._listeners = self._listening()
            if self._listeners is not None and self._listeners[0]:
                inbound = inbound_from(self._listeners[1].get(local.port, ()), local)
        if inbound is None:
            # Is there a listener on the local port? Ask for a remote end no
            # connection can have: the kernel falls back to the listener, if any.
            nowhere = _NOWHERE4 if local.address.version == 4 else _NOWHERE6
            listener = self._ask(local, nowhere)
            inbound = listener is not None and listener.state == TcpState.LISTEN
        return inbound

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
        packed = (local.address.packed, remote.address.packed)  # (computed, not stored)
        try:
            self._sock.send(_pack_exact(local, remote, packed[0], packed[1], self._seq))
            while True:
                result = unpack_response(self._recv(), self._seq, (local, remote), packed)
                if result is not False:
                    return result  # type: ignore[return-value]
        except (OSError, ValueError) as err:
            raise LookupFailed(f"sock_diag lookup failed: {err}") from err
