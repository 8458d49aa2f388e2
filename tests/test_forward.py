"""Forwarding to an application's ident server, rate limits and access lists, in-process.

The application is a small ident server on loopback that answers, stalls, or
answers garbage; procident's loop runs step by step with a fake clock.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import tomllib
from conftest import DictBackend
from test_server import Clock, connect, pump, read_until_closed, received

from procident.config import Config, LimitsConfig, parse_config
from procident.lookup import ConnectionId, Endpoint, SocketEntry, TcpState
from procident.responder import Responder
from procident.server import Server, open_listeners

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
NAMES = {1000: "alice", 1001: "bob"}


class App:
    """An application's ident server: `answer(query line) -> reply bytes, or None to stall`."""

    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries: list[bytes] = []
        self.held: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.05)  # so close() is noticed
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            line = conn.makefile("rb").readline()
            self.queries.append(line)
            reply = self.answer(line)
            if reply is None:
                self.held.append(conn)  # stall: keep it open, say nothing
                continue
            conn.sendall(reply)
            conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def apps() -> Iterator[Callable[[Callable[[bytes], bytes | None]], App]]:
    made: list[App] = []

    def make(answer: Callable[[bytes], bytes | None]) -> App:
        made.append(App(answer))
        return made[-1]

    yield make
    for app in made:
        app.close()


def echo(text: str) -> Callable[[bytes], bytes]:
    """An answer for the query's own ports: `text` after "P,Q:"."""
    return lambda line: line.strip().replace(b" ", b"") + b":" + text.encode() + b"\r\n"


class Fixture:
    def __init__(self, config_text: str) -> None:
        self.config = parse_config(tomllib.loads(config_text))
        self.backend = DictBackend({})
        self.responder = Responder(self.backend, self.config, NAMES.get)
        self.clock = Clock()
        self.server = Server(
            self.config,
            self.responder,
            open_listeners((Endpoint(LOOPBACK, 0),)),
            clock=self.clock,
        )

    def own(self, server_port: int, client_port: int, uid: int = 1000) -> None:
        """Make the kernel (the dict) list a connection owned by `uid`."""
        local, remote = Endpoint(LOOPBACK, server_port), Endpoint(LOOPBACK, client_port)
        self.backend.table[ConnectionId(local, remote)] = SocketEntry(
            local, remote, TcpState.ESTABLISHED, uid, 4242
        )

    def ask(self, query: bytes, turns: int | None = None) -> tuple[socket.socket, bytes | None]:
        client = connect(self.server)
        client.send(query)
        return client, self.pump_until(client, turns)

    def pump_until(self, client: socket.socket, turns: int | None = None) -> bytes | None:
        """Pump until something arrives from the server (or it closes), for up to 5 s of a
        busy machine; with `turns`, exactly that many turns (to see that nothing comes)."""
        data: bytes | None = b""
        deadline = time.monotonic() + 5.0
        done = 0
        while turns is None or done < turns:
            pump(self.server, 1)
            done += 1
            data = received(client)
            if data or data is None:
                return data
            if turns is None and time.monotonic() > deadline:
                return data
            time.sleep(0.002)
        return data


@pytest.fixture
def make() -> Iterator[Callable[[str], Fixture]]:
    made: list[Fixture] = []

    def factory(text: str) -> Fixture:
        made.append(Fixture(text))
        return made[-1]

    yield factory
    for fixture in made:
        fixture.server.close()


def forwarding(app: App, extra: str = "") -> str:
    return f'[[rules]]\nusers = ["alice"]\naction = "forward"\nforward = "127.0.0.1:{app.port}"\n{extra}'


