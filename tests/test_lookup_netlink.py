"""The sock_diag backend: pack/unpack on hand-built bytes, then against the live kernel,
where it must give exactly the answers of the procfs backend."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import socket
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import requires_root
from harness import owned_connection
from hypothesis import given
from hypothesis import strategies as st

from procident.lookup import (
    ConnectionId,
    Endpoint,
    LookupFailed,
    TcpState,
    normalize_address,
    select_backend,
)
from procident.lookup.netlink import (
    NetlinkBackend,
    pack_request,
    unpack_dump,
    unpack_response,
)
from procident.lookup.procfs import ProcfsBackend, find_any_remote, parse_table

V4_LOCAL = Endpoint(ipaddress.IPv4Address("192.0.2.1"), 40001)
V4_REMOTE = Endpoint(ipaddress.IPv4Address("198.51.100.7"), 6667)
V6_LOCAL = Endpoint(ipaddress.IPv6Address("2001:db8::1"), 40001)
V6_REMOTE = Endpoint(ipaddress.IPv6Address("2001:db8::7"), 6667)


def nlmsg(kind: int, seq: int, body: bytes) -> bytes:
    """A netlink message as the kernel sends it (host order header, 4-byte aligned)."""
    message = struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 4242) + body
    return message + b"\0" * (-len(message) % 4)


def diag_msg(
    family: int,
    state: int,
    local: bytes,
    lport: int,
    remote: bytes,
    rport: int,
    uid: int,
    inode: int,
) -> bytes:
    """struct inet_diag_msg, built field by field from linux/inet_diag.h."""
    return (
        bytes([family, state, 0, 0])
        + struct.pack("!HH", lport, rport)
        + local.ljust(16, b"\0")
        + remote.ljust(16, b"\0")
        + struct.pack("=III", 0, 0x12345678, 0x9ABCDEF0)  # if, cookie
        + struct.pack("=IIIII", 0, 0, 0, uid, inode)  # expires, rqueue, wqueue, uid, inode
    )


def test_pack_ipv4_request() -> None:
    """An IPv4 request: header, inet_diag_req_v2 head, then the socket id, byte for byte."""
    data = pack_request(V4_LOCAL, V4_REMOTE, seq=7)
    expected = (
        struct.pack("=IHHII", 72, 20, 1, 7, 0)  # 16 + 56 bytes, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST
        + bytes([socket.AF_INET, socket.IPPROTO_TCP, 0, 0])
        + struct.pack("=I", 0xFFFFFFFF)
        + bytes.fromhex("9c41 1a0b")  # ports 40001, 6667 in network order
        + bytes([192, 0, 2, 1])
        + b"\0" * 12
        + bytes([198, 51, 100, 7])
        + b"\0" * 12
        + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    )
    assert data == expected


def test_pack_ipv6_request() -> None:
    """An IPv6 request carries family AF_INET6 and the full 16-byte addresses."""
    data = pack_request(V6_LOCAL, V6_REMOTE, seq=1)
    assert data[16] == socket.AF_INET6
    assert data[28:44] == V6_LOCAL.address.packed and data[44:60] == V6_REMOTE.address.packed


def test_unpack_ipv4_entry() -> None:
    """A diag message becomes a SocketEntry with addresses, ports, state, uid and inode."""
    body = diag_msg(
        socket.AF_INET,
        1,
        bytes([192, 0, 2, 1]),
        40001,
        bytes([198, 51, 100, 7]),
        6667,
        3_000_000_000,
        99,
    )
    entry = unpack_response(nlmsg(20, 5, body), seq=5)
    assert entry is not None and entry is not False
    assert (entry.local, entry.remote) == (V4_LOCAL, V4_REMOTE)
    assert (entry.state, entry.uid, entry.inode) == (TcpState.ESTABLISHED, 3_000_000_000, 99)


def test_unpack_ipv6_and_mapped_entries() -> None:
    """IPv6 messages keep their 16-byte addresses, v4-mapped ones included."""
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.1").packed
    body = diag_msg(socket.AF_INET6, 6, mapped, 40001, V6_REMOTE.address.packed, 6667, 0, 0)
    entry = unpack_response(nlmsg(20, 1, body), seq=1)
    assert entry and normalize_address(entry.local.address) == V4_LOCAL.address
    assert entry.state == TcpState.TIME_WAIT and not entry.owned


def test_unpack_enoent_is_none() -> None:
    """The kernel's ENOENT is 'no such socket': None, not an error."""
    error = struct.pack("=i", -errno.ENOENT) + b"\0" * 16
    assert unpack_response(nlmsg(2, 3, error), seq=3) is None


