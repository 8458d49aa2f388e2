"""NAT in-process: the wildcard socket search and the conntrack stream on fixture text, the
responder's choices between forward and map, gateways' queries, and the loop guard
(tests/test_nat.py runs the same over real NAT between network namespaces)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import socket
import tempfile
import time
from pathlib import Path

import pytest
import tomllib
from conftest import DictBackend, requires_root
from hypothesis import given
from hypothesis import strategies as st
from test_server import Clock, connect, pump, received

from procident.config import Config, parse_config
from procident.forwarded import translated_reply
from procident.lookup import (
    ConnectionId,
    Endpoint,
    Found,
    IPAddress,
    SocketEntry,
    TcpState,
    normalize_address,
)
from procident.lookup.conntrack import ConntrackTable, find_translated
from procident.lookup.procfs import find_any_remote
from procident.policy import HIDDEN_USER, UNKNOWN_ERROR
from procident.protocol import Query, UserIdReply
from procident.responder import Responder
from procident.server import Server, open_listeners

DATA = Path(__file__).parent / "data"
CONNTRACK = (DATA / "nf_conntrack.txt").read_text()
TCP4 = (DATA / "proc_net_tcp.txt").read_text()
TCP6 = (DATA / "proc_net_tcp6.txt").read_text()
GATEWAY = ipaddress.ip_address("203.0.113.1")
PEER = ipaddress.ip_address("198.51.100.7")


def ep(address: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(address), port)


# -- the wildcard socket search (queries from a gateway) ------------------------------


@pytest.mark.parametrize(
    ("local", "remote_port", "expected"),
    [
        (("127.0.0.1", 40001), 6667, [(1, "127.0.0.1", False)]),
        (("127.0.0.2", 40002), 6667, [(3000000000, "127.0.0.1", False)]),
        (("127.0.0.1", 40004), 6667, [(2, "127.0.0.1", False)]),  # dual-stack, in tcp6
        (("::1", 40003), 6697, [(1, "::1", False)]),
        (("127.0.0.1", 6667), 40001, [(0, "127.0.0.1", True)]),  # accepted: inbound
        (("127.0.0.1", 40001), 6697, []),  # another remote port
        (("127.0.0.1", 6667), 0, []),  # a listener is no connection
    ],
)
def test_find_any_remote(local, remote_port, expected) -> None:
    """Connections of a local end to a remote port, at any remote address, on fixture
    text of a real kernel; each with its owner and whether it is inbound."""
    found = find_any_remote(ep(*local), remote_port, TCP4, TCP6, byteorder="little")
    got = [(f.entry.uid, str(normalize_address(f.entry.remote.address)), f.inbound) for f in found]
    assert got == expected


def test_find_any_remote_owned_first() -> None:
    """A socket no process holds (FIN_WAIT2) is listed after one a process holds, though the
    table lists it first: 127.0.0.1:40005 has both, to two remote addresses."""
    owned = (
        "  12: 0100007F:9C45 0200007F:1A0B 01 00000000:00000000 00:00000000 00000000"
        "     7        0 7999 1 0000000000000000 20 0 0 10 -1\n"
    )
    assert TCP4.index("0100007F:9C45 0100007F:1A0B 05") < len(TCP4)  # the unowned one
    found = find_any_remote(ep("127.0.0.1", 40005), 6667, TCP4 + owned, TCP6, byteorder="little")
    assert [(f.entry.owned, f.entry.uid) for f in found] == [(True, 7), (False, 0)]
    assert found[1].entry.state == TcpState.FIN_WAIT2


# -- the conntrack stream -------------------------------------------------------------


def test_find_translated_any_querier() -> None:
    """remote=None (a query forwarded by the next gateway out, naming only ports) matches
    the reply tuple by the gateway's end and the remote port alone."""
    inner = find_translated([CONNTRACK], Endpoint(GATEWAY, 50123), 6667, None)
    assert inner == [ConnectionId(ep("10.0.0.2", 40001), ep(str(PEER), 6667))]
    assert find_translated([CONNTRACK], Endpoint(GATEWAY, 50123), 6697, None) == []
    # The gateway's own connection (not translated) is never an inner one.
    assert find_translated([CONNTRACK], Endpoint(GATEWAY, 45000), 6697, None) == []