@pytest.mark.parametrize("irc_server", ["127.0.0.1", "127.0.0.5"])
def test_a_forward_answered_no_user_says_the_likely_cause(make, apps, caplog, irc_server) -> None:
    """The Lounge's identd answers only the IRC server itself, so a forward (from this
    host) hears NO-USER: where the IRC server is another address, the log says that such
    an application cannot be forwarded to, and what to use instead."""
    app = apps(echo("ERROR:NO-USER"))
    fixture = make(forwarding(app))
    remote = ipaddress.IPv4Address(irc_server)
    local, peer = Endpoint(LOOPBACK, 40001), Endpoint(remote, 6667)
    fixture.backend.table[ConnectionId(local, peer)] = SocketEntry(
        local, peer, TcpState.ESTABLISHED, 1000, 4242
    )
    client = socket.socket()
    client.bind((irc_server, 0))
    client.connect(fixture.server.listeners[0].getsockname())
    client.setblocking(False)
    with client, caplog.at_level(logging.INFO, logger="procident"):
        client.send(b"40001,6667\r\n")
        assert fixture.pump_until(client) == b"40001,6667:ERROR:NO-USER\r\n"
    hint = "cannot be forwarded to: use its oidentd file instead"
    assert (hint in caplog.text) == (irc_server != "127.0.0.1")


def test_forward_relays_the_applications_answer(make, apps, caplog) -> None:
    """The application is asked the same port pair; its id goes out (as OTHER, not a login
    name), and the log names the rule, the target and the real owner."""
    app = apps(echo("USERID:UNIX:bnc-alice"))
    fixture = make(forwarding(app))
    fixture.own(40001, 6667)
    with caplog.at_level(logging.INFO, logger="procident"):
        _, reply = fixture.ask(b"40001 , 6667\r\n")
    assert reply == b"40001,6667:USERID:OTHER:bnc-alice\r\n"
    assert app.queries == [b"40001,6667\r\n"]
    assert f"rule=rules[0] forward 127.0.0.1:{app.port}: answered" in caplog.text
    assert "owner=alice(uid=1000)" in caplog.text


def test_forward_relays_an_error(make, apps) -> None:
    """An RFC error from the application is passed on."""
    app = apps(echo("ERROR:HIDDEN-USER"))
    fixture = make(forwarding(app))
    fixture.own(40001, 6667)
    assert fixture.ask(b"40001,6667\r\n")[1] == b"40001,6667:ERROR:HIDDEN-USER\r\n"


@pytest.mark.parametrize(
    ("answer", "note"),
    [
        (lambda line: b"hello there\r\n", "answer not understood"),
        (lambda line: b"1,2:USERID:UNIX:mallory\r\n", "answer about another port pair"),
        (echo("USERID:UNIX:" + "x" * 513), "the user id is 513 octets long"),
        (echo("ERROR:X-SECRET"), "answer with an unknown error"),
        (lambda line: b"40001,6667:USERID:UNIX:no-end-of-line", "closed without a complete"),
        (lambda line: b"", "closed without a complete answer"),
        (lambda line: b"x" * 5000, "no end of line in 1000 bytes"),
    ],
)
def test_forward_garbage_is_unknown_error(make, apps, caplog, answer, note) -> None:
    """An answer that is not a valid reply about the same ports never reaches the client."""
    app = apps(answer)
    fixture = make(forwarding(app))
    fixture.own(40001, 6667)
    with caplog.at_level(logging.INFO, logger="procident"):
        reply = fixture.ask(b"40001,6667\r\n")[1]
    assert reply == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"
    assert note in caplog.text


class Port:
    def __init__(self, port: int) -> None:
        self.port = port