def test_unpack_other_errors_raise() -> None:
    """Any other error from the kernel is 'could not look'."""
    error = struct.pack("=i", -errno.EACCES) + b"\0" * 16
    with pytest.raises(OSError, match="EACCES"):
        unpack_response(nlmsg(2, 3, error), seq=3)


def test_unpack_skips_late_answers() -> None:
    """Messages for another sequence number are skipped; the one for ours is read."""
    late = nlmsg(2, 1, struct.pack("=i", -errno.ENOENT) + b"\0" * 16)
    ours = nlmsg(20, 2, diag_msg(socket.AF_INET, 1, b"\x7f\0\0\1", 1, b"\x7f\0\0\1", 2, 5, 6))
    assert unpack_response(late, seq=2) is False
    entry = unpack_response(late + ours, seq=2)
    assert entry and entry.uid == 5


@pytest.mark.parametrize(
    "data",
    [
        nlmsg(20, 1, b"\0" * 40),  # too short for inet_diag_msg
        struct.pack("=IHHII", 200, 20, 0, 1, 0) + b"\0" * 20,  # length beyond the datagram
        nlmsg(20, 1, diag_msg(7, 1, b"", 1, b"", 2, 0, 0)),  # unknown family
        nlmsg(20, 1, diag_msg(socket.AF_INET, 99, b"", 1, b"", 2, 0, 0)),  # unknown state
    ],
)
def test_unpack_rejects_malformed(data: bytes) -> None:
    """Malformed answers raise ValueError, never give a guess."""
    with pytest.raises(ValueError):
        unpack_response(data, seq=1)


def conn(local: tuple, remote: tuple) -> ConnectionId:
    def ep(pair: tuple) -> Endpoint:
        return Endpoint(normalize_address(ipaddress.ip_address(pair[0])), pair[1])

    return ConnectionId(ep(local), ep(remote))


def test_live_lookup_and_listener_fallback() -> None:
    """Live: a connection is found, its service side is inbound, and a missing connection on
    a listening port (where the kernel answers with the listener) is None."""
    backend = NetlinkBackend()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            server, _ = listener.accept()
            with server:
                outbound = backend.find(conn(client.getsockname(), client.getpeername()))
                inbound = backend.find(conn(server.getsockname(), server.getpeername()))
                missing = backend.find(conn(server.getsockname(), ("127.0.0.9", 1)))
    assert outbound and outbound.entry.state == TcpState.ESTABLISHED and not outbound.inbound
    assert inbound and inbound.inbound
    assert missing is None
    backend.close()


def test_select_backend() -> None:
    """procfs and netlink by name; auto picks netlink where the kernel answers it."""
    assert select_backend("procfs").name == "procfs"
    assert select_backend("netlink").name == "netlink"
    assert select_backend("auto").name == "netlink"


def test_closed_backend_is_lookup_failed() -> None:
    """A netlink socket that fails is 'could not look', not 'not found'."""
    backend = NetlinkBackend()
    backend.close()
    with pytest.raises(LookupFailed, match="sock_diag lookup failed"):
        backend.find(conn(("127.0.0.1", 1), ("127.0.0.1", 2)))


