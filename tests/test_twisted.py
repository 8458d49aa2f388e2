"""procident.twisted, the drop-in for twisted.protocols.ident (issue 17): Twisted's own
test module passes against it, and real reactors over loopback TCP (bytes) get
procident's reader, validator and kernel lookup."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires_root
from harness import USER_UID, owned_connection, read_all

try:
    import twisted  # noqa: F401
except ImportError:  # procident[test] installs it: under CI its absence is a failure
    if os.environ.get("CI"):
        raise
    pytest.skip("procident[twisted] is not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
PEER = Path(__file__).with_name("twisted_peer.py")
EXAMPLE = REPO / "examples" / "twisted_ident.py"
ENV = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def test_twisteds_own_test_module_passes_with_one_import_line_changed(tmp_path: Path) -> None:
    """twisted/test/test_ident.py of the installed Twisted, unmodified but for the line
    that imports the module under test, passes under trial (13 tests: str lines in and
    out, the error classes, the /proc hooks)."""
    spec = importlib.util.find_spec("twisted.test.test_ident")
    assert spec is not None and spec.origin is not None
    original = Path(spec.origin).read_text()
    changed = original.replace(
        "from twisted.protocols import ident\n", "from procident import twisted as ident\n"
    )
    assert [
        a for a, b in zip(original.splitlines(), changed.splitlines(), strict=True) if a != b
    ] == ["from twisted.protocols import ident"]
    (tmp_path / "test_ident_procident.py").write_text(changed)
    ran = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "test_ident_procident"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert re.search(r"PASSED \(successes=1[0-9]\)", ran.stdout), ran.stdout


class Peer:
    """A Twisted program of tests/twisted_peer.py or the example, serving on loopback."""

    def __init__(self, args: list[str], preexec_fn=None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
            text=True,
            preexec_fn=preexec_fn,
        )
        assert self.process.stdout is not None
        self.lines = []
        first = self.process.stdout.readline()
        assert first, self.process.communicate(timeout=10)
        self.lines.append(first)

    def port(self, index: int = 0) -> int:
        while len(self.lines) <= index:
            assert self.process.stdout is not None
            self.lines.append(self.process.stdout.readline())
        return int(self.lines[index].rsplit(":", 1)[-1])

    def stop(self) -> str:
        """End it (by its pid) and return what it logged."""
        self.process.terminate()
        _, err = self.process.communicate(timeout=10)
        return err


@pytest.fixture
def peer() -> Iterator[type[Peer]]:
    started: list[Peer] = []

    class Started(Peer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    yield Started
    for one in started:
        if one.process.poll() is None:
            one.stop()


def _ask(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send `data` in one write and read until the server closes or is quiet for 2 s."""
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def test_replies_on_a_real_connection_in_order_whatever_the_deferreds(peer) -> None:
    """Several queries in one write: each answered, in the order asked, though the
    first one's Deferred fires last; bytes in, bytes out, compact form."""
    server = peer([str(PEER), "server", "procident"])
    replies = _ask(server.port(), b"2,9\r\n1,9\r\n3 , 9\n8,9\r\n")
    assert replies == (
        b"2,9:USERID:UNIX:later\r\n1,9:USERID:UNIX:alice\r\n"
        b"3,9:ERROR:HIDDEN-USER\r\n8,9:ERROR:NO-USER\r\n"
    )


def test_twisteds_own_module_gives_no_reply_on_a_real_connection(peer) -> None:
    """Why procident.twisted exists: the same server on twisted.protocols.ident, over a
    real connection, answers nothing (bytes meet str: TypeError)."""
    server = peer([str(PEER), "server", "twisted"])
    assert _ask(server.port(), b"1,9\r\n") == b""
    assert "TypeError" in server.stop()