@given(st.lists(st.integers(min_value=1, max_value=len(CONNTRACK)), max_size=30))
def test_find_translated_any_chunking(cuts: list[int]) -> None:
    """The table read in pieces cut anywhere gives the same answers as the whole text."""
    points = sorted(set(cuts))
    chunks = [CONNTRACK[a:b] for a, b in zip([0, *points], [*points, len(CONNTRACK)], strict=True)]
    for local, port in ((Endpoint(GATEWAY, 50123), 6667), (ep("2001:db8:1::1", 50124), 6667)):
        whole = find_translated([CONNTRACK], local, port, None)
        assert whole and find_translated(iter(chunks), local, port, None) == whole


def test_overlong_line_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than"):
        find_translated(["x" * 10000], Endpoint(GATEWAY, 1), 1, None)


# -- the responder ----------------------------------------------------------------------


class Conntrack(ConntrackTable):
    """The daemon's reader, on a file holding fixture text instead of the kernel's table;
    it records each search."""

    def __init__(self, text: str = CONNTRACK) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".nf_conntrack", delete=False) as file:
            file.write(text)
        super().__init__(file.name)
        os.unlink(file.name)  # the open descriptor keeps it
        self.searches: list[tuple[Endpoint, int, IPAddress | None]] = []

    def find(self, local: Endpoint, remote_port: int, remote: IPAddress | None):
        self.searches.append((local, remote_port, remote))
        return super().find(local, remote_port, remote)


def test_searches_in_a_batch_share_one_read() -> None:
    """Queries of one loop turn cost one walk of the table; outside a batch, each search
    reads afresh (from the start of the file, as the kernel's seq_file needs)."""
    table = Conntrack()
    translated = Endpoint(GATEWAY, 50123)
    with table.batch():
        for _ in range(3):
            assert table.find(translated, 6667, PEER)
        assert table.find(Endpoint(GATEWAY, 50999), 6667, PEER) == []
    assert table.reads == 1
    assert table.find(translated, 6667, PEER) == table.find(translated, 6667, None)
    assert table.reads == 3


def config(text: str) -> Config:
    return parse_config(tomllib.loads(text))


MAP = '[[nat.map]]\nhosts = ["10.0.0.0/24"]\nreply = "guest"\nos = "UNIX"\n'
QUERY = Query(50123, 6667)
TRANSLATED = ConnectionId(Endpoint(GATEWAY, 50123), Endpoint(PEER, 6667))


def responder(text: str, sockets=None) -> tuple[Responder, Conntrack]:
    table = Conntrack()
    made = Responder(
        DictBackend({}),
        config(text),
        {1000: "alice"}.get,
        rng=random.Random(1),
        conntrack=table,
        any_remote=sockets or (lambda local, port: []),
    )
    return made, table


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.1.2.3", UserIdReply("b", "OTHER")),  # the wide entry before it did not match
        ("10.1.2.4", UserIdReply("c", "UNIX", "UTF-8")),
        ("fd00::5", HIDDEN_USER),
        ("192.0.2.1", None),  # no entry
        ("::ffff:10.1.2.3", None),  # IPv6 is not matched against IPv4 networks
    ],
)
def test_nat_map_first_match(host: str, expected) -> None:
    """First match wins, and checking one entry never changes the address the next is
    checked against (oidentd masked the address in place, so a narrow entry after a
    wide one that failed could never match)."""
    from procident.policy import nat_map

    conf = config(
        '[[nat.map]]\nhosts = ["10.9.0.0/16"]\nreply = "a"\n'
        '[[nat.map]]\nhosts = ["10.1.2.3"]\nreply = "b"\n'
        '[[nat.map]]\nhosts = ["10.1.0.0/16"]\nreply = "c"\nos = "UNIX"\ncharset = "UTF-8"\n'
        '[[nat.map]]\nhosts = ["fd00::/8"]\naction = "hide"\n'
    )
    decision = nat_map(ipaddress.ip_address(host), conf, random.Random(1))
    assert (decision.reply if decision else None) == expected


def test_forward_first_with_the_map_as_fallback() -> None:
    """order = "forward": the inner host is asked about its own port pair; the map entry
    is what is sent if it cannot answer."""
    answer = responder("[nat]\nenabled = true\n" + MAP)[0].respond(QUERY, TRANSLATED, 0.0)
    plan = answer.forward
    assert answer.line is None and plan is not None and plan.nat is not None
    assert plan.target == ep("10.0.0.2", 113)
    assert plan.ask == Query(40001, 6667)
    assert plan.nat.fallback == UserIdReply("guest", "UNIX")
    assert plan.nat.fallback_rule == "nat.map[0]"
    assert not plan.nat.from_gateway