@requires_root
def test_backends_agree_on_the_live_table() -> None:
    """On the same live socket table, netlink and procfs give identical answers: for every
    connection we made (several uids, IPv4, IPv6, dual-stack, closed, TIME_WAIT), for
    their service sides (inbound), and for connections that do not exist."""
    with contextlib.ExitStack() as stack:
        made = [
            stack.enter_context(owned_connection(1, ("127.0.0.1", 0), "127.0.0.1")),
            stack.enter_context(owned_connection(2, ("127.0.0.1", 0), "127.0.0.2")),
            stack.enter_context(
                owned_connection(3_000_000_000, ("::1", 0), "::1", socket.AF_INET6)
            ),
            stack.enter_context(
                owned_connection(65534, ("127.0.0.1", 0), "::ffff:127.0.0.1", socket.AF_INET6)
            ),
            stack.enter_context(
                owned_connection(1, ("127.0.0.1", 0), "127.0.0.1", close_first=True)
            ),
        ]
        ghost = stack.enter_context(
            owned_connection(2, ("127.0.0.1", 0), "127.0.0.1", close_first=True)
        )
        assert ghost.accepted.recv(1) == b""
        ghost.accepted.close()  # both ends closed: the client end goes to TIME_WAIT
        time.sleep(0.1)
        made.append(ghost)
        ports = {c.local[1] for c in made} | {c.remote[1] for c in made}
        table = [
            entry
            for path, name in (("/proc/net/tcp", "tcp"), ("/proc/net/tcp6", "tcp6"))
            for entry in parse_table(Path(path).read_text(), name)
            if entry.state != TcpState.LISTEN and {entry.local.port, entry.remote.port} <= ports
        ]
        assert (
            len(table) >= 2 * len(made) - 1
        )  # both ends of each (the TIME_WAIT server end is gone)
        queries = [
            ConnectionId(
                Endpoint(normalize_address(e.local.address), e.local.port),
                Endpoint(normalize_address(e.remote.address), e.remote.port),
            )
            for e in table
        ]
        # and ones that do not exist: another querier, another port, a listening port
        queries += [
            replace(
                q,
                remote=replace(
                    q.remote,
                    address=ipaddress.ip_address(
                        "::2" if q.remote.address.version == 6 else "127.0.0.9"
                    ),
                ),
            )
            for q in queries
        ]
        queries += [replace(q, remote=replace(q.remote, port=1)) for q in queries]
        procfs, netlink = ProcfsBackend(), NetlinkBackend()

        def comparable(found):
            return None if found is None else (replace(found.entry, source=""), found.inbound)

        answers = [(q, comparable(procfs.find(q)), comparable(netlink.find(q))) for q in queries]
        netlink.close()
    differing = [(q, a, b) for q, a, b in answers if a != b]
    assert not differing
    found = [a for _, a, _ in answers if a is not None]
    assert len(found) == len(table)  # every listed socket was found, nothing more
    assert any(inbound for _, inbound in found) and any(not e.owned for e, _ in found)


# -- a NAT gateway's query: one filtered dump instead of /proc (issue 19) ---------------


def _run_bytecode(code: bytes, sport: int, dport: int, ran: list[int] | None = None) -> bool:
    """inet_diag_bc_run of linux/net/ipv4/inet_diag.c, for the ops pairs_bytecode uses:
    whether a socket with these ports is kept (`ran`: the offsets of the ops run)."""
    at, left = 0, len(code)
    while left > 0:
        if ran is not None:
            ran.append(at)
        op, yes, no = struct.unpack_from("=BBH", code, at)
        port = struct.unpack_from("=BBH", code, at + 4)[2] if op != 1 else 0
        passed = {
            1: False,  # INET_DIAG_BC_JMP: always `no`
            2: sport >= port,
            3: sport <= port,
            4: dport >= port,
            5: dport <= port,
        }[op]
        step = yes if passed else no
        at, left = at + step, left - step
    return left == 0


