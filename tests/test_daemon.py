"""The daemon end to end: real loopback sockets, owned by real uids, against the real /proc.

The daemon is started as root and drops to nobody, as in production; the
connections asked about are made by children that setuid() to the owner first.
"""

from __future__ import annotations

import contextlib
import re
import resource
import signal
import socket
import time

import pytest
from conftest import requires_root
from harness import (
    IO_TIMEOUT,
    cpu_ticks,
    open_fds,
    owned_connection,
    proc_status,
    read_all,
    read_line,
    receive_queue,
    wait_for,
)

pytestmark = requires_root

DAEMON_UID = 1  # "daemon" in every Debian passwd
UNKNOWN_UID = 3_000_000_000  # no passwd entry, and above 2**31
SERVICE4 = ("127.0.0.1", 0)
SERVICE6 = ("::1", 0)


@pytest.fixture(params=["netlink", "procfs"])
def lookup_daemon(request, start_daemon):
    """Start a daemon with each lookup backend in turn; it must say which one it uses."""

    def start(config: str = "", **kwargs):
        daemon = start_daemon(f'[lookup]\nbackend = "{request.param}"\n' + config, **kwargs)
        daemon.wait_log(rf"lookup backend: {request.param}$")
        return daemon

    return start


def test_ipv4_owner(lookup_daemon) -> None:
    """An IPv4 connection is answered with its owner's login name and OS UNIX."""
    daemon = lookup_daemon()
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1") as conn:
        reply = daemon.ask(conn.query)
    assert reply == b"%d,%d:USERID:UNIX:daemon\r\n" % (conn.local[1], conn.remote[1])
    daemon.wait_log(
        rf"query={conn.local[1]},{conn.remote[1]} owner=daemon\(uid=1\) reply=USERID:UNIX:daemon rule=default"
    )


def test_ipv6_owner(lookup_daemon) -> None:
    """An IPv6 connection, asked about over IPv6, is answered the same way."""
    daemon = lookup_daemon()
    with owned_connection(DAEMON_UID, SERVICE6, "::1", socket.AF_INET6) as conn:
        reply = daemon.ask(conn.query, listen="::1")
    assert reply == b"%d,%d:USERID:UNIX:daemon\r\n" % (conn.local[1], conn.remote[1])


def test_ipv4_peer_on_dual_stack_socket(lookup_daemon) -> None:
    """An IPv4 connection made by an IPv6 socket (::ffff:a.b.c.d in tcp6) is found."""
    daemon = lookup_daemon()
    with owned_connection(DAEMON_UID, SERVICE4, "::ffff:127.0.0.1", socket.AF_INET6) as conn:
        reply = daemon.ask(conn.query)
    assert reply.endswith(b":USERID:UNIX:daemon\r\n")


def test_unknown_uid_is_numeric_with_os_other(lookup_daemon) -> None:
    """A uid without a passwd entry (and above 2**31) is sent as a number with OS OTHER."""
    daemon = lookup_daemon()
    with owned_connection(UNKNOWN_UID, SERVICE4, "127.0.0.1") as conn:
        reply = daemon.ask(conn.query)
    assert reply == b"%d,%d:USERID:OTHER:3000000000\r\n" % (conn.local[1], conn.remote[1])


def test_unknown_uid_no_user_when_configured(start_daemon) -> None:
    """reply.unknown_uid = "no-user" answers NO-USER for a uid without a passwd entry."""
    daemon = start_daemon('[reply]\nunknown_uid = "no-user"\n')
    with owned_connection(UNKNOWN_UID, SERVICE4, "127.0.0.1") as conn:
        reply = daemon.ask(conn.query)
    assert reply.endswith(b":ERROR:NO-USER\r\n")