def test_forward_to_nobody_listening(make) -> None:
    """A refused connection is answered at once, UNKNOWN-ERROR."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        fixture = make(forwarding(Port(unused.getsockname()[1])))
    fixture.own(40001, 6667)
    assert fixture.ask(b"40001,6667\r\n")[1] == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"


def test_slow_application_times_out_without_stalling_others(make, apps, caplog) -> None:
    """While the application says nothing, other clients are served; at the forward
    timeout the waiting client gets UNKNOWN-ERROR and its forward socket is closed."""
    app = apps(lambda line: None)
    fixture = make(forwarding(app, "[forward]\ntimeout = 2\n"))
    fixture.own(40001, 6667)
    waiting, reply = fixture.ask(b"40001,6667\r\n", turns=10)
    assert reply == b""
    assert fixture.ask(b"1,1\r\n")[1] == b"1,1:ERROR:NO-USER\r\n"  # not stalled
    assert fixture.server.forwards_under_way == 1
    fixture.clock.now += 2
    with caplog.at_level(logging.INFO, logger="procident"):
        assert fixture.pump_until(waiting) == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"
    assert "no answer in 2s" in caplog.text
    assert not fixture.server.forwards_under_way


def test_replies_stay_in_query_order(make, apps) -> None:
    """Queries pipelined after a forwarded one are answered after it, in order."""
    app = apps(echo("USERID:UNIX:bnc"))
    fixture = make(forwarding(app, "[limits]\nper_client_rate = 0\n"))
    fixture.own(40001, 6667)
    client = connect(fixture.server)
    client.send(b"2,2\r\n40001,6667\r\n3,3\r\n")
    data = b""
    deadline = time.monotonic() + 5.0
    while data.count(b"\n") < 3 and time.monotonic() < deadline:
        pump(fixture.server, 1)
        data += received(client) or b""
    assert data == (b"2,2:ERROR:NO-USER\r\n40001,6667:USERID:OTHER:bnc\r\n3,3:ERROR:NO-USER\r\n")


def test_client_leaving_during_a_forward(make, apps) -> None:
    """A client that resets while its forward is out is closed at once, the forward too; one
    that closes (maybe half-closes) is answered, or closed, when the forward ends."""
    app = apps(lambda line: None)
    fixture = make(forwarding(app, "[forward]\ntimeout = 2\n"))
    fixture.own(40001, 6667)
    client, _ = fixture.ask(b"40001,6667\r\n", turns=10)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    pump(fixture.server, 20)
    assert not fixture.server.connections and not fixture.server.forwards_under_way
    client, _ = fixture.ask(b"40001,6667\r\n", turns=10)
    client.close()  # FIN: indistinguishable from a half-close
    pump(fixture.server, 20)
    assert fixture.server.forwards_under_way == 1
    fixture.clock.now += 2
    pump(fixture.server, 20)
    assert not fixture.server.connections and not fixture.server.forwards_under_way


USER_FORWARD = '[[rules]]\nusers = ["alice"]\naction = "real"\nuser_may = {may}\n'


class ForwardingAccounts:
    """Facts where alice's own file forwards to `port`."""

    def __init__(self, port: int) -> None:
        from procident.userfiles import UserFiles, parse_procident_file

        self.files = UserFiles(
            choices=parse_procident_file(f'action = "forward"\nforward = "127.0.0.1:{port}"')
        )
        self.now = 0.0

    def configure(self, config: Config) -> None:
        pass

    def groups(self, owner):
        return frozenset()

    def is_account(self, name: str) -> bool:
        return name in NAMES.values()

    def user_files(self, owner):
        return self.files


@pytest.mark.parametrize(
    ("may", "answer", "reply"),
    [
        ('["forward", "spoof"]', "USERID:UNIX:nick", b"USERID:OTHER:nick"),
        ('["forward"]', "USERID:UNIX:nick", b"USERID:UNIX:alice"),  # no spoof: the real name
        ('["forward", "hide"]', "USERID:UNIX:nick", b"ERROR:HIDDEN-USER"),  # may hide: hidden
        ('["forward", "spoof"]', "USERID:UNIX:bob", b"USERID:UNIX:alice"),  # bob needs spoof_all
        ('["forward", "spoof", "spoof_all"]', "USERID:UNIX:bob", b"USERID:OTHER:bob"),
        ('["forward"]', "USERID:UNIX:alice", b"USERID:UNIX:alice"),  # one's own name is fine
    ],
)
def test_a_users_forward_is_held_to_their_capabilities(make, apps, may, answer, reply) -> None:
    """What a user's own application answers must be an id the user may send."""
    app = apps(echo(answer))
    fixture = make(USER_FORWARD.format(may=may))
    fixture.responder.accounts = ForwardingAccounts(app.port)
    fixture.own(40001, 6667)
    assert fixture.ask(b"40001,6667\r\n")[1] == b"40001,6667:" + reply + b"\r\n"


# -- who may ask, and how often -------------------------------------------------