def _audit_bytecode(code: bytes) -> None:
    """inet_diag_bc_audit's rules for these ops: every offset a multiple of 4 and no
    further than 4 past the end, each jump inside the code landing on an op that the
    chain of `yes` offsets from the start reaches."""
    on_chain, at = set(), 0
    while at < len(code):
        on_chain.add(at)
        at += struct.unpack_from("=BBH", code, at)[1]
    assert at == len(code)
    for at in sorted(on_chain):
        op, yes, no = struct.unpack_from("=BBH", code, at)
        left = len(code) - at
        least = 4 if op == 1 else 8
        for offset in (yes, no):
            assert offset >= least and offset % 4 == 0 and offset <= left + 4, (at, offset)
        if no < left:
            assert at + no in on_chain, (at, no)


def test_pairs_bytecode_keeps_exactly_the_pairs_asked_for() -> None:
    """Per pair four port conditions and a jump to the end: a socket is kept when its
    (local port, remote port) is one of the pairs, and the code passes the kernel's
    audit, for one pair and for the most a dump asks for."""
    from procident.lookup.netlink import MAX_PAIRS, pairs_bytecode

    one = pairs_bytecode([(40001, 6667)])
    assert struct.unpack_from("=HH", one) == (4 + 36, 1)  # INET_DIAG_REQ_BYTECODE
    ops = [struct.unpack_from("=BBH", one, 4 + 4 * i) for i in range(9)]
    assert ops == [
        (2, 8, 40),
        (0, 0, 40001),
        (3, 8, 32),
        (0, 0, 40001),
        (4, 8, 24),
        (0, 0, 6667),
        (5, 8, 16),
        (0, 0, 6667),
        (1, 4, 4),  # the jump: to the end, accepted
    ]
    pairs = [(1000 + 7 * i, 6660 + i % 5) for i in range(MAX_PAIRS)]
    for asked in ([(40001, 6667)], pairs[:2], pairs):
        code = pairs_bytecode(asked)[4:]
        _audit_bytecode(code)
        for sport, dport in asked:
            assert _run_bytecode(code, sport, dport)
        others = [(s + 1, d) for s, d in asked] + [(s, d + 5) for s, d in asked]
        assert not any(_run_bytecode(code, s, d) for s, d in others if (s, d) not in asked)
    with pytest.raises(ValueError):
        pairs_bytecode([])
    with pytest.raises(ValueError):
        pairs_bytecode(pairs + [(1, 2)])


@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 6)).map(lambda p: (40000 + p[0], p[1])),
        min_size=1,
        max_size=64,
    )
)
def test_pairs_bytecode_is_a_search_tree_that_keeps_exactly_the_pairs(pairs) -> None:
    """Any pairs, local ports shared by several remote ports, repeated: the kernel's
    audit passes, and every socket of the port grid around them is kept exactly when
    its pair was asked for; a socket meets at most ceil(log2(local ports)) tree
    nodes, then at most five ops per pair of one local port (a tree, not a chain)."""
    from procident.lookup.netlink import pairs_bytecode

    code = pairs_bytecode(pairs)[4:]
    _audit_bytecode(code)
    wanted = set(pairs)
    local_ports = {local for local, _ in wanted}
    # 36 bytes per pair (four conditions and a jump), 8 per tree node
    assert len(code) == 36 * len(wanted) + 8 * (len(local_ports) - 1)
    most = max(sum(1 for local, _ in wanted if local == port) for port in local_ports)
    depth = math.ceil(math.log2(len(local_ports))) if len(local_ports) > 1 else 0
    for sport in range(39999, 40014):
        for dport in range(8):
            ran: list[int] = []
            assert _run_bytecode(code, sport, dport, ran) == ((sport, dport) in wanted)
            assert len(ran) <= depth + 5 * most