def test_map_first() -> None:
    """order = "map": a listed inner host is answered from the map, with the outer ports."""
    made, _ = responder('[nat]\nenabled = true\norder = "map"\n' + MAP)
    answer = made.respond(QUERY, TRANSLATED, 0.0)
    assert answer.line == b"50123,6667:USERID:UNIX:guest\r\n"
    assert answer.rule == "nat nat.map[0]"


def test_map_first_forwards_hosts_it_does_not_list() -> None:
    other = MAP.replace("10.0.0.0/24", "10.9.0.0/24")
    made, _ = responder(f'[nat]\nenabled = true\norder = "map"\nport = 1113\n{other}')
    plan = made.respond(QUERY, TRANSLATED, 0.0).forward
    assert plan is not None and plan.target == ep("10.0.0.2", 1113)
    assert plan.nat is not None and plan.nat.fallback == UNKNOWN_ERROR


def test_map_hide_is_masked() -> None:
    """A map entry's HIDDEN-USER becomes UNKNOWN-ERROR under [reply] mask_errors."""
    hide = '[[nat.map]]\nhosts = ["10.0.0.0/8"]\naction = "hide"\n'
    made, _ = responder(f"[nat]\nenabled = true\nforward = false\n{hide}")
    assert made.respond(QUERY, TRANSLATED, 0.0).line == b"50123,6667:ERROR:HIDDEN-USER\r\n"
    made, _ = responder(
        f"[reply]\nmask_errors = true\n[nat]\nenabled = true\nforward = false\n{hide}"
    )
    assert made.respond(QUERY, TRANSLATED, 0.0).line == b"50123,6667:ERROR:UNKNOWN-ERROR\r\n"


def test_nat_off_or_not_translated() -> None:
    """NAT off: the table is never read. A query about no translated connection is NO-USER."""
    made, table = responder("")
    assert made.respond(QUERY, TRANSLATED, 0.0).line == b"50123,6667:ERROR:NO-USER\r\n"
    assert table.searches == []
    made, table = responder("[nat]\nenabled = true\n")
    other = ConnectionId(Endpoint(GATEWAY, 50999), Endpoint(PEER, 6667))
    assert made.respond(Query(50999, 6667), other, 0.0).line == b"50999,6667:ERROR:NO-USER\r\n"
    assert table.searches == [(Endpoint(GATEWAY, 50999), 6667, PEER)]


def test_translated_from_an_address_of_this_host() -> None:
    """A process of the gateway itself that connects from its inner address is
    masqueraded too: its socket, found by the inner tuple, is answered by this host's
    own policy, with the outer port pair."""
    made, _ = responder("[nat]\nenabled = true\n" + MAP)
    local, remote = ep("10.0.0.2", 40001), ep(str(PEER), 6667)
    made.backend.table[ConnectionId(local, remote)] = SocketEntry(  # type: ignore[attr-defined]
        local, remote, TcpState.ESTABLISHED, 1000, 4242
    )
    answer = made.respond(QUERY, TRANSLATED, 0.0, explain=True)
    assert answer.line == b"50123,6667:USERID:UNIX:alice\r\n"
    assert answer.forward is None
    assert "the inner end is a socket of this host" in answer.trace


def entry(remote: str, uid: int, inode: int = 77) -> Found:
    local = ep("10.0.0.2", 40001)
    return Found(SocketEntry(local, ep(remote, 6667), TcpState.ESTABLISHED, uid, inode), False)


FROM_GATEWAY = ConnectionId(ep("10.0.0.2", 40001), ep("10.0.0.1", 6667))
GATEWAYS = '[nat]\ngateways = ["10.0.0.1/32"]\n'


def test_gateway_query_answered_for_the_real_connection() -> None:
    """A trusted gateway's query names the gateway as remote end; the connection found
    goes to the outer peer, and the owner is named."""
    asked = []

    def sockets(local, port):
        asked.append((local, port))
        return [entry("198.51.100.7", 1000)]

    made, _ = responder(GATEWAYS, sockets)
    answer = made.respond(Query(40001, 6667), FROM_GATEWAY, 0.0, explain=True)
    assert answer.line == b"40001,6667:USERID:UNIX:alice\r\n"
    assert asked == [(ep("10.0.0.2", 40001), 6667)]
    assert any("connection is 10.0.0.2:40001 <-> 198.51.100.7:6667" in s for s in answer.trace)


