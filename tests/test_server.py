"""The selectors loop in-process, driven step by step with a fake clock.

These pin what the end-to-end tests can only observe from outside: the exact
output bound, deadline order across reloads, and the loop's guard.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import DictBackend
from harness import receive_queue, wait_for

from procident.config import Config, LimitsConfig
from procident.connection import MAX_OUTPUT
from procident.lookup import ConnectionId, Endpoint
from procident.protocol import Query
from procident.responder import Answer, Responder
from procident.server import ListenError, Server, client_key, open_listeners

LOCALHOST = Endpoint(ipaddress.IPv4Address("127.0.0.1"), 0)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_server(
    limits: LimitsConfig | None = None, responder=None, listen=(LOCALHOST,)
) -> tuple[Server, Clock]:
    config = replace(Config(), limits=limits or LimitsConfig())
    clock = Clock()
    responder = responder or Responder(DictBackend({}), config)
    return Server(config, responder, open_listeners(listen), clock=clock), clock


def pump(server: Server, turns: int = 20) -> None:
    for _ in range(turns):
        server.step(timeout=0.01)


def connect(server: Server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(server.listeners[0].getsockname())
    sock.setblocking(False)
    return sock


def received(sock: socket.socket) -> bytes | None:
    """What has arrived so far; None once the server has closed the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return data
        except ConnectionResetError:
            return None
        if not chunk:
            return data or None
        data += chunk


def read_until_closed(server: Server, client: socket.socket, turns: int = 100) -> bytes:
    """Run the loop and collect what `client` receives until the server closes it."""
    out = b""
    for _ in range(turns):
        pump(server, 1)
        chunk = received(client)
        if chunk is None:
            break
        out += chunk
    return out


@pytest.fixture
def server_factory():
    servers: list[Server] = []

    def factory(**kwargs):
        server, clock = make_server(**kwargs)
        servers.append(server)
        return server, clock

    yield factory
    for server in servers:
        server.close()


class CountingSelector:
    """Wraps a server's selector (Server.selector) and counts what it registers."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.registered: list[object] = []

    def register(self, fileobj, events, data=None):
        self.registered.append(fileobj)
        return self.inner.register(fileobj, events, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_client_that_closes_once_answered_is_never_registered(server_factory) -> None:
    """The common case (connect, ask, read, close) costs no selector registration: the
    query is read in the accepting turn, and the answered connection is read again at
    the next turn, which comes at once, before being registered; by then its client
    has closed. Nothing is lost: the answer came, the connection is closed."""
    server, _ = server_factory()
    counting = server.selector = CountingSelector(server.selector)
    client = connect(server)
    client.send(b"1,1\r\n")
    port = server.listeners[0].getsockname()[1]
    wait_for(lambda: receive_queue(port, client.getsockname()[1]), 5.0)  # before the turn
    server.step(timeout=1.0)
    assert received(client) == b"1,1:ERROR:NO-USER\r\n"
    client_port = client.getsockname()[1]
    client.close()
    wait_for(lambda: _state(port, client_port) == "08", 5.0)  # CLOSE_WAIT: the FIN came
    server.step(timeout=5.0)  # does not wait: the turn is due at once
    assert not server.connections
    assert counting.registered == []


def _state(local_port: int, remote_port: int) -> str | None:
    """The TCP state (hex, as /proc/net/tcp shows it) of the IPv4 socket with these ports."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1][-4:], 16) == local_port and int(fields[2][-4:], 16) == remote_port:
            return fields[3]
    return None


def test_a_client_that_stays_is_registered_and_answered_later(server_factory) -> None:
    """A client that keeps its connection after the first answer is registered at the
    next turn (one look, then it waits like any other: no loop spins for it), and its
    second query, sent later, is answered within a turn of its coming."""
    server, _ = server_factory()
    counting = server.selector = CountingSelector(server.selector)
    client = connect(server)
    client.send(b"1,1\r\n")
    pump(server, 3)
    assert received(client) == b"1,1:ERROR:NO-USER\r\n"
    assert len(counting.registered) == 1 and server.connections == 1
    client.send(b"2,2\r\n")
    reply = b""
    for _ in range(3):  # each turn waits for an event; the query is one
        server.step(timeout=5.0)
        reply += received(client) or b""
        if reply:
            break
    assert reply == b"2,2:ERROR:NO-USER\r\n"
    assert len(counting.registered) == 1