def test_what_lookup_gets_wrong_is_unknown_error_and_logged_once(peer) -> None:
    """An exception (raised, or a failing Deferred) is UNKNOWN-ERROR and one log entry
    with its traceback; a reply that must not reach the wire (CR LF in the id) and a
    return value that is no reply are UNKNOWN-ERROR, logged."""
    server = peer([str(PEER), "server", "procident"])
    replies = _ask(server.port(), b"4,9\r\n6,9\r\n5,9\r\n7,9\r\n1,9\r\n")
    assert replies == (
        b"4,9:ERROR:UNKNOWN-ERROR\r\n6,9:ERROR:UNKNOWN-ERROR\r\n"
        b"5,9:ERROR:UNKNOWN-ERROR\r\n7,9:ERROR:UNKNOWN-ERROR\r\n1,9:USERID:UNIX:alice\r\n"
    )
    logged = server.stop()
    assert logged.count("RuntimeError: boom") == 1, logged
    assert logged.count("ZeroDivisionError: by zero") == 1, logged
    assert logged.count("Traceback") == 2, logged
    assert (
        "lookup returned a reply that cannot be sent: the user id contains the control character CR"
        in logged
    )
    assert "lookup returned 42, not (system name, user id)" in logged
    assert "evil\r\nline" not in logged


@pytest.mark.parametrize(
    "data, replies, closed",
    [
        (
            b"0,5\r\n99999,1\r\n1,9\r\n",
            b"0,5:ERROR:INVALID-PORT\r\n99999,1:ERROR:INVALID-PORT\r\n1,9:USERID:UNIX:alice\r\n",
            False,
        ),
        (
            b"1,9\r\nhello, \x1b[2Jworld\r\n1,9\r\n",
            b"1,9:USERID:UNIX:alice\r\n0,0:ERROR:INVALID-PORT\r\n",
            True,
        ),
        (b"+5,1\r\n", b"0,0:ERROR:INVALID-PORT\r\n", True),
        (
            b"\xd9\xa5,1\r\n",
            b"0,0:ERROR:INVALID-PORT\r\n",
            True,
        ),  # Arabic-Indic five: int() takes it
        (b"1," + b" " * 1001 + b"9\r\n", b"", True),
        (b"1" * 1002, b"", True),
    ],
    ids=[
        "invalid ports",
        "garbage",
        "sign",
        "non-ascii digit",
        "overlong line",
        "overlong, no end",
    ],
)
def test_procidents_reader_on_a_real_connection(
    peer, data: bytes, replies: bytes, closed: bool
) -> None:
    server = peer([str(PEER), "server", "procident"])
    with socket.create_connection(("127.0.0.1", server.port()), timeout=5) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < len(replies):
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        assert got == replies
        if closed:
            sock.settimeout(5)
            assert sock.recv(100) == b""  # the server closed it
        else:
            sock.sendall(b"1,9\r\n")
            assert sock.recv(100) == b"1,9:USERID:UNIX:alice\r\n"


# -- ProcServerMixin, with connections owned by real uids -----------------------------


@requires_root
@pytest.mark.parametrize("family", ["IPv4", "IPv6", "IPv4-mapped"])
def test_proc_server_mixin_names_the_owner_from_the_kernel(peer, accounts, family: str) -> None:
    """examples/twisted_ident.py (ProcServerMixin in an IdentServer) names pidtest's
    connection over IPv4, IPv6, and IPv4 asked on a dual-stack socket; a connection its
    owner closed is NO-USER, never root."""
    listen, host, source, sock_family = {
        "IPv4": ("127.0.0.1:0", "127.0.0.1", "127.0.0.1", socket.AF_INET),
        "IPv6": ("[::1]:0", "::1", "::1", socket.AF_INET6),
        "IPv4-mapped": ("[::]:0", "127.0.0.1", "127.0.0.1", socket.AF_INET),
    }[family]
    server = peer([str(EXAMPLE), "--listen", listen], preexec_fn=accounts)
    port = server.port()
    with owned_connection(USER_UID, (host, 0), source, sock_family) as conn:
        reply = _ask(port, conn.query, host)
    assert reply == b"%d,%d:USERID:UNIX:pidtest\r\n" % (conn.local[1], conn.remote[1])
    with owned_connection(USER_UID, (host, 0), source, sock_family, close_first=True) as gone:
        reply = _ask(port, gone.query, host)
    assert reply == b"%d,%d:ERROR:NO-USER\r\n" % (gone.local[1], gone.remote[1])