def test_query_from_another_host_is_no_user(lookup_daemon) -> None:
    """Host C asking about a connection between this host and host A gets NO-USER."""
    daemon = lookup_daemon()
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1") as conn:
        assert daemon.ask(conn.query).endswith(b":USERID:UNIX:daemon\r\n")
        reply = daemon.ask(conn.query, source="127.0.0.3")
    assert reply == b"%d,%d:ERROR:NO-USER\r\n" % (conn.local[1], conn.remote[1])


def test_query_on_another_local_address_is_no_user(lookup_daemon) -> None:
    """The local address is the one the query arrived on: another one does not match."""
    daemon = lookup_daemon(listen=("127.0.0.1:0", "127.0.0.2:0"))
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1") as conn:
        assert daemon.ask(conn.query, listen="127.0.0.1").endswith(b":USERID:UNIX:daemon\r\n")
        assert daemon.ask(conn.query, listen="127.0.0.2").endswith(b":ERROR:NO-USER\r\n")


@pytest.mark.parametrize("close_service_side", [False, True], ids=["fin-wait2", "time-wait"])
def test_closed_socket_is_no_user_never_root(lookup_daemon, close_service_side: bool) -> None:
    """A socket its owner closed (uid 0, inode 0 in /proc) is NO-USER, never root."""
    daemon = lookup_daemon()
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1", close_first=True) as conn:
        if close_service_side:
            assert conn.accepted.recv(1) == b""
            conn.accepted.close()
        reply = daemon.ask(conn.query)
    assert reply == b"%d,%d:ERROR:NO-USER\r\n" % (conn.local[1], conn.remote[1])
    daemon.wait_log(r"owner=-\(no process\) reply=ERROR:NO-USER rule=no-owner")


def test_no_connection_is_no_user(lookup_daemon) -> None:
    """A port pair with no connection at all is NO-USER."""
    assert lookup_daemon().ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n"


def test_inbound_connection_hidden_and_owner_logged(lookup_daemon) -> None:
    """A connection to a local listening port is HIDDEN-USER; the log keeps the real owner."""
    daemon = lookup_daemon()
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1") as conn:
        # Ask about the service's end: its local port has the listener (owned by root).
        reply = daemon.ask(b"%d,%d\r\n" % (conn.remote[1], conn.local[1]))
    assert reply == b"%d,%d:ERROR:HIDDEN-USER\r\n" % (conn.remote[1], conn.local[1])
    daemon.wait_log(r"owner=root\(uid=0\) reply=ERROR:HIDDEN-USER rule=reply.inbound")


def test_mask_errors(start_daemon) -> None:
    """mask_errors sends UNKNOWN-ERROR where NO-USER would go."""
    assert (
        start_daemon("[reply]\nmask_errors = true\n").ask(b"1,1\r\n")
        == b"1,1:ERROR:UNKNOWN-ERROR\r\n"
    )


def test_charset_and_os_tokens(start_daemon) -> None:
    """Configured OS and charset tokens appear in the reply."""
    daemon = start_daemon('[reply]\nos = "LINUX"\ncharset = "UTF-8"\n')
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1") as conn:
        assert daemon.ask(conn.query).endswith(b":USERID:LINUX,UTF-8:daemon\r\n")


def test_pipelined_queries_answered_in_order(start_daemon) -> None:
    """Several queries in one packet get one reply each, in order; a malformed line ends it."""
    daemon = start_daemon()
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1") as conn:
        q = conn.query.rstrip()
        reply = daemon.ask(q + b"\r\n1,1\n0,5\r\n 70000 , 1 \r\n" + q + b"\nhello\r\n2,2\r\n")
    lines = reply.split(b"\r\n")
    assert lines == [
        q + b":USERID:UNIX:daemon",
        b"1,1:ERROR:NO-USER",
        b"0,5:ERROR:INVALID-PORT",
        b"70000,1:ERROR:INVALID-PORT",
        q + b":USERID:UNIX:daemon",
        b"0,0:ERROR:INVALID-PORT",
        b"",
    ]


