"""The sock_diag backend: pack/unpack on hand-built bytes, then against the live kernel,
where it must give exactly the answers of the procfs backend."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import requires_root
from harness import owned_connection

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
    pack_dump_request,
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


def test_pack_dump_request() -> None:
    """NLM_F_REQUEST | NLM_F_DUMP, every state but LISTEN, and an INET_DIAG_REQ_BYTECODE
    of four port conditions: each passes on to the next (yes = 8) or jumps past the end
    (no = what is left + 4), which rejects the socket."""
    data = pack_dump_request(socket.AF_INET, 40001, 6667, 9)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data)
    assert (length, kind, flags, seq) == (len(data), 20, 0x301, 9)
    family, protocol, _, _, states = struct.unpack_from("=BBBBI", data, 16)
    assert (family, protocol, states) == (
        socket.AF_INET,
        socket.IPPROTO_TCP,
        0xFFFFFFFF & ~(1 << 10),
    )
    attribute = data[16 + 56 :]
    assert struct.unpack_from("=HH", attribute) == (4 + 32, 1)
    ops = [struct.unpack_from("=BBH", attribute, 4 + 4 * i) for i in range(8)]
    assert ops == [(2, 8, 36), (0, 0, 40001), (3, 8, 28), (0, 0, 40001)] + [
        (4, 8, 20),
        (0, 0, 6667),
        (5, 8, 12),
        (0, 0, 6667),
    ]


def test_unpack_dump_entries_done_and_errors() -> None:
    a = diag_msg(
        socket.AF_INET, 1, bytes([192, 0, 2, 1]), 40001, bytes([203, 0, 113, 5]), 6667, 1000, 77
    )
    b = diag_msg(
        socket.AF_INET, 6, bytes([192, 0, 2, 1]), 40001, bytes([203, 0, 113, 6]), 6667, 0, 0
    )
    entries, done = unpack_dump(nlmsg(20, 5, a) + nlmsg(20, 5, b) + nlmsg(20, 4, a), 5)
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
def test_find_any_remote_agrees_with_procfs_and_is_shared_in_a_batch() -> None:
    """On the live table: connections of one local end to one remote port from several
    addresses (IPv4, and a dual-stack socket speaking IPv4) are found by netlink as by
    /proc, owned ones first, listeners left out; another remote port finds nothing.
    In a batch, a second query about the same pair shares the first one's dump."""
    backend = NetlinkBackend()
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