def test_query_from_another_host_is_not_widened() -> None:
    made, _ = responder(GATEWAYS, lambda local, port: [entry("198.51.100.7", 1000)])
    stranger = ConnectionId(ep("10.0.0.2", 40001), ep("10.0.0.3", 6667))
    assert made.respond(Query(40001, 6667), stranger, 0.0).line == b"40001,6667:ERROR:NO-USER\r\n"


def test_gateway_query_with_two_owners_is_ambiguous() -> None:
    """Two connections from the same local port to the same remote port at two
    addresses, of two owners: no name is guessed."""
    two = [entry("198.51.100.7", 1000), entry("198.51.100.8", 1001)]
    made, _ = responder(GATEWAYS, lambda local, port: two)
    answer = made.respond(Query(40001, 6667), FROM_GATEWAY, 0.0)
    assert answer.line == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"
    assert "2 owners" in answer.rule
    same = [entry("198.51.100.7", 1000), entry("198.51.100.8", 1000, inode=78)]
    made, _ = responder(GATEWAYS, lambda local, port: same)
    assert made.respond(Query(40001, 6667), FROM_GATEWAY, 0.0).line.endswith(b":alice\r\n")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"40001,6667:USERID:UNIX,UTF-8:bob", UserIdReply("bob", "UNIX", "UTF-8")),
        (b"40001 , 6667 : ERROR : HIDDEN-USER", HIDDEN_USER),
        (b"40002,6667:USERID:UNIX:bob", UserIdReply("guest", "UNIX")),
        (b"40001,6667:ERROR:X-CUSTOM", UserIdReply("guest", "UNIX")),
        (b"40001,6667:USERID:UNIX:", UserIdReply("guest", "UNIX")),
        (b"garbage", UserIdReply("guest", "UNIX")),
        (None, UserIdReply("guest", "UNIX")),
    ],
)
def test_translated_reply(line, expected) -> None:
    """The inner host's answer passes on only when it is a valid reply about the pair
    asked; its errors are its own policy and pass on too."""
    made, _ = responder("[nat]\nenabled = true\n" + MAP)
    plan = made.respond(QUERY, TRANSLATED, 0.0).forward
    assert plan is not None
    reply, _ = translated_reply(plan, line, "" if line is not None else "no answer in 5s")
    assert reply == expected


# -- the loop guard ---------------------------------------------------------------------


def test_loop_guard(caplog: pytest.LogCaptureFixture) -> None:
    """A gateway whose table sends every query back to itself (a circle of one): the
    query it forwards comes back from a trusted gateway about the inner connection it
    is already asking about, and is answered at once instead of forwarded again."""
    listener = open_listeners((Endpoint(ipaddress.IPv4Address("127.0.0.1"), 0),))
    port = listener[0].getsockname()[1]

    # A circle, played by this one daemon and its table: the outer query (port 61000)
    # is about inner port 5000, whose query is about inner port 5001, whose query is
    # about inner port 5000 again. Every "inner host" is this daemon, and the querier
    # 127.0.0.1 a trusted gateway.
    def line(inner: int, outer: int) -> str:
        return (
            f"ipv4 2 tcp 6 100 ESTABLISHED src=127.0.0.1 dst=198.51.100.7 sport={inner} "
            f"dport=6667 src=198.51.100.7 dst=127.0.0.1 sport=6667 dport={outer} use=1\n"
        )

    table = Conntrack(line(5000, 61000) + line(5001, 5000) + line(5000, 5001))
    loop_map = MAP.replace("10.0.0.0/24", "127.0.0.0/8")
    conf = config(f'[nat]\nenabled = true\nport = {port}\ngateways = ["127.0.0.1/32"]\n{loop_map}')
    made = Responder(
        DictBackend({}),
        conf,
        conntrack=table,
        any_remote=lambda local, port: [],  # type: ignore[arg-type]
    )
    server = Server(conf, made, listener, clock=Clock())
    client = connect(server)
    client.send(b"61000,6667\r\n")
    reply = b""
    with caplog.at_level(logging.INFO, logger="procident"):
        deadline = time.monotonic() + 5.0  # waits for the answer, not for a time
        while not reply.endswith(b"\n") and time.monotonic() < deadline:
            pump(server, 1)
            reply += received(client) or b""
    client.close()
    server.close()
    # The second visit was answered by the guard (the map's entry), and that answer
    # came back through the first forward.
    assert reply == b"61000,6667:USERID:UNIX:guest\r\n"
    rules = [r.getMessage() for r in caplog.records if "answer client=" in r.getMessage()]
    assert len(rules) == 3, rules
    assert "query=5001,6667" in rules[0] and "loop guard: already asking" in rules[0]
    assert "query=5000,6667" in rules[1] and rules[1].endswith(": answered")
    assert "query=61000,6667" in rules[2] and rules[2].endswith(": answered")
    assert server.nat_asking == 0
    assert len(table.searches) == 3