@pytest.mark.parametrize(
    "line",
    [
        b"hello\r\n",
        b"\r\n",
        b"+5,6\r\n",
        b"1_0,2\r\n",
        "\u0665,1\r\n".encode(),
        b"1,2,3\n",
        b"\x00\xff\r\n",
    ],
)
def test_malformed_line_gets_0_0_and_close(start_daemon, line: bytes) -> None:
    """A line that is no port pair gets 0,0:ERROR:INVALID-PORT, never an echo, then the close."""
    daemon = start_daemon()
    with daemon.connect() as sock:
        sock.sendall(line)  # no half-close: the daemon must close by itself
        assert read_all(sock) == b"0,0:ERROR:INVALID-PORT\r\n"


@pytest.mark.parametrize("size", [1001, 1 << 20])
def test_overlong_line_closed_without_reply(start_daemon, size: int) -> None:
    """More than 1000 bytes without an end of line: closed, no reply."""
    daemon = start_daemon()
    with daemon.connect() as sock:
        # closed while we were still sending: the point
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"1" * size)
        assert read_all(sock) == b""
    assert daemon.ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n"


@pytest.mark.parametrize(
    ("over_limit", "after"), [("close", b""), ("error", b"1,1:ERROR:UNKNOWN-ERROR\r\n")]
)
def test_max_queries_per_connection(start_daemon, over_limit: str, after: bytes) -> None:
    """After max_queries_per_connection replies the connection is closed; with over_limit
    "error" a query already sent past the cap is answered UNKNOWN-ERROR first."""
    daemon = start_daemon(
        f'[limits]\nmax_queries_per_connection = 3\nover_limit = "{over_limit}"\n'
    )
    with daemon.connect() as sock:
        sock.sendall(b"1,1\r\n" * 5)
        assert read_all(sock) == b"1,1:ERROR:NO-USER\r\n" * 3 + after
    with daemon.connect() as sock:  # exactly at the cap: closed without waiting
        sock.sendall(b"1,1\r\n" * 3)
        assert read_all(sock) == b"1,1:ERROR:NO-USER\r\n" * 3


def test_half_close_after_query(start_daemon) -> None:
    """A client that shuts down its sending side after the query still gets the reply."""
    assert start_daemon().ask(b"0,1\r\n") == b"0,1:ERROR:INVALID-PORT\r\n"


def test_each_reply_in_one_segment(start_daemon) -> None:
    """A reply arrives whole in one recv (libident fails on replies in pieces)."""
    daemon = start_daemon()
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1") as conn, daemon.connect() as sock:
        sock.sendall(conn.query)
        assert sock.recv(4096) == conn.query.rstrip() + b":USERID:UNIX:daemon\r\n"


def test_idle_timeout_restarts_after_each_reply(start_daemon) -> None:
    """The idle timer restarts with each reply, so a steady client outlives one timeout."""
    daemon = start_daemon("[limits]\nidle_timeout = 3\n")
    with daemon.connect() as sock:
        for _ in range(3):
            sock.sendall(b"0,1\r\n")
            assert read_line(sock) == b"0,1:ERROR:INVALID-PORT\r\n"
            time.sleep(2)
        # 6 s after connecting, twice the timeout: still served, because of the replies.
        sock.sendall(b"0,2\r\n")
        assert read_line(sock) == b"0,2:ERROR:INVALID-PORT\r\n"


def test_silent_and_dripping_clients_closed_at_idle_timeout(start_daemon) -> None:
    """A client that sends nothing, or drips bytes without a full line, is closed at the timeout."""
    daemon = start_daemon("[limits]\nidle_timeout = 2\n")
    with daemon.connect() as silent, daemon.connect() as drip:
        start = time.monotonic()
        closed_after = None
        for byte in b"1" * 40:
            try:
                drip.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            drip.settimeout(0.25)
            try:
                if drip.recv(1) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                pass
        silent.settimeout(IO_TIMEOUT)
        assert silent.recv(1) == b""
    # Closed after the 2 s timeout although a byte came every 0.25 s, long before 10 s.
    assert closed_after is not None and 1.5 < closed_after < 10
    daemon.wait_log(r"closing 127\.0\.0\.1:\d+: idle for 2s")


