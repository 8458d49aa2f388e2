"""NAT end to end: real masquerading between network namespaces the tests create.

outer (198.51.100.7) -- gateway -- inner host, each its own network namespace, the
gateway masquerading with iptables; procident runs on the gateway and on the inner host
as it would in production (root, then nobody). A user on the inner host connects out
to the outer host's port 6667; the outer host asks the gateway's port 113 about the
port pair it sees, and the tests check what comes back and who was asked what.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import requires_root
from harness import IO_TIMEOUT, Daemon, owned_connection, read_line
from netns import Chain, Host, inside, missing_tools, setns

SERVICE_PORT = 6667
USER = pwd.getpwnam("daemon")  # a real account: the inner host answers with its name

pytestmark = requires_root


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    missing = missing_tools()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing; .ci/run should install them")
        pytest.skip(f"needs {', '.join(missing)} (iproute2, iptables, conntrack)")


def family_of(version: int) -> socket.AddressFamily:
    return socket.AF_INET6 if version == 6 else socket.AF_INET


@dataclass
class Connection:
    """The inner user's connection, as each end sees it."""

    inner_port: int  # the inner host's port
    outer_port: int  # the port the outer host sees (the gateway's, after NAT)
    accepted: socket.socket


class Lab:
    """A Chain with procident daemons in it; everything stops at the end of the test."""

    def __init__(self, chain: Chain, workdir: Path, stack: ExitStack) -> None:
        self.chain = chain
        self.workdir = workdir
        self.stack = stack

    def start(self, host: Host, config: str, listen=("0.0.0.0:113", "[::]:113")) -> Daemon:
        """procident serve inside `host`'s namespace, on port 113 there."""
        directory = self.workdir / host.name
        directory.mkdir(exist_ok=True)
        daemon = Daemon(
            directory,
            config,
            tuple(listen),
            preexec_fn=lambda: setns(f"/run/netns/{host.name}"),
        )
        self.stack.callback(daemon.stop)
        return daemon

    def connect_out(
        self, version: int = 4, uid: int = USER.pw_uid, host: Host | None = None, source: str = ""
    ) -> Connection:
        """A connection from the inner host (or `host`, from `source`) to the outer
        service, made by a child that is `uid`; it stays open until the test ends."""
        host = host or self.chain.inner
        service = (self.chain.outer.down[version], SERVICE_PORT)
        with inside(self.chain.outer.name):  # the service listens in the outer host
            made = owned_connection(
                uid,
                service,
                source or ("::" if version == 6 else "0.0.0.0"),
                family_of(version),
                netns=f"/run/netns/{host.name}",
            )
            conn = self.stack.enter_context(made)
        return Connection(conn.local[1], conn.accepted.getpeername()[1], conn.accepted)

    def ask(
        self, from_host: Host, to: str, server_port: int, client_port: int, source: str = ""
    ) -> bytes:
        """Ask the ident server at `to` port 113 from `from_host`; the reply line."""
        with inside(from_host.name):
            sock = socket.socket(socket.AF_INET6 if ":" in to else socket.AF_INET)
        with sock:
            sock.settimeout(IO_TIMEOUT * 2)
            if source:
                sock.bind((source, 0))
            sock.connect((to, 113))
            sock.sendall(b"%d,%d\r\n" % (server_port, client_port))
            return read_line(sock)

    def ask_gateway(self, conn: Connection, version: int = 4) -> bytes:
        """What the outer host gets when it asks the (first) gateway about `conn`."""
        gateway = self.chain.gateways[0].up[version]
        return self.ask(self.chain.outer, gateway, conn.outer_port, SERVICE_PORT)


@contextmanager
def lab(workdir: Path, gateways: int = 1) -> Iterator[Lab]:
    chain = Chain(gateways)
    try:
        with ExitStack() as stack:
            yield Lab(chain, workdir, stack)
    finally:
        chain.remove()


@pytest.fixture
def net(workdir: Path) -> Iterator[Lab]:
    with lab(workdir) as it:
        yield it


def gateway_config(extra: str = "") -> str:
    return f"[nat]\nenabled = true\n{extra}\n"


def inner_config(lab: Lab, gateways: str = "") -> str:
    if not gateways:
        host = lab.chain.hosts[-2]  # the gateway in front of the inner host
        gateways = f'"{host.down[4]}", "{host.down[6]}"'
    return f"[nat]\ngateways = [{gateways}]\n"


GUEST_MAP = """
[[nat.map]]
hosts = ["10.0.0.0/8", "fd00::/8"]
reply = "guest"
os = "UNIX"
"""