def test_pack_pairs_dump() -> None:
    """The first request type (TCPDIAG_GETSOCK, 18) as a dump, family unspecified (both
    at once), the states of a connection, then the bytecode."""
    from procident.lookup.netlink import pack_pairs_dump, pairs_bytecode

    data = pack_pairs_dump([(40001, 6667), (40002, 6697)], 9)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags, seq) == (len(data), 18, 0x301, 9)
    assert struct.unpack_from("=BBBB", data, 16) == (socket.AF_UNSPEC, 0, 0, 0)
    states, tables = struct.unpack_from("=II", data, 16 + 4 + 48)
    # ESTABLISHED (1) to NEW_SYN_RECV (12) but LISTEN (10); not BOUND_INACTIVE (13),
    # which has the kernel walk its bind table as well
    assert (states, tables) == (0b1_1011_1111_1110, 0)
    assert data[16 + 60 :] == pairs_bytecode([(40001, 6667), (40002, 6697)])


def test_one_pair_is_asked_for_in_the_request_not_in_bytecode() -> None:
    """A dump for one port pair (a lone gateway query) puts the pair in the request's own
    ports, in network order, and sends no bytecode; in both request types. A pair asked
    twice is one pair; two pairs, or a port 0 (which the request would read as any
    port), take the bytecode."""
    from procident.lookup.netlink import (
        pack_pairs_dump,
        pack_states_dump,
        pairs_bytecode,
        pairs_filter,
    )

    for data in (
        pack_pairs_dump([(40001, 6667), (40001, 6667)], 9),
        pack_pairs_dump([(40001, 6667)], 9),
    ):
        assert len(data) == 16 + 60 and struct.unpack_from("=IH", data) == (76, 18)
        assert struct.unpack_from("!HH", data, 16 + 4) == (40001, 6667)
    data = pack_states_dump(socket.AF_INET6, 0b110, 4, *reversed(pairs_filter([(40001, 6667)])))
    assert len(data) == 16 + 56 and struct.unpack_from("!HH", data, 16 + 8) == (40001, 6667)
    two = pack_pairs_dump([(40001, 6667), (40002, 6667)], 9)
    assert struct.unpack_from("!HH", two, 16 + 4) == (0, 0)
    assert two[16 + 60 :] == pairs_bytecode([(40001, 6667), (40002, 6667)])
    assert pairs_filter([(0, 6667)]) == ((0, 0), pairs_bytecode([(0, 6667)]))


@pytest.mark.parametrize("one_walk", [True, False])
def test_the_kernel_keeps_only_the_one_pair_asked_for(one_walk) -> None:
    """On the live table, a lone search among twenty connections to one service port
    finds its own connection, and the kernel sent back that socket alone (it honours
    the request's ports, in both request types): the dump does not grow with the
    connections around it."""
    backend = NetlinkBackend()
    backend.one_walk = one_walk
    sent: list[int] = []
    dumped = backend._dumped

    def counting(request: bytes) -> list:
        entries = dumped(request)
        sent.append(len(entries))
        return entries

    backend._dumped = counting  # type: ignore[method-assign]
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        clients = [
            stack.enter_context(socket.create_connection(service.getsockname())) for _ in range(20)
        ]
        for _ in clients:
            stack.enter_context(service.accept()[0])
        here = Endpoint(_v("127.0.0.1"), service.getsockname()[1])
        for client in clients[::7]:
            port = client.getsockname()[1]
            (found,) = backend.find_any_remote(here, port)
            assert (found.entry.local, found.entry.remote.port, found.inbound) == (here, port, True)
        assert sent == ([1, 1, 1] if one_walk else [1, 0] * 3)  # entries per dump
    backend.close()