def test_client_that_never_reads_is_not_read_and_is_closed(start_daemon) -> None:
    """A client that pipelines queries and never reads stops being read (the kernel holds its
    queries unread); the daemon's memory stays bounded; others are served; it is closed at the
    idle timeout."""
    daemon = start_daemon("[limits]\nidle_timeout = 3\nmax_queries_per_connection = 10000\n")
    rss_before = int(proc_status(daemon.pid)["VmRSS"].split()[0])
    query, reply = b"0,1\r\n", b"0,1:ERROR:INVALID-PORT\r\n"  # answered without a lookup
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(daemon.addresses["127.0.0.1"])
    sock.sendall(query * 10000)
    port = sock.getsockname()[1]
    daemon_port = daemon.addresses["127.0.0.1"][1]

    def unread_and_settled() -> int | None:
        first = receive_queue(daemon_port, port)
        time.sleep(0.3)
        second = receive_queue(daemon_port, port)
        return second if first == second and second else None

    unread = wait_for(unread_and_settled, IO_TIMEOUT)
    assert unread > 1000 * len(query)  # thousands of queries the daemon chose not to read
    assert daemon.ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n"  # others are served meanwhile
    rss_after = int(proc_status(daemon.pid)["VmRSS"].split()[0])
    assert rss_after - rss_before < 1024  # KiB
    # Still not reading: the daemon gives up on it at the idle timeout.
    daemon.wait_log(rf"closing 127\.0\.0\.1:{port}: idle for 3s", timeout=10)
    received = read_all(sock)  # what the kernel held for us, then the close (or reset)
    sock.close()
    assert 0 < len(received) < 10000 * len(reply)