def test_rate_limit_error(make, caplog) -> None:
    """Past the burst, a client's queries get UNKNOWN-ERROR (over_limit = "error"), one
    log line counts them, and the bucket refills with time."""
    fixture = make("[limits]\nper_client_rate = 1\nper_client_burst = 2\n")
    client = connect(fixture.server)
    with caplog.at_level(logging.INFO, logger="procident"):
        client.send(b"1,1\r\n2,2\r\n3,3\r\n4,4\r\n")
        data = b""
        for _ in range(40):
            pump(fixture.server, 1)
            data += received(client) or b""
            if data.count(b"\n") == 4:
                break
    assert data == (
        b"1,1:ERROR:NO-USER\r\n2,2:ERROR:NO-USER\r\n"
        b"3,3:ERROR:UNKNOWN-ERROR\r\n4,4:ERROR:UNKNOWN-ERROR\r\n"
    )
    assert "refused 1 query(s) over limits.per_client_rate" in caplog.text
    fixture.clock.now += 1
    client.send(b"5,5\r\n")
    assert fixture.pump_until(client) == b"5,5:ERROR:NO-USER\r\n"


def test_rate_limit_close(make) -> None:
    """With over_limit = "close", the query over the limit closes the connection unanswered."""
    fixture = make('[limits]\nper_client_rate = 1\nper_client_burst = 1\nover_limit = "close"\n')
    client = connect(fixture.server)
    client.send(b"1,1\r\n2,2\r\n")
    data = read_until_closed(fixture.server, client, turns=40)
    assert data == b"1,1:ERROR:NO-USER\r\n" and not fixture.server.connections


def test_rate_limit_counts_ipv6_per_64() -> None:
    """Clients in one IPv6 /64 share one bucket (the same key as the connection cap); the
    next /64 has its own."""
    from procident.admission import Admission, Ticket

    admission = Admission(LimitsConfig(per_client_rate=1, per_client_burst=1))
    tickets = [
        admission.admit(ipaddress.IPv6Address(text))
        for text in ("2001:db8::1", "2001:db8::ffff:2", "2001:db8:0:1::1")
    ]
    assert all(isinstance(ticket, Ticket) for ticket in tickets)
    allowed = [admission.allow(ticket, 0.0) for ticket in tickets]  # type: ignore[arg-type]
    assert allowed == [True, False, True]


def test_access_lists_close_refused_clients(make, caplog) -> None:
    """A client the [access] lists refuse is closed at once, without a reply."""
    fixture = make('[access]\ndeny = ["127.0.0.0/8"]\n')
    with caplog.at_level(logging.INFO, logger="procident"):
        client, reply = fixture.ask(b"1,1\r\n", turns=5)
    assert reply is None and not fixture.server.connections
    assert "refused 1 connection(s) from clients the [access] lists refuse" in caplog.text
    allowed = make('[access]\nallow = ["127.0.0.0/8"]\n')
    assert allowed.ask(b"1,1\r\n")[1] == b"1,1:ERROR:NO-USER\r\n"


def test_reload_keeps_the_rate_table_unless_limits_change(make) -> None:
    """A reload with the same limits keeps each client's bucket (an empty one stays empty:
    the clock does not move here); new limits start afresh."""
    fixture = make("[limits]\nper_client_rate = 1\nper_client_burst = 1\n")
    over = b"1,1:ERROR:UNKNOWN-ERROR\r\n"
    assert fixture.ask(b"1,1\r\n")[1] == b"1,1:ERROR:NO-USER\r\n"
    assert fixture.ask(b"1,1\r\n")[1] == over
    fixture.server.apply(fixture.config)
    assert fixture.ask(b"1,1\r\n")[1] == over
    fixture.server.apply(parse_config(tomllib.loads("[limits]\nper_client_rate = 2\n")))
    assert fixture.ask(b"1,1\r\n")[1] == b"1,1:ERROR:NO-USER\r\n"


def test_connections_over_a_cap_are_bounded(make) -> None:
    """With over_limit "error", at most MAX_OVERFLOW connections over a cap are held (to be
    answered UNKNOWN-ERROR); beyond that they are closed at once, and none takes a slot."""
    from procident.admission import MAX_OVERFLOW

    fixture = make("[limits]\nmax_connections = 1\n")
    server = fixture.server
    clients = [connect(server) for _ in range(MAX_OVERFLOW + 11)]
    pump(server, 10)
    assert server.connections == MAX_OVERFLOW + 1
    closed = sum(received(c) is None for c in clients)
    assert closed == 10
    for client in clients:
        client.close()
    pump(server, 10)
    assert not server.connections
    assert fixture.ask(b"1,1\r\n")[1] == b"1,1:ERROR:NO-USER\r\n"  # within the cap again