def test_unpack_dump_entries_done_and_errors() -> None:
    a = diag_msg(
        socket.AF_INET, 1, bytes([192, 0, 2, 1]), 40001, bytes([203, 0, 113, 5]), 6667, 1000, 77
    )
    b = diag_msg(
        socket.AF_INET, 6, bytes([192, 0, 2, 1]), 40001, bytes([203, 0, 113, 6]), 6667, 0, 0
    )
    # (type 18: the first request type's dump answers with its own type)
    entries, done = unpack_dump(nlmsg(20, 5, a) + nlmsg(18, 5, b) + nlmsg(20, 4, a), 5)
    assert not done and [(e.remote.address.exploded, e.uid, e.owned) for e in entries] == [
        ("203.0.113.5", 1000, True),
        ("203.0.113.6", 0, False),
    ]
    assert unpack_dump(nlmsg(3, 5, struct.pack("=i", 0)), 5) == ([], True)
    with pytest.raises(OSError, match="EPERM"):
        unpack_dump(nlmsg(2, 5, struct.pack("=i", -errno.EPERM)), 5)
    with pytest.raises(ValueError):
        unpack_dump(nlmsg(20, 5, a)[:-8] + b"\xff" * 3, 5)


def _seen(found):
    """What a gateway's answer depends on, whichever backend found it."""
    entry = found.entry
    return (
        str(normalize_address(entry.remote.address)),
        entry.remote.port,
        entry.uid,
        found.inbound,
    )


@requires_root
@pytest.mark.parametrize("one_walk", [True, False])
def test_find_any_remote_agrees_with_procfs_and_is_shared_in_a_batch(one_walk) -> None:
    """On the live table: connections of one local end to one remote port from several
    addresses (IPv4, and a dual-stack socket speaking IPv4) are found by netlink as by
    /proc, owned ones first, listeners left out; another remote port finds nothing.
    In a batch, a second query about the same pair shares the first one's dump. Each
    search is of one pair (its ports in the request), in either mode: one walk, or a
    dump per family."""
    backend = NetlinkBackend()
    backend.one_walk = one_walk
    with contextlib.ExitStack() as stack:
        made = [
            stack.enter_context(owned_connection(1, ("127.0.0.1", 0), "127.0.0.2")),
            stack.enter_context(owned_connection(2, ("127.0.0.1", 0), "127.0.0.3")),
        ]
        mapped = stack.enter_context(
            owned_connection(65534, ("127.0.0.1", 0), "::ffff:127.0.0.4", socket.AF_INET6)
        )
        # The gateway's view: the service's end, its port, and the remote port asked.
        for conn in [*made, mapped]:
            local = Endpoint(ipaddress.IPv4Address("127.0.0.1"), conn.remote[1])
            remote_port = conn.local[1]
            got = backend.find_any_remote(local, remote_port)
            tcp4, tcp6 = Path("/proc/net/tcp").read_text(), Path("/proc/net/tcp6").read_text()
            want = find_any_remote(local, remote_port, tcp4, tcp6)
            assert sorted(map(_seen, got)) == sorted(map(_seen, want)) and got, (got, want)
            assert got[0].inbound  # the service's port listens
            assert backend.find_any_remote(local, remote_port + 1) == [] or remote_port == 65535
        local = Endpoint(ipaddress.IPv4Address("127.0.0.1"), made[0].remote[1])
        with backend.batch():
            first = backend.find_any_remote(local, made[0].local[1])
            assert backend.find_any_remote(local, made[0].local[1]) is first
        assert backend.find_any_remote(local, made[0].local[1]) is not first
    backend.close()