def test_output_bound_stops_reading_then_resumes(server_factory) -> None:
    """A client that does not read has at most MAX_OUTPUT (+ one reply) pending and is not
    read; once it reads, the rest is answered in order, exactly once each."""
    server, _ = server_factory(
        limits=LimitsConfig(max_queries_per_connection=10000, per_client_rate=0)
    )
    client = connect(server, rcvbuf=4096)
    count = 3000
    client.setblocking(True)
    client.sendall(b"".join(b"0,%d\r\n" % (i + 1) for i in range(count)))
    client.setblocking(False)
    pump(server, 50)
    assert MAX_OUTPUT <= server.unsent < MAX_OUTPUT + 64
    answered_so_far = server.metrics.replies["INVALID-PORT"]
    assert answered_so_far < count
    pump(server, 50)  # not read, so nothing more is answered while the client reads nothing
    assert server.metrics.replies["INVALID-PORT"] == answered_so_far
    data = b""
    for _ in range(2000):
        pump(server, 2)
        data += received(client) or b""
        if data.count(b"\n") == count:
            break
    assert data == b"".join(b"0,%d:ERROR:INVALID-PORT\r\n" % (i + 1) for i in range(count))


def test_idle_deadline_and_restart(server_factory) -> None:
    """Connections close at the idle timeout; a reply restarts the timer."""
    server, clock = server_factory(limits=LimitsConfig(idle_timeout=60))
    quiet, busy = connect(server), connect(server)
    pump(server)
    clock.now += 50
    busy.send(b"0,1\r\n")
    pump(server)
    assert received(busy) == b"0,1:ERROR:INVALID-PORT\r\n"
    clock.now += 15  # 65 s after connecting, 15 s after busy's reply
    pump(server)
    assert received(quiet) is None
    assert received(busy) == b"" and server.connections == 1


def test_reload_with_shorter_timeout_keeps_deadlines_in_order(server_factory) -> None:
    """After a reload shortens the idle timeout, old and new connections both close on time."""
    server, clock = server_factory(limits=LimitsConfig(idle_timeout=60))
    old = connect(server)
    pump(server)
    server.apply(replace(server.config, limits=LimitsConfig(idle_timeout=10)))
    clock.now += 1
    new = connect(server)
    pump(server)
    clock.now += 10.5  # new: 10.5 s old, past 10; old: capped at reload + 10
    pump(server)
    assert received(new) is None and received(old) is None
    assert not server.connections


def test_reload_with_longer_timeout_applies_to_later_replies(server_factory) -> None:
    """A longer idle timeout counts from the next reply; open deadlines are not extended."""
    server, clock = server_factory(limits=LimitsConfig(idle_timeout=10))
    first = connect(server)
    pump(server)
    server.apply(replace(server.config, limits=LimitsConfig(idle_timeout=100)))
    second = connect(server)
    pump(server)
    clock.now += 11
    pump(server)
    assert received(first) is None and received(second) == b""


class ExplodingResponder:
    """A responder with a bug: it raises for server port 666."""

    def __init__(self, config) -> None:
        self.config = config
        self.inner = Responder(DictBackend({}), config)
        self.batch = self.inner.batch
        self.from_gateway = self.inner.from_gateway
        self.prepare = self.inner.prepare

    def respond(self, query: Query, conn: ConnectionId, now: float) -> Answer:
        if query.server_port == 666:
            raise RuntimeError("bug")
        return self.inner.respond(query, conn, now)


def test_a_bug_costs_one_connection_not_the_loop(server_factory, caplog) -> None:
    """An exception escaping the responder closes that connection, is logged with its
    traceback, and the loop serves the next client."""
    server, _ = server_factory(responder=ExplodingResponder(Config()))
    victim = connect(server)
    victim.send(b"666,1\r\n")
    with caplog.at_level(logging.ERROR, logger="procident"):
        pump(server)
    assert received(victim) is None
    assert "unexpected error serving" in caplog.text and "RuntimeError: bug" in caplog.text
    survivor = connect(server)
    survivor.send(b"1,1\r\n")
    pump(server)
    assert received(survivor) == b"1,1:ERROR:NO-USER\r\n"


def test_partial_line_at_half_close_gets_no_reply(server_factory) -> None:
    """A client that half-closes after an incomplete line gets the close, no reply."""
    server, _ = server_factory()
    client = connect(server)
    client.send(b"1,1\r\n2,2")
    client.shutdown(socket.SHUT_WR)
    pump(server)
    assert received(client) == b"1,1:ERROR:NO-USER\r\n"
    pump(server)
    assert not server.connections


def test_ipv6_listener_is_v6only() -> None:
    """IPv6 listeners are IPv6-only, set explicitly, so an IPv4 one can share the port."""
    (listener,) = open_listeners((Endpoint(ipaddress.IPv6Address("::1"), 0),))
    with listener:
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_listen_error_names_address() -> None:
    """An address that is not on this host is a ListenError naming it and the reason."""
    with pytest.raises(
        ListenError, match=r"cannot listen on 192\.0\.2\.1:0: Cannot assign requested address"
    ):
        open_listeners((Endpoint(ipaddress.IPv4Address("192.0.2.1"), 0),))