@requires_root
def test_a_turns_gateway_queries_share_one_search_of_the_kernel() -> None:
    """40 queries from a gateway (127.0.0.9), all in one turn of the daemon's loop, about
    four inner connections of three owners and four port pairs on none: each is
    answered for its own connection, in one turn, and the kernel's table was walked
    once for all of them (one dump), not once per query."""
    from harness import owned_connection, receive_queue, wait_for

    from procident.lookup.netlink import NetlinkBackend

    conf = config(
        '[nat]\ngateways = ["127.0.0.9/32"]\n[[rules]]\nname = "all"\naction = "numeric"\n'
    )
    backend = NetlinkBackend()
    listener = open_listeners((Endpoint(ipaddress.IPv4Address("127.0.0.2"), 0),))
    server = Server(conf, Responder(backend, conf), listener)
    owners = [1, 2, 65534, 2]
    with contextlib.ExitStack() as stack:
        inner = [
            stack.enter_context(owned_connection(uid, ("127.0.0.1", 0), "127.0.0.2"))
            for uid in owners
        ]
        asked = [
            (c.local[1], c.remote[1], str(uid)) for c, uid in zip(inner, owners, strict=True)
        ] * 9
        asked += [(c.local[1], c.remote[1] + 1, None) for c in inner]  # no such pair
        clients = []
        for port, service, _ in asked:
            client = socket.socket()
            client.bind(("127.0.0.9", 0))
            client.connect(server.listeners[0].getsockname())
            client.sendall(b"%d,%d\r\n" % (port, service))
            clients.append(stack.enter_context(client))
        daemon_port = server.listeners[0].getsockname()[1]
        wait_for(  # every query in the kernel's queue before the one turn
            lambda: all(receive_queue(daemon_port, c.getsockname()[1]) for c in clients), 5.0
        )
        server.step(timeout=1.0)
        for client, (port, service, uid) in zip(clients, asked, strict=True):
            client.settimeout(5.0)
            reply = client.recv(600).decode()
            if uid is None:
                assert reply == f"{port},{service}:ERROR:NO-USER\r\n"
            else:
                assert reply == f"{port},{service}:USERID:OTHER:{uid}\r\n"
        assert backend.walks == 1
    server.close()
    backend.close()


class PrepareBug(Responder):
    """A responder whose gathering of a turn's gateway queries has a bug."""

    def prepare(self, conns: list[ConnectionId]) -> None:
        raise RuntimeError("bug in prepare")


def test_a_bug_gathering_gateway_queries_costs_no_answer(caplog) -> None:
    """The gateway queries of a turn wait for its end; if preparing their shared search
    fails unexpectedly, it is logged with its traceback, every one of them is still
    answered (each searching alone), and the loop serves on."""
    listener = open_listeners((Endpoint(ipaddress.IPv4Address("127.0.0.1"), 0),))
    conf = config('[nat]\ngateways = ["127.0.0.1/32"]\n')
    searched = []

    def sockets(local, port):
        searched.append((local, port))
        return [entry("198.51.100.7", 1000)]

    made = PrepareBug(DictBackend({}), conf, {1000: "alice"}.get, any_remote=sockets)
    server = Server(conf, made, listener, clock=Clock())
    clients = [connect(server) for _ in range(3)]
    for number, client in enumerate(clients):
        client.send(b"%d,6667\r\n" % (40001 + number))
    replies = [b""] * 3
    with caplog.at_level(logging.ERROR, logger="procident"):
        for _ in range(50):  # bounded: waits for the answers, not for a time
            pump(server, 1)
            replies = [r + (received(c) or b"") for r, c in zip(replies, clients, strict=True)]
            if all(r.endswith(b"\n") for r in replies):
                break
    assert replies == [b"%d,6667:USERID:UNIX:alice\r\n" % (40001 + n) for n in range(3)]
    assert len(searched) == 3
    assert "unexpected error preparing" in caplog.text and "RuntimeError: bug" in caplog.text
    late = connect(server)
    late.send(b"40009,6667\r\n")
    pump(server, 3)
    assert received(late) == b"40009,6667:USERID:UNIX:alice\r\n"
    for client in [*clients, late]:
        client.close()
    server.close()