@requires_root
@pytest.mark.parametrize("one_walk", [True, False])
def test_a_batchs_gateway_searches_share_one_dump_per_64_pairs(one_walk) -> None:
    """prefetch_any_remote with 70 (local end, remote port) asks, some on no connection,
    IPv4, IPv6 and one from a dual-stack socket, ten of them asked twice: the
    searches that follow in the batch give what /proc gives, and the kernel walked its
    table of connections twice (70 pairs, 64 to a dump), or four times with one dump
    per family (where the kernel refuses the first request type); alone, a search
    walks it again."""
    backend = NetlinkBackend()
    backend.one_walk = one_walk
    with contextlib.ExitStack() as stack:
        made = [
            stack.enter_context(owned_connection(1, ("127.0.0.1", 0), "127.0.0.2")),
            stack.enter_context(owned_connection(2, ("::1", 0), "::1", socket.AF_INET6)),
            stack.enter_context(
                owned_connection(65534, ("127.0.0.1", 0), "::ffff:127.0.0.4", socket.AF_INET6)
            ),
        ]
        service = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        peers = []
        for _ in range(60):
            client = stack.enter_context(socket.create_connection(service.getsockname()))
            stack.enter_context(service.accept()[0])
            peers.append(client.getsockname()[1])
        tcp6 = Path("/proc/net/tcp6").read_text()
        tcp4 = Path("/proc/net/tcp").read_text()
        asks = [
            (Endpoint(normalize_address(_v(c.remote[0])), c.remote[1]), c.local[1]) for c in made
        ]
        here = Endpoint(_v("127.0.0.1"), service.getsockname()[1])
        asks += [(here, port) for port in peers]
        asks += [(here, 1), (here, 2), (Endpoint(_v("::1"), here.port), 3)]  # none there
        assert len(asks) == 66 and len({a for a in asks}) == 66
        asks += [(here, 4), (here, 5), (here, 6), (here, 7)]
        with backend.batch():
            backend.prefetch_any_remote([*asks, *asks[:10]])
            assert backend.walks == (2 if one_walk else 4)
            got = [backend.find_any_remote(local, port) for local, port in asks]
            assert backend.walks == (2 if one_walk else 4)  # shared: no dump more
        want = [find_any_remote(local, port, tcp4, tcp6) for local, port in asks]
        assert [sorted(map(_seen, g)) for g in got] == [sorted(map(_seen, w)) for w in want]
        assert [bool(g) for g in got] == [True] * 63 + [False] * 7
        assert backend.one_walk is one_walk
        backend.find_any_remote(*asks[0])
        assert backend.walks == (3 if one_walk else 6)  # alone: a search of its own
    backend.close()


@requires_root
def test_a_failed_one_walk_dump_is_done_per_family_and_not_given_up(monkeypatch) -> None:
    """When the dump of both families fails for any reason but the kernel refusing its
    type (here: more sockets than a dump may bring back), the search is done again
    with one dump per family and succeeds, and the next search still tries one walk
    first."""
    from procident.lookup import netlink

    monkeypatch.setattr(netlink, "MAX_DUMP_ENTRIES", 3)
    backend = NetlinkBackend()
    with contextlib.ExitStack() as stack:
        asks = []
        for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
            service = stack.enter_context(socket.create_server((host, 0), family=family))
            for _ in range(2):
                client = stack.enter_context(socket.create_connection(service.getsockname()[:2]))
                stack.enter_context(service.accept()[0])
                local = Endpoint(_v(host), service.getsockname()[1])
                asks.append((local, client.getsockname()[1]))
        with backend.batch():
            backend.prefetch_any_remote(asks)  # 4 sockets in one walk: too many
            assert backend.walks == 3 and backend.one_walk  # then 2 and 2, per family
            assert all(len(backend.find_any_remote(*ask)) == 1 for ask in asks)
        assert len(backend.find_any_remote(*asks[0])) == 1
        assert backend.walks == 4 and backend.one_walk  # one walk again, 1 socket
    backend.close()


def _v(text: str):
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    "listeners, local, expected",
    [
        ([], "127.0.0.1", False),
        (["127.0.0.1"], "127.0.0.1", True),
        (["0.0.0.0"], "192.0.2.1", True),
        (["192.0.2.9"], "192.0.2.1", False),  # another address's listener
        (["::"], "2001:db8::1", True),
        (["::"], "192.0.2.1", None),  # dual-stack unless IPV6_V6ONLY: ask the kernel
        (["::", "0.0.0.0"], "192.0.2.1", True),
        (["::ffff:192.0.2.1"], "192.0.2.1", True),
        (["2001:db8::9"], "2001:db8::1", False),
        (["0.0.0.0"], "2001:db8::1", False),
        (["0.0.0.0"], "::ffff:192.0.2.1", True),  # a dual-stack socket's IPv4 connection
    ],
)
def test_inbound_from_the_listeners_of_a_port(listeners, local, expected) -> None:
    from procident.lookup.netlink import inbound_from

    assert inbound_from([_v(a) for a in listeners], Endpoint(_v(local), 113)) is expected