def test_global_connection_cap(start_daemon) -> None:
    """Past max_connections, new connections are closed at once (over_limit "close"); a
    freed slot is usable."""
    daemon = start_daemon(
        '[limits]\nmax_connections = 3\nper_client_connections = 10\nover_limit = "close"\n'
    )
    held = [daemon.connect() for _ in range(3)]
    for sock in held:  # make sure the daemon has taken all three
        sock.sendall(b"0,1\r\n")
        assert read_line(sock) == b"0,1:ERROR:INVALID-PORT\r\n"
    with daemon.connect() as extra:
        assert read_all(extra) == b""
    daemon.wait_log(r"refused 1 connection\(s\) over limits.max_connections")
    held.pop().close()
    wait_for(lambda: daemon.ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n", IO_TIMEOUT)
    for sock in held:
        sock.close()


def test_connection_caps_with_over_limit_error(start_daemon) -> None:
    """With over_limit "error", a connection past max_connections has its query answered
    UNKNOWN-ERROR and is closed; it takes no slot from anyone. One past the client's
    per_client_connections that asks at once is answered, once, then closed."""
    daemon = start_daemon("[limits]\nmax_connections = 2\nper_client_connections = 1\n")
    held = daemon.connect()
    held.sendall(b"0,1\r\n")
    assert read_line(held) == b"0,1:ERROR:INVALID-PORT\r\n"
    # per client: the first query is answered for real, the second never
    assert daemon.ask(b"7,8\r\n9,9\r\n") == b"7,8:ERROR:NO-USER\r\n"
    other = daemon.connect(source="127.0.0.5")
    other.sendall(b"0,1\r\n")
    assert read_line(other) == b"0,1:ERROR:INVALID-PORT\r\n"
    assert daemon.ask(b"7,8\r\n", source="127.0.0.6") == b"7,8:ERROR:UNKNOWN-ERROR\r\n"
    daemon.wait_log(r"refused 1 connection\(s\) over limits.max_connections")
    held.close()
    other.close()
    wait_for(lambda: daemon.ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n", IO_TIMEOUT)


def test_per_client_connection_cap(start_daemon) -> None:
    """Past per_client_connections from one address, a connection that does not ask is
    closed at the first-query grace, and the refusal logged; the connections within the
    cap stay open; other clients are not affected."""
    daemon = start_daemon('[limits]\nper_client_connections = 2\nover_limit = "close"\n')
    held = [daemon.connect() for _ in range(2)]
    for sock in held:
        sock.sendall(b"0,1\r\n")
        assert read_line(sock) == b"0,1:ERROR:INVALID-PORT\r\n"
    with daemon.connect() as extra:
        assert read_all(extra) == b""  # closed, with nothing said
    daemon.wait_log(r"refused 1 connection\(s\) over limits.per_client_connections")
    assert daemon.ask(b"1,1\r\n", source="127.0.0.4") == b"1,1:ERROR:NO-USER\r\n"
    for sock in held:  # still served
        sock.sendall(b"0,2\r\n")
        assert read_line(sock) == b"0,2:ERROR:INVALID-PORT\r\n"
        sock.close()


def test_fd_exhaustion_pauses_instead_of_spinning(start_daemon) -> None:
    """When accept() fails with EMFILE the daemon pauses, then serves again once fds free up."""
    limit = 24

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    daemon = start_daemon(
        "[limits]\nmax_connections = 1000\nper_client_connections = 1000\n", preexec_fn=low_fd_limit
    )
    clients = [daemon.connect() for _ in range(limit + 10)]
    daemon.wait_log(r"cannot accept: Too many open files; not accepting for 1s")
    cpu_before = cpu_ticks(daemon.pid)
    time.sleep(3)
    cpu_after = cpu_ticks(daemon.pid)
    pauses = len(re.findall("cannot accept", daemon.log()))
    # A busy loop would log thousands of times and burn ~3 s of CPU (300 ticks).
    assert pauses <= 6
    assert cpu_after - cpu_before < 100
    for sock in clients:
        sock.close()
    wait_for(lambda: daemon.ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n", 10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_clean_stop(start_daemon, signum: int) -> None:
    """SIGTERM and SIGINT stop the daemon cleanly, with exit status 0."""
    daemon = start_daemon()
    with daemon.connect():
        assert daemon.stop(signum) == 0
    assert f"stopping on {signal.Signals(signum).name}" in daemon.log()


def test_sighup_reload_good_then_bad(start_daemon) -> None:
    """SIGHUP applies a good file, and keeps serving the old config when the new one is bad."""
    daemon = start_daemon()
    with owned_connection(UNKNOWN_UID, SERVICE4, "127.0.0.1") as conn:
        assert daemon.ask(conn.query).endswith(b":USERID:OTHER:3000000000\r\n")
        daemon.reload('[reply]\nunknown_uid = "no-user"\n')
        daemon.wait_log("configuration reloaded")
        assert daemon.ask(conn.query).endswith(b":ERROR:NO-USER\r\n")
        daemon.reload('[reply]\nunknown_uid = "numeric"\nmask_errors = "yes"\n')
        daemon.wait_log(
            r"reload failed, keeping the current configuration: .*reply.mask_errors: must be true or false"
        )
        assert daemon.ask(conn.query).endswith(b":ERROR:NO-USER\r\n")
        daemon.reload("[reply\n")
        daemon.wait_log(r"reload failed, .*not valid TOML")
        assert daemon.ask(conn.query).endswith(b":ERROR:NO-USER\r\n")
    assert daemon.process.poll() is None


def test_reload_of_server_section_waits_for_restart(start_daemon) -> None:
    """A changed [server] section is reported, not applied, on reload (root is gone by then)."""
    daemon = start_daemon()
    daemon.reload('[server]\nuser = "daemon"\n')
    daemon.wait_log(r"\[server\] settings take effect at the next start")
    daemon.reload('[server]\nuser = "daemon"\n')  # still not applied: still said
    wait_for(lambda: daemon.log().count("take effect at the next start") == 2, IO_TIMEOUT)
    assert daemon.ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n"
    assert set(proc_status(daemon.pid)["Uid"].split()) == {"65534"}


def test_privileges_dropped(lookup_daemon) -> None:
    """Started as root, the daemon runs as nobody: no uid or gid 0, no groups, no capabilities."""
    daemon = lookup_daemon()
    status = proc_status(daemon.pid)
    assert set(status["Uid"].split()) == {"65534"}
    assert set(status["Gid"].split()) == {"65534"}
    assert status["Groups"] == ""
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    daemon.wait_log(r"dropped privileges to user nobody \(uid 65534\)")
    # and lookups still work after the drop
    with owned_connection(DAEMON_UID, SERVICE4, "127.0.0.1") as conn:
        assert daemon.ask(conn.query).endswith(b":USERID:UNIX:daemon\r\n")


def test_drop_to_configured_user_and_group(start_daemon) -> None:
    """server.user and server.group choose the account the daemon runs as."""
    daemon = start_daemon('[server]\nuser = "daemon"\ngroup = "nogroup"\n')
    status = proc_status(daemon.pid)
    assert set(status["Uid"].split()) == {"1"} and set(status["Gid"].split()) == {"65534"}


def test_resources_return_after_clients_leave(start_daemon) -> None:
    """Open files go back to where they were once clients are gone."""
    daemon = start_daemon()
    baseline = open_fds(daemon.pid)
    clients = [daemon.connect() for _ in range(6)]
    for sock in clients:
        sock.sendall(b"1,1\r\n")
        assert read_line(sock) == b"1,1:ERROR:NO-USER\r\n"
    assert open_fds(daemon.pid) == baseline + 6
    for sock in clients:
        sock.close()
    wait_for(lambda: open_fds(daemon.pid) == baseline, IO_TIMEOUT)


def test_sequential_one_query_connections_are_never_refused(start_daemon) -> None:
    """A client that opens one connection at a time, asks once, reads the reply and
    closes, as fast as it can (an IRC server in a reconnection wave): 2,000 of them from
    one address, rate limit off, are 2,000 right answers. It never has more than one
    connection open, so the cap of 8 must never refuse it (closed connections counted
    against it until the loop read their end: up to 1,608 of 2,000 were refused)."""
    daemon = start_daemon("[limits]\nper_client_rate = 0\n")
    with owned_connection(1, SERVICE4, "127.0.0.1") as conn:
        expected = b"%d,%d:USERID:UNIX:daemon\r\n" % (conn.local[1], conn.remote[1])
        right = 0
        for _ in range(2000):
            with daemon.connect() as sock:
                sock.sendall(conn.query)
                right += read_line(sock) == expected
    assert right == 2000
    assert "refused" not in daemon.log()


def test_accepted_connections_have_the_bounded_send_buffer(start_daemon) -> None:
    """Each client connection's kernel send buffer is SEND_BUFFER (set once on the
    listener, which accepted connections inherit), not the megabytes loopback autotuning
    would grow for a client that never reads: ss(8) shows the server end's skmem tb."""
    import re
    import shutil
    import subprocess

    from harness import need

    from procident.connection import SEND_BUFFER

    ss = need("ss")
    assert shutil.which(ss)
    daemon = start_daemon()
    host, port = daemon.addresses["127.0.0.1"]
    with socket.create_connection((host, port)) as client:
        client_port = client.getsockname()[1]
        shown = wait_for(
            lambda: re.search(
                r"tb(\d+)",
                subprocess.run(
                    [
                        ss,
                        "-tmnH",
                        "state",
                        "established",
                        f"( sport = :{port} and dport = :{client_port} )",
                    ],
                    capture_output=True,
                    text=True,
                ).stdout,
            ),
            5,
        )
    assert int(shown[1]) == 2 * SEND_BUFFER  # the kernel doubles what it is given
