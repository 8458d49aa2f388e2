"""Bouncer hosts (issue 15): what an IRC server does to a bouncer host's ident daemon,
played for real against the daemon: a reconnection wave from one address, and a client
holding idle connections beside it."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import time
from dataclasses import replace

import pytest
from conftest import DictBackend
from harness import IO_TIMEOUT, USER_UID, owned_connection, read_all, read_line, wait_for

from procident.accounts import Accounts
from procident.config import Config, LimitsConfig, Rule, UsersConfig
from procident.homes import CONTENT, FileState
from procident.inetd import serve_connection
from procident.lookup import ConnectionId, Endpoint, SocketEntry, TcpState
from procident.responder import FILE_RACE_POLL, FILE_RACE_WAIT, Responder
from procident.server import Server, open_listeners
from procident.session import FIRST_QUERY_GRACE

WAVE = 500


def _wave(address: tuple[str, int], source: str, query: bytes, count: int) -> list[bytes]:
    """Open `count` connections from `source` at once (the IRC server's loop starting an
    ident lookup for every user of the wave), send `query` on each as soon as it is
    connected, and return what each received: its reply line, or what came before the
    daemon closed it."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex(address)
        socks.append(sock)
    unsent = set(socks)
    received = {sock: b"" for sock in socks}
    open_ = set(socks)
    deadline = time.monotonic() + 60
    try:
        while open_ and time.monotonic() < deadline:
            readable, writable, _ = select.select(list(open_), list(unsent), [], 1.0)
            for sock in writable:
                sock.send(query)  # a few bytes: the kernel takes them whole
                unsent.discard(sock)
            for sock in readable:
                try:
                    chunk = sock.recv(4096)
                except ConnectionError:
                    chunk = b""
                received[sock] += chunk
                if not chunk or b"\n" in received[sock]:
                    open_.discard(sock)  # an IRC server closes once it has the reply
        return [received[sock] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def test_a_reconnection_wave_from_one_address_is_answered_whole(start_daemon) -> None:
    """500 connections from one IRC server at once, each asking about the same user's
    connection right after connecting, with the default limits: every one hears the
    right answer (the defaults refused all but 8 at a time, or 100 by the rate)."""
    daemon = start_daemon("")
    # The IRC server at 127.0.0.9; the query names the user's connection to it.
    with owned_connection(USER_UID, ("127.0.0.9", 0), "127.0.0.1") as conn:
        expected = conn.query.rstrip() + b":USERID:OTHER:%d\r\n" % USER_UID
        replies = _wave(daemon.addresses["127.0.0.1"], "127.0.0.9", conn.query, WAVE)
    wrong = [reply for reply in replies if reply != expected]
    assert not wrong, f"{len(wrong)} of {WAVE} not answered right, e.g. {wrong[:3]}"
    assert "refused" not in daemon.log()


def _idle(daemon, source: str, count: int) -> list[socket.socket]:
    socks = [daemon.connect(source=source) for _ in range(count)]
    for sock in socks:
        sock.setblocking(False)
    return socks


def _closed_by_daemon(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_a_client_holding_idle_connections_keeps_only_its_cap(start_daemon) -> None:
    """One address opens 40 connections and asks nothing: past the grace, all but its
    per_client_connections are closed by the daemon (logged), the 8 stay served, and
    another client is answered throughout."""
    daemon = start_daemon("")
    cap = 8  # the default per_client_connections
    hog = _idle(daemon, "127.0.0.2", 40)
    assert daemon.ask(b"1,1\r\n", source="127.0.0.3") == b"1,1:ERROR:NO-USER\r\n"
    wait_for(
        lambda: sum(map(_closed_by_daemon, hog[cap:])) == len(hog) - cap,
        FIRST_QUERY_GRACE + IO_TIMEOUT,
    )
    daemon.wait_log(r"refused \d+ connection\(s\) over limits.per_client_connections")
    for sock in hog[:cap]:
        sock.setblocking(True)
        sock.sendall(b"2,2\r\n")
        assert read_line(sock) == b"2,2:ERROR:NO-USER\r\n"
    for sock in hog:
        sock.close()
    assert daemon.ask(b"1,1\r\n", source="127.0.0.3") == b"1,1:ERROR:NO-USER\r\n"


def test_a_client_filling_max_connections_cannot_lock_others_out(start_daemon) -> None:
    """One address holds every connection slot with idle connections (max_connections =
    20, 60 opened): a newcomer still gets its answer, from a slot one of the hog's
    connections over its cap gave up, while the hog's 8 within its cap stay."""
    daemon = start_daemon("[limits]\nmax_connections = 20\n")
    hog = _idle(daemon, "127.0.0.2", 60)
    wait_for(lambda: "refused" in daemon.log(), IO_TIMEOUT)  # the hog is past the cap
    for _ in range(3):
        assert daemon.ask(b"1,1\r\n", source="127.0.0.3") == b"1,1:ERROR:NO-USER\r\n"
    for sock in hog[:8]:
        sock.setblocking(True)
        sock.sendall(b"2,2\r\n")
        assert read_line(sock) == b"2,2:ERROR:NO-USER\r\n"
    for sock in hog:
        sock.close()


def test_limits_networks_give_some_clients_their_own_limits(start_daemon) -> None:
    """A [[limits.networks]] entry's limits apply to its clients, [limits] to the rest:
    here a scanner network gets a burst of 2, while everyone else keeps the default."""
    daemon = start_daemon(
        '[[limits.networks]]\nname = "scanners"\nclients = ["127.0.0.7/32"]\n'
        "per_client_rate = 0.01\nper_client_burst = 2\n"
    )
    replies = [daemon.ask(b"1,1\r\n", source="127.0.0.7") for _ in range(3)]
    assert replies == [b"1,1:ERROR:NO-USER\r\n"] * 2 + [b"1,1:ERROR:UNKNOWN-ERROR\r\n"]
    assert all(
        daemon.ask(b"1,1\r\n", source="127.0.0.8") == b"1,1:ERROR:NO-USER\r\n" for _ in range(5)
    )


# -- the race with the bouncer's write ---------------------------------------------------

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
ALICE_CONN = ConnectionId(Endpoint(LOOPBACK, 40001), Endpoint(LOOPBACK, 6667))
OTHER_BLOCK = b'lport 1:2 { reply "elsewhere" }\n'
ALICE_BLOCK = b'lport 40001 from 127.0.0.1 { reply "loungealice" }\n'
BOUNCER = (
    Rule(name="bouncer", action="real", users=frozenset({"alice"}), user_may=frozenset({"spoof"})),
)


class LateBouncer:
    """Alice's ~/.oidentd.conf as a bouncer writes it: without her block for the first
    `late` reads (a block for another connection, or the empty file of a write under
    way), then with it; `None` for `late`: never."""

    def __init__(self, before: bytes, late: int | None) -> None:
        self.before = before
        self.late = late
        self.reads = 0

    def __call__(self, uid: int, max_size: int) -> dict[str, FileState]:
        self.reads += 1
        data = self.before
        if self.late is not None and self.reads > self.late:
            data += ALICE_BLOCK
        return {".oidentd.conf": FileState(CONTENT, data)}


def _in_process(driver: str, files: LateBouncer, caplog, cache_seconds: int = 0) -> bytes:
    """Ask about ALICE_CONN through `driver` ("daemon": the selectors loop in this process;
    "inetd": serve_connection on a socket pair), with `files` as alice's home."""
    config = replace(
        Config(),
        rules=BOUNCER,
        limits=LimitsConfig(per_client_rate=0),
        users=UsersConfig(cache_seconds=cache_seconds),
    )
    entry = SocketEntry(ALICE_CONN.local, ALICE_CONN.remote, TcpState.ESTABLISHED, 1000, 4242)
    accounts = Accounts(config, files, groups=lambda name: frozenset(), account=lambda name: False)
    responder = Responder(DictBackend({ALICE_CONN: entry}), config, {1000: "alice"}.get, accounts)
    query = b"40001,6667\r\n"
    caplog.set_level(logging.INFO, logger="procident")
    if driver == "inetd":
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.sendall(query)
            ours.shutdown(socket.SHUT_WR)
            peer, local = Endpoint(LOOPBACK, 6667), Endpoint(LOOPBACK, 113)
            serve_connection(responder, config, peer, local, theirs.fileno(), theirs.fileno())
            theirs.shutdown(socket.SHUT_WR)
            return read_all(ours)
    server = Server(config, responder, open_listeners((Endpoint(LOOPBACK, 0),)))
    try:
        with socket.create_connection(server.listeners[0].getsockname(), timeout=5) as sock:
            sock.sendall(query)
            sock.setblocking(False)
            received = b""
            deadline = time.monotonic() + 10
            while b"\n" not in received and time.monotonic() < deadline:
                server.step(0.01)
                with contextlib.suppress(BlockingIOError):
                    received += sock.recv(100)
            return received
    finally:
        server.close()


@pytest.mark.parametrize("driver", ["daemon", "inetd"])
@pytest.mark.parametrize("before", [OTHER_BLOCK, b""], ids=["other-block", "mid-write"])
@pytest.mark.parametrize("cache_seconds", [0, 60])
def test_a_block_written_just_after_the_query_is_waited_for(
    driver, before, cache_seconds, caplog
) -> None:
    """The IRC server asked before the bouncer wrote the block for this connection (the
    file held another connection's block, or was empty, being rewritten): the daemon
    looks again, and answers with the block once it is there (whatever cache_seconds)."""
    files = LateBouncer(before, late=2)
    reply = _in_process(driver, files, caplog, cache_seconds)
    assert reply == b"40001,6667:USERID:OTHER:loungealice\r\n"
    assert files.reads == 3


@pytest.mark.parametrize("driver", ["daemon", "inetd"])
def test_a_block_that_never_comes_is_waited_for_briefly_and_said(driver, caplog) -> None:
    """No block ever comes: after FILE_RACE_WAIT the rule's own answer, and the log says
    it waited; a block already there is used at the first read, without waiting."""
    files = LateBouncer(OTHER_BLOCK, late=None)
    assert _in_process(driver, files, caplog) == b"40001,6667:USERID:UNIX:alice\r\n"
    assert 2 < files.reads <= 2 + FILE_RACE_WAIT / FILE_RACE_POLL
    assert f"no block for this connection (waited {FILE_RACE_WAIT:g}s)" in caplog.text
    caplog.clear()
    files = LateBouncer(OTHER_BLOCK, late=0)
    assert _in_process(driver, files, caplog) == b"40001,6667:USERID:OTHER:loungealice\r\n"
    assert files.reads == 1 and "waited" not in caplog.text


def test_the_daemon_waits_for_a_bouncer_that_writes_late(start_daemon, accounts, home) -> None:
    """For real: the helper reads pidtest's ~/.oidentd.conf, which holds another
    connection's block when the query comes; the bouncer rewrites it (truncate, write,
    as The Lounge does) 50 ms after the IRC server asked. The answer is the new block's."""
    daemon = start_daemon(
        '[[rules]]\nusers = ["pidtest"]\naction = "real"\nuser_may = ["spoof"]\n',
        preexec_fn=accounts,
    )
    conf = home / ".oidentd.conf"
    conf.write_bytes(OTHER_BLOCK)
    os.chown(conf, USER_UID, USER_UID)
    with (
        owned_connection(USER_UID, ("127.0.0.1", 0), "127.0.0.1") as conn,
        daemon.connect() as sock,
    ):
        sock.sendall(conn.query)
        time.sleep(0.05)  # the scenario: the bouncer is 50 ms late (not a synchronisation)
        with open(conf, "wb") as file:
            file.write(OTHER_BLOCK + f'lport {conn.local[1]} {{ reply "loungebob" }}\n'.encode())
        reply = read_line(sock)
    assert reply == conn.query.rstrip() + b":USERID:OTHER:loungebob\r\n"