def test_min_response_time_holds_replies_in_order(make) -> None:
    """With reply.min_response_time, no reply leaves before that time since its query was
    read; pipelined queries are answered in order, each after its own wait."""
    fixture = make("[reply]\nmin_response_time = 2\n[limits]\nper_client_rate = 0\n")
    fixture.own(40001, 6667)
    client = connect(fixture.server)
    client.send(b"40001,6667\r\n1,1\r\n")
    pump(fixture.server, 5)
    assert received(client) == b""  # held
    fixture.clock.now += 2
    pump(fixture.server, 5)
    assert received(client) == b"40001,6667:USERID:UNIX:alice\r\n"  # the second one waits
    fixture.clock.now += 2
    pump(fixture.server, 5)
    assert received(client) == b"1,1:ERROR:NO-USER\r\n"
    client.close()
    other = connect(fixture.server)
    other.send(b"1,1\r\n")
    pump(fixture.server, 5)
    other.close()  # leaves while its reply is held: nothing breaks
    fixture.clock.now += 2
    pump(fixture.server, 5)
    assert not fixture.server.connections


def test_reload_shortens_a_forward_under_way(make, apps) -> None:
    """A reload that shortens forward.timeout applies to forwards already out."""
    app = apps(lambda line: None)
    fixture = make(forwarding(app, "[forward]\ntimeout = 30\n"))
    fixture.own(40001, 6667)
    waiting, reply = fixture.ask(b"40001,6667\r\n", turns=10)
    assert reply == b""
    fixture.server.apply(parse_config(tomllib.loads(forwarding(app, "[forward]\ntimeout = 1\n"))))
    fixture.clock.now += 1
    assert fixture.pump_until(waiting) == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"


def test_a_held_reply_due_after_the_idle_deadline_is_sent(make) -> None:
    """A query read shortly before the idle deadline, its reply held by min_response_time
    past that deadline: the reply is sent when due (the connection was closed without it)."""
    fixture = make(
        "[limits]\nidle_timeout = 2\nper_client_rate = 0\n[reply]\nmin_response_time = 1.5\n"
    )
    client = connect(fixture.server)
    pump(fixture.server, 2)
    fixture.clock.now += 1.8
    client.send(b"1,1\r\n")
    pump(fixture.server, 3)
    assert received(client) == b""
    fixture.clock.now += 0.5  # past the idle deadline (2.0), before the reply is due (3.3)
    pump(fixture.server, 3)
    assert received(client) == b""
    fixture.clock.now += 1.1
    assert fixture.pump_until(client) == b"1,1:ERROR:NO-USER\r\n"


def test_a_forward_answered_after_the_idle_deadline_is_sent(make, apps) -> None:
    """A forward that answers after the idle deadline has passed (within forward.timeout):
    its reply is sent, then the idle window starts again."""
    release = threading.Event()

    def late(line: bytes) -> bytes:
        release.wait(5)
        return line.strip().replace(b" ", b"") + b":USERID:UNIX:nick\r\n"

    app = apps(late)
    fixture = make(forwarding(app, "[limits]\nidle_timeout = 2\n[forward]\ntimeout = 10\n"))
    fixture.own(40001, 6667)
    client = connect(fixture.server)
    client.send(b"40001,6667\r\n")
    pump(fixture.server, 3)
    fixture.clock.now += 5  # far past the idle deadline; the forward is still out
    pump(fixture.server, 3)
    assert received(client) == b""
    release.set()
    assert fixture.pump_until(client) == b"40001,6667:USERID:OTHER:nick\r\n"


def test_white_space_around_a_forwarded_id_is_not_sent_on(make, apps) -> None:
    """Quassel and The Lounge answer "P , Q : USERID : UNIX : qsalice": the id is sent on
    as clients read it, without the space before it (it went out as " qsalice")."""
    app = apps(lambda line: line.strip().replace(b",", b" , ") + b" : USERID : UNIX : qsalice \r\n")
    fixture = make(forwarding(app))
    fixture.own(40001, 6667)
    assert fixture.ask(b"40001,6667\r\n")[1] == b"40001,6667:USERID:OTHER:qsalice\r\n"