def user_reply(conn: Connection, user_id: str = USER.pw_name, opsys: str = "UNIX") -> bytes:
    return b"%d,%d:USERID:%s:%s\r\n" % (
        conn.outer_port,
        SERVICE_PORT,
        opsys.encode(),
        user_id.encode(),
    )


def error_reply(conn: Connection, error: str) -> bytes:
    return b"%d,%d:ERROR:%s\r\n" % (conn.outer_port, SERVICE_PORT, error.encode())


# -- the cases ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_forwarded_answer(net: Lab, version: int) -> None:
    """The gateway finds the inner connection in its conntrack table, asks the inner
    host's procident about the inner port pair, and answers with the outer pair."""
    gateway = net.start(net.chain.gateways[0], gateway_config())
    inner = net.start(net.chain.inner, inner_config(net))
    conn = net.connect_out(version)
    # The premise: the gateway really translates this connection.
    table = net.chain.conntrack(net.chain.gateways[0])
    assert f"src={net.chain.inner.up[version]} " in table
    assert f"dport={conn.outer_port} " in table
    assert net.ask_gateway(conn, version) == user_reply(conn)
    asked = net.chain.gateways[0].down[version]
    inner.wait_log(
        rf"answer client={asked} query={conn.inner_port},{SERVICE_PORT} "
        rf"owner={USER.pw_name}\(uid={USER.pw_uid}\) reply=USERID:UNIX:{USER.pw_name}"
    )
    inner_at = net.chain.inner.up[version]
    inner_at = re.escape(f"[{inner_at}]" if version == 6 else inner_at)
    gateway.wait_log(
        rf"query={conn.outer_port},{SERVICE_PORT} owner=- reply=USERID:UNIX:{USER.pw_name} "
        rf"rule=nat forward {inner_at}:113 {conn.inner_port},{SERVICE_PORT}: answered"
    )


def test_static_map(net: Lab) -> None:
    """order = "map": an inner host the map lists gets the map's answer; its own ident
    daemon is never asked."""
    gateway = net.start(net.chain.gateways[0], gateway_config('order = "map"' + GUEST_MAP))
    inner = net.start(net.chain.inner, inner_config(net))
    conn = net.connect_out()
    assert net.ask_gateway(conn) == user_reply(conn, "guest")
    gateway.wait_log(r"reply=USERID:UNIX:guest rule=nat nat.map\[0\]")
    assert "answer client=" not in inner.log()


def test_map_only_without_forwarding(net: Lab) -> None:
    """forward = false: the map answers; an inner host it does not list gets UNKNOWN-ERROR."""
    other_map = '[[nat.map]]\nhosts = ["192.168.0.0/16"]\naction = "hide"\n'
    net.start(net.chain.gateways[0], gateway_config("forward = false\n" + other_map))
    net.start(net.chain.inner, inner_config(net))
    conn = net.connect_out()
    assert net.ask_gateway(conn) == error_reply(conn, "UNKNOWN-ERROR")


@pytest.mark.parametrize("mapped", [True, False])
def test_inner_daemon_down(net: Lab, mapped: bool) -> None:
    """No ident daemon on the inner host: the connection is refused, and the map answers,
    or UNKNOWN-ERROR without a map entry."""
    gateway = net.start(net.chain.gateways[0], gateway_config(GUEST_MAP if mapped else ""))
    conn = net.connect_out()
    expected = user_reply(conn, "guest") if mapped else error_reply(conn, "UNKNOWN-ERROR")
    assert net.ask_gateway(conn) == expected
    fallback = r"nat.map\[0\]" if mapped else "no map entry"
    gateway.wait_log(rf"rule=nat forward .*: cannot connect: Connection refused; {fallback}")