@requires_root
def test_proc_server_mixin_hides_root_and_hooks_still_apply(peer, accounts) -> None:
    """The example's getUsername hook hides root's connection; a query about a connection
    to another remote port is NO-USER (all four values must match)."""
    server = peer([str(EXAMPLE), "--listen", "127.0.0.1:0"], preexec_fn=accounts)
    with owned_connection(0, ("127.0.0.1", 0), "127.0.0.1") as roots:
        assert _ask(server.port(), roots.query) == b"%d,%d:ERROR:HIDDEN-USER\r\n" % (
            roots.local[1],
            roots.remote[1],
        )
    with owned_connection(USER_UID, ("127.0.0.1", 0), "127.0.0.1") as conn:
        other = b"%d,%d\r\n" % (conn.local[1], conn.remote[1] + 1)
        assert _ask(server.port(), other).endswith(b":ERROR:NO-USER\r\n")


# -- IdentClient, against procident's own daemon --------------------------------------


@requires_root
def test_ident_client_asks_procidents_daemon(start_daemon, accounts) -> None:
    """Three queries at once through one IdentClient: pidtest's connection, root's
    (hidden) and one that does not exist, each with its own result or error class."""
    daemon = start_daemon(preexec_fn=accounts)
    host, port = daemon.addresses["127.0.0.1"]
    with (
        owned_connection(USER_UID, ("127.0.0.1", 0), "127.0.0.1") as mine,
        owned_connection(0, ("127.0.0.1", 0), "127.0.0.1") as roots,
    ):
        # The client asks from 127.0.0.1, the remote end of both connections.
        ran = subprocess.run(
            [sys.executable, str(PEER), "client", host, str(port)]
            + [f"{c.local[1]},{c.remote[1]}" for c in (mine, roots)]
            + ["1,1"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert ran.stdout.splitlines() == [
        "('UNIX', 'pidtest')",
        "HiddenUser: HIDDEN-USER",
        "NoUser: NO-USER",
    ], ran.stdout + ran.stderr


def test_ident_client_fails_pending_queries_when_the_connection_is_lost() -> None:
    """A server that reads the query and hangs up: the pending lookup fails with
    IdentError, and the program goes on."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = subprocess.Popen(
        [
            sys.executable,
            str(PEER),
            "client",
            "127.0.0.1",
            str(listener.getsockname()[1]),
            "5,6",
            "7,8",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.settimeout(10)
    conn, _ = listener.accept()
    conn.settimeout(10)
    assert conn.recv(100) == b"5, 6\r\n"  # one query at a time
    conn.close()
    listener.close()
    out, err = client.communicate(timeout=30)
    assert out.splitlines() == ["IdentError: UNKNOWN-ERROR", "IdentError: UNKNOWN-ERROR"], out + err


def test_entries_of_a_dual_stack_socket_match_its_ipv4_connection() -> None:
    """A subclass whose entries() also yields /proc/net/tcp6 lines: a dual-stack
    socket's IPv4 connection is listed there with ::ffff: addresses, and is found for
    the IPv4 query (the kernel lookup finds no such made-up connection first); a
    closed one (inode 0) is NoUser, never uid 0's name."""
    import ipaddress as ip

    from procident import twisted as ident
    from procident.lookup.procfs import _hex

    def line(inode: int, uid: int) -> str:
        local = _hex(ip.ip_address("::ffff:192.0.2.1"), 25, sys.byteorder)
        remote = _hex(ip.ip_address("::ffff:198.51.100.7"), 762, sys.byteorder)
        return f"0: {local} {remote} 01 00000000:00000000 00:00000000 00000000 {uid} 0 {inode} 1"

    class Listed(ident.ProcServerMixin):
        lines = [line(4242, 1000)]

        def entries(self):
            return iter(self.lines)

        def getUsername(self, uid: int) -> str:
            return f"user{uid}"

    server = Listed()
    assert server.lookup(("192.0.2.1", 25), ("198.51.100.7", 762)) == ("LINUX", "user1000")
    with pytest.raises(ident.NoUser):
        server.lookup(("192.0.2.1", 25), ("198.51.100.7", 763))
    server.lines = [line(0, 0)]
    with pytest.raises(ident.NoUser):
        server.lookup(("192.0.2.1", 25), ("198.51.100.7", 762))
