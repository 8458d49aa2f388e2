"""Bouncer hosts (issue 15): what an IRC server does to a bouncer host's ident daemon,
played for real against the daemon: a reconnection wave from one address, and a client
holding idle connections beside it."""

from __future__ import annotations

import select
import socket
import time

from harness import IO_TIMEOUT, USER_UID, owned_connection, read_line, wait_for

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