def fake_inner_server(lab: Lab) -> socket.socket:
    """A listener on the inner host's port 113 that the test drives itself."""
    with inside(lab.chain.inner.name):
        listener = socket.socket(socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((lab.chain.inner.up[4], 113))
        listener.listen(4)
    lab.stack.callback(listener.close)
    return listener


def test_inner_daemon_slow(net: Lab) -> None:
    """An inner ident server that accepts and never answers: the gateway gives up at
    [forward] timeout and answers from the map; meanwhile it goes on serving others."""
    gateway = net.start(
        net.chain.gateways[0], gateway_config(GUEST_MAP) + "[forward]\ntimeout = 2\n"
    )
    silent = fake_inner_server(net)
    conn = net.connect_out()
    outer = net.chain.gateways[0].up[4]
    with inside(net.chain.outer.name):
        waiting = socket.create_connection((outer, 113), IO_TIMEOUT)
    with waiting:
        waiting.sendall(b"%d,%d\r\n" % (conn.outer_port, SERVICE_PORT))
        asked, _ = silent.accept()  # it was asked, and keeps silent
        with asked:
            asked.settimeout(IO_TIMEOUT)
            assert asked.recv(100) == b"%d,%d\r\n" % (conn.inner_port, SERVICE_PORT)
            # While that forward is out, another client is answered at once...
            other = net.ask(net.chain.outer, outer, 1, 1)
            assert other == b"1,1:ERROR:NO-USER\r\n"
            # ...and the first is still waiting.
            waiting.setblocking(False)
            with pytest.raises(BlockingIOError):
                waiting.recv(100)
            waiting.settimeout(IO_TIMEOUT)
            assert read_line(waiting) == user_reply(conn, "guest")
    gateway.wait_log(r"rule=nat forward .*: no answer in 2s; nat.map\[0\]")


GARBAGE = [
    b"not an ident reply\r\n",
    b"%(other)d,%(server)d:USERID:UNIX:mallory\r\n",  # about another port pair
    b"%(inner)d,%(server)d:USERID:UNIX:a\x00b\r\n",  # NUL in the id
    b"%(inner)d,%(server)d:USERID:UNIX:\r\n",  # an empty id
    b"%(inner)d,%(server)d:USERID:UNIX:" + b"x" * 600 + b"\r\n",  # longer than a line
    b"%(inner)d,%(server)d:ERROR:X-SOMETHING\r\n",  # an error outside the RFC's four
    b"%(inner)d,%(server)d:USERID:UN IX:mallory\r\n",  # an OS token with a space
    b"%(inner)d,%(server)d:USERID:UNIX:mallory",  # closed without an end of line
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_inner_daemon_garbage(net: Lab, garbage: bytes) -> None:
    """Whatever the inner host sends that is not a valid reply about the port pair asked
    is not passed on: the map answers instead."""
    net.start(net.chain.gateways[0], gateway_config(GUEST_MAP))
    server = fake_inner_server(net)
    conn = net.connect_out()
    values = {b"inner": conn.inner_port, b"server": SERVICE_PORT, b"other": conn.inner_port + 1}
    with inside(net.chain.outer.name):
        ident = socket.create_connection((net.chain.gateways[0].up[4], 113), IO_TIMEOUT)
    with ident:
        ident.sendall(b"%d,%d\r\n" % (conn.outer_port, SERVICE_PORT))
        asked, _ = server.accept()
        with asked:
            asked.settimeout(IO_TIMEOUT)
            assert asked.recv(100) == b"%d,%d\r\n" % (conn.inner_port, SERVICE_PORT)
            asked.sendall(garbage % values)
            asked.shutdown(socket.SHUT_WR)
            assert read_line(ident) == user_reply(conn, "guest")


def test_inner_errors_are_passed_on(net: Lab) -> None:
    """The inner host's own answer is its policy: its HIDDEN-USER reaches the outer host."""
    net.start(net.chain.gateways[0], gateway_config(GUEST_MAP))
    hide = f'[[rules]]\nusers = ["{USER.pw_name}"]\naction = "hide"\n'
    net.start(net.chain.inner, inner_config(net) + hide)
    conn = net.connect_out()
    assert net.ask_gateway(conn) == error_reply(conn, "HIDDEN-USER")


@pytest.mark.parametrize("version", [4, 6])
def test_chain_of_two_gateways(workdir: Path, version: int) -> None:
    """outer -- gw1 -- gw2 -- inner: gw1 asks gw2 (which trusts gw1), gw2 finds the
    connection in its own conntrack table and asks the inner host (which trusts gw2);
    the answer comes back out with each hop's port pair."""
    with lab(workdir, gateways=2) as net:
        gw1, gw2 = net.chain.gateways
        first = net.start(gw1, gateway_config())
        trusted = f'gateways = ["{gw1.down[4]}", "{gw1.down[6]}"]\n'
        second = net.start(gw2, gateway_config() + trusted)
        inner = net.start(net.chain.inner, inner_config(net))
        conn = net.connect_out(version)
        assert net.ask_gateway(conn, version) == user_reply(conn)

        def at(host: Host) -> str:
            address = host.up[version]
            return re.escape(f"[{address}]" if version == 6 else address)

        first.wait_log(
            rf"query={conn.outer_port},{SERVICE_PORT} .*rule=nat forward {at(gw2)}:113 .*: answered"
        )
        second.wait_log(
            rf"answer client={re.escape(gw1.down[version])} .*rule=nat forward "
            rf"{at(net.chain.inner)}:113 {conn.inner_port},{SERVICE_PORT}: answered"
        )
        inner.wait_log(
            rf"answer client={re.escape(gw2.down[version])} query={conn.inner_port},"
            rf"{SERVICE_PORT} owner={USER.pw_name}"
        )


def test_query_from_a_host_not_allowed(net: Lab) -> None:
    """The inner host answers a question about its connection to the outer host only
    for the gateway it trusts: the same question from another address on the same
    network gets NO-USER, and so does the gateway when it is not on the list."""
    gw = net.chain.gateways[0]
    net.chain.ip(gw, "-4", "addr", "add", "10.1.0.3/24", "dev", gw.down_link)
    inner = net.start(net.chain.inner, inner_config(net, gateways=f'"{gw.down[4]}/32"'))
    conn = net.connect_out()
    question = (net.chain.inner.up[4], conn.inner_port, SERVICE_PORT)
    stranger = net.ask(gw, *question, source="10.1.0.3")
    assert stranger == b"%d,%d:ERROR:NO-USER\r\n" % (conn.inner_port, SERVICE_PORT)
    trusted = net.ask(gw, *question, source=gw.down[4])
    assert trusted == b"%d,%d:USERID:UNIX:%s\r\n" % (
        conn.inner_port,
        SERVICE_PORT,
        USER.pw_name.encode(),
    )
    # The gateway, not trusted: its forward is answered NO-USER, which it passes on.
    inner.reload(inner_config(net, gateways='"10.1.0.3/32"'))
    inner.wait_log("configuration reloaded")
    net.start(gw, gateway_config())
    assert net.ask_gateway(conn) == error_reply(conn, "NO-USER")


def test_gateway_process_on_its_inner_address(net: Lab) -> None:
    """A process on the gateway bound to its inner address is masqueraded like the hosts
    behind it; its own socket is found by the inner tuple and answered by the gateway's
    policy, not forwarded to itself."""
    gateway = net.chain.gateways[0]
    daemon = net.start(gateway, gateway_config())
    conn = net.connect_out(host=gateway, source=gateway.down[4])
    # The premise: the connection is translated (its source was the inner address).
    table = net.chain.conntrack(gateway)
    assert f"src={gateway.down[4]} dst={net.chain.outer.down[4]} sport={conn.inner_port} " in table
    assert f"dst={gateway.up[4]} sport={SERVICE_PORT} dport={conn.outer_port} " in table
    assert net.ask_gateway(conn) == user_reply(conn)
    daemon.wait_log(
        rf"query={conn.outer_port},{SERVICE_PORT} owner={USER.pw_name}\(uid={USER.pw_uid}\) "
        rf"reply=USERID:UNIX:{USER.pw_name} rule=default"
    )


def test_lookup_explains_a_translated_connection(net: Lab) -> None:
    """`procident lookup` on the gateway shows the inner connection, the map entry that
    matched, and the reply."""
    gateway = net.chain.gateways[0]
    config = net.workdir / "gateway.toml"
    config.write_text(gateway_config('order = "map"' + GUEST_MAP))
    conn = net.connect_out()
    command = [
        "ip", "netns", "exec", gateway.name, sys.executable, "-m", "procident", "lookup",
        "--config", str(config),
        f"{gateway.up[4]}:{conn.outer_port}", f"{net.chain.outer.down[4]}:{SERVICE_PORT}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    inner = f"{net.chain.inner.up[4]}:{conn.inner_port}"
    assert f"policy:     translated: inner host's connection {inner} <-> " in result.stdout
    assert "policy:     nat.map[0]: matches" in result.stdout
    assert f"reply:      {conn.outer_port},{SERVICE_PORT}:USERID:UNIX:guest" in result.stdout


def test_reload_cannot_turn_nat_on(start_daemon) -> None:
    """The table is opened as root at start: a reload that turns NAT on is refused, with
    the key and the reason, and the old configuration keeps serving."""
    daemon = start_daemon("")
    daemon.reload("[nat]\nenabled = true\n")
    daemon.wait_log(
        r"reload failed, keeping the current configuration: .*nat.enabled: the "
        r"connection-tracking table is opened at start, as root; restart to turn NAT on"
    )
    assert daemon.ask(b"1,1\r\n").endswith(b"1,1:ERROR:NO-USER\r\n")