def test_client_key_counts_ipv6_per_64() -> None:
    """One IPv4 address is one client; for IPv6, one /64 is."""
    a, b = ipaddress.IPv6Address("2001:db8:0:1::1"), ipaddress.IPv6Address("2001:db8:0:1:ffff::2")
    assert client_key(a) == client_key(b) != client_key(ipaddress.IPv6Address("2001:db8:0:2::1"))
    assert client_key(ipaddress.IPv4Address("192.0.2.1")) != client_key(
        ipaddress.IPv4Address("192.0.2.2")
    )


def test_fd_exhaustion_on_two_listeners_at_once(server_factory, caplog) -> None:
    """When accept() hits EMFILE on every listener in the same turn, the loop pauses once,
    survives, and accepts again after the pause."""
    import os
    import resource

    second = Endpoint(ipaddress.IPv4Address("127.0.0.2"), 0)
    server, clock = server_factory(listen=(LOCALHOST, second))
    clients = [socket.create_connection(s.getsockname()) for s in server.listeners]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)  # the limit caps fd numbers: no new fd below the lowest free one
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with caplog.at_level(logging.WARNING, logger="procident"):
            server.step(timeout=1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert caplog.text.count("cannot accept: Too many open files") == 1
    assert not server.connections and not server.accepting
    clock.now += 1
    pump(server)
    assert server.connections == 2
    for client in clients:
        client.close()


def test_one_batch_per_turn(server_factory) -> None:
    """Queries that arrive in the same loop turn are looked up inside one backend batch
    (so the procfs backend reads its tables once for all of them)."""
    backend = DictBackend({})
    server, _ = server_factory(responder=Responder(backend, Config()))
    clients = [connect(server) for _ in range(3)]
    pump(server, 5)  # accepted
    for client in clients:
        client.send(b"1,1\r\n2,2\r\n")
    time.sleep(0.1)  # all three are readable by the next turn
    server.step(timeout=1)
    assert len(backend.finds) == 6
    assert {batch for batch, _ in backend.finds} == {backend.batches} and all(
        inside for _, inside in backend.finds
    )


def test_query_read_in_the_turn_that_accepts_it(server_factory) -> None:
    """A client that sends its query right after connecting is answered in the same loop
    turn that accepts it, not a turn later."""
    server, _ = server_factory()
    client = connect(server)
    client.send(b"1,1\r\n")
    time.sleep(0.1)  # the query is in the kernel before the server's turn
    server.step(timeout=1)
    time.sleep(0.05)
    assert received(client) == b"1,1:ERROR:NO-USER\r\n"


def test_a_connection_its_client_closed_does_not_count_against_the_cap(server_factory) -> None:
    """per_client_connections = 1. The client reads its reply, opens its next connection,
    then closes the old one and asks on the new, all before the loop's next turn (as an
    IRC server reconnecting does): when the loop accepts the new connection, the client
    has one open, so it is answered, not refused (the closed one counted until the loop
    read its end, and the new one heard UNKNOWN-ERROR)."""
    server, _ = server_factory(
        limits=LimitsConfig(per_client_connections=1, per_client_rate=0, over_limit="error")
    )
    old = connect(server)
    old.send(b"1,1\r\n")
    pump(server, 3)
    assert received(old) == b"1,1:ERROR:NO-USER\r\n"
    for _ in range(20):
        new = connect(server)  # the listener is ready first...
        old.close()  # ... then the old connection's end arrives
        new.send(b"2,2\r\n")
        reply = b""
        for _ in range(50):
            pump(server, 1)
            reply += received(new) or b""
            if reply.endswith(b"\n"):
                break
        assert reply == b"2,2:ERROR:NO-USER\r\n"
        old = new
    old.close()
    assert server.metrics.refused["per_client_connections"] == 0


def test_a_default_timeout_set_by_an_embedder_does_not_make_reads_wait(server_factory) -> None:
    """A program that embeds the server may set socket.setdefaulttimeout; accepted sockets
    take that timeout, under which each read would first wait for data. The server makes
    them non-blocking, so a client that connects and says nothing costs the loop no wait:
    the next client's query is answered in the same turn."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        server, _ = server_factory()
        idle = connect(server)
        asking = connect(server)
        asking.send(b"1,1\r\n")
        port = server.listeners[0].getsockname()[1]
        wait_for(lambda: receive_queue(port, asking.getsockname()[1]), 5.0)
        server.step(timeout=1.0)
        assert received(asking) == b"1,1:ERROR:NO-USER\r\n"
        assert server.connections == 2
        assert [conn.sock.gettimeout() for conn in server.sessions] == [0.0, 0.0]
        idle.close()
        asking.close()
    finally:
        socket.setdefaulttimeout(previous)