@requires_root
def test_in_a_batch_the_listener_check_gives_what_the_probe_gives() -> None:
    """Inside a batch, from its second lookup on, whether a connection is inbound comes
    from one dump of the listeners, not a probe each: on the live table it must agree
    with the probe for outbound and inbound ends, IPv4, IPv6, a dual-stack listener
    (the case only the kernel can judge) and an IPv6-only one."""
    backend = NetlinkBackend()
    with contextlib.ExitStack() as stack:
        made = [
            stack.enter_context(owned_connection(1, ("127.0.0.1", 0), "127.0.0.2")),
            stack.enter_context(owned_connection(2, ("::1", 0), "::1", socket.AF_INET6)),
        ]
        dual = stack.enter_context(socket.socket(socket.AF_INET6))
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", 0))
        dual.listen()
        only6 = stack.enter_context(socket.socket(socket.AF_INET6))
        only6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        only6.bind(("::", 0))
        only6.listen()
        accepted = []
        for listener in (dual, only6):
            client = stack.enter_context(
                socket.socket(socket.AF_INET6 if listener is only6 else socket.AF_INET)
            )
            client.connect(("::1" if listener is only6 else "127.0.0.1", listener.getsockname()[1]))
            server, _ = listener.accept()
            stack.enter_context(server)
            accepted += [client, server]
        conns = [conn(c.local, c.remote) for c in made] + [conn(c.remote, c.local) for c in made]
        conns += [conn(s.getsockname()[:2], s.getpeername()[:2]) for s in accepted]
        alone = [backend.find(c) for c in conns]
        with backend.batch():
            batched = [backend.find(c) for c in conns]
        assert [f is not None and f.inbound for f in batched] == [
            f is not None and f.inbound for f in alone
        ]
        assert all(f is not None for f in alone)
        assert [f.inbound for f in alone if f is not None] == [
            False,
            False,
            True,
            True,
            False,
            True,
            False,
            True,
        ]
    backend.close()


@pytest.mark.parametrize(
    "family, local, remote",
    [
        (socket.AF_INET, V4_LOCAL, V4_REMOTE),  # the ends asked for, given back
        (socket.AF_INET6, V6_LOCAL, V6_REMOTE),
        (socket.AF_INET, V4_LOCAL, Endpoint(V4_REMOTE.address, 6668)),  # another port
        (socket.AF_INET, Endpoint(ipaddress.IPv4Address("192.0.2.2"), 40001), V4_REMOTE),
        # a dual-stack socket's answer to an IPv4 request: mapped addresses, parsed
        (
            socket.AF_INET6,
            Endpoint(_v("::ffff:192.0.2.1"), 40001),
            Endpoint(_v("::ffff:198.51.100.7"), 6667),
        ),
    ],
)
def test_an_answer_read_with_the_ends_asked_is_the_same_entry(family, local, remote) -> None:
    """unpack_response with the request's ends reuses an end the kernel gives back byte
    for byte; every entry is equal to the one read without them."""
    body = diag_msg(
        family, 1, local.address.packed, local.port, remote.address.packed, remote.port, 1000, 7
    )
    plain = unpack_response(nlmsg(20, 5, body), seq=5)
    reused = unpack_response(
        nlmsg(20, 5, body),
        seq=5,
        asked=(V4_LOCAL, V4_REMOTE)
        if family == socket.AF_INET and local.address.version == 4
        else (V6_LOCAL, V6_REMOTE),
    )
    assert plain == reused
    assert isinstance(reused, type(plain)) and reused is not None and reused is not False
    if (local, remote) == (V4_LOCAL, V4_REMOTE):
        assert reused.local is V4_LOCAL and reused.remote is V4_REMOTE
