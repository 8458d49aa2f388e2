"""The library API: custom lookups, the asyncio adapter, the examples.

The protocol table (protocol_table.py) runs against the daemon's selectors server, the
asyncio adapter and inetd mode alike: all must give the same bytes for the same input.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import tomllib
from conftest import DictBackend
from protocol_table import ALICE, PROTOCOL_TABLE

import procident
import procident.aio
from procident.config import Config, LimitsConfig
from procident.lookup import ConnectionId, Endpoint, SocketEntry, TcpState
from procident.responder import Responder
from procident.server import Server, open_listeners

ROOT = Path(__file__).parent.parent
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
ALICE_CONN = ConnectionId(Endpoint(LOOPBACK, 40001), Endpoint(LOOPBACK, 6667))
TIMEOUT = 5.0


class Running:
    """A server serving in a background thread, at `address`."""

    def __init__(self, address: tuple[str, int], stop: Callable[[], None]) -> None:
        self.address = address
        self.stop = stop

    def exchange(self, data: bytes, half_close: bool = True, bytewise: bool = False) -> bytes:
        """Send `data` (one byte at a time if bytewise), half-close if asked, and return
        everything received until the server closes the connection."""
        with socket.create_connection(self.address, timeout=TIMEOUT) as sock:
            # A server that refuses the connection may reset it while we still send.
            with contextlib.suppress(OSError):
                if bytewise:
                    for i in range(len(data)):
                        sock.send(data[i : i + 1])
                else:
                    sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            received = b""
            with contextlib.suppress(ConnectionResetError):  # closed with input unread
                while chunk := sock.recv(65536):
                    received += chunk
            return received


@contextlib.contextmanager
def daemon_server(limits: LimitsConfig | None = None) -> Iterator[Running]:
    """procident's own selectors server, with alice owning ALICE_CONN."""
    config = replace(Config(), rules=(), limits=limits or LimitsConfig())
    entry = SocketEntry(ALICE_CONN.local, ALICE_CONN.remote, TcpState.ESTABLISHED, 1000, 4242)
    responder = Responder(DictBackend({ALICE_CONN: entry}), config, {1000: "alice"}.get)
    server = Server(config, responder, open_listeners((Endpoint(LOOPBACK, 0),)))
    address = server.listeners[0].getsockname()
    stopping = threading.Event()

    def run() -> None:
        while not stopping.is_set():
            server.step(timeout=0.02)
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield Running(address, stopping.set)
    finally:
        stopping.set()
        thread.join(TIMEOUT)


@contextlib.contextmanager
def aio_server(
    lookup: procident.Lookup | None = None,
    limits: LimitsConfig | None = None,
    lookup_timeout: float = 5.0,
) -> Iterator[Running]:
    """The asyncio adapter in a thread of its own, by default with alice owning ALICE_CONN."""

    def alice(conn: procident.ConnectionId) -> procident.LookupResult:
        return procident.UserIdReply("alice", "UNIX") if conn == ALICE_CONN else None

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        procident.aio.start_ident_server(
            lookup or alice, "127.0.0.1", 0, limits=limits, lookup_timeout=lookup_timeout
        )
    )
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def shutdown() -> None:
        # Connections still being served end first, so none is left to a closed loop.
        server.close()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    try:
        yield Running(server.sockets[0].getsockname()[:2], lambda: None)
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


@contextlib.contextmanager
def inetd_server(
    limits: LimitsConfig | None = None, config: Config | None = None
) -> Iterator[Running]:
    """inetd mode (procident.inetd.serve_connection), one thread per accepted connection
    as a super-server would start one process each, with alice owning ALICE_CONN."""
    from procident.inetd import serve_connection

    config = config or replace(Config(), rules=(), limits=limits or LimitsConfig())
    entry = SocketEntry(ALICE_CONN.local, ALICE_CONN.remote, TcpState.ESTABLISHED, 1000, 4242)
    responder = Responder(DictBackend({ALICE_CONN: entry}), config, {1000: "alice"}.get)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stopping = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn:
            peer = Endpoint(LOOPBACK, conn.getpeername()[1])
            local = Endpoint(LOOPBACK, conn.getsockname()[1])
            serve_connection(responder, config, peer, local, conn.fileno(), conn.fileno())

    def run() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield Running(listener.getsockname(), stopping.set)
    finally:
        stopping.set()
        thread.join(TIMEOUT)
        listener.close()


SERVERS = {"daemon": daemon_server, "aio": aio_server, "inetd": inetd_server}


@pytest.mark.parametrize("kind", list(SERVERS))
@pytest.mark.parametrize(
    ("data", "half_close", "expected"),
    [case[1:] for case in PROTOCOL_TABLE],
    ids=[case[0] for case in PROTOCOL_TABLE],
)
def test_protocol_rules_hold_in_every_driver(kind, data, half_close, expected) -> None:
    """The same input gives the same bytes from the daemon, the asyncio adapter and inetd
    mode."""
    with SERVERS[kind]() as server:
        assert server.exchange(data, half_close) == expected


@pytest.mark.parametrize("kind", list(SERVERS))
def test_byte_at_a_time(kind) -> None:
    """A query that arrives one byte at a time is one query."""
    with SERVERS[kind]() as server:
        assert server.exchange(b"40001,6667\r\n", bytewise=True) == ALICE


@pytest.mark.parametrize("kind", list(SERVERS))
def test_idle_timeout(kind) -> None:
    """A client that sends nothing is closed at the idle timeout."""
    limits = LimitsConfig(idle_timeout=1)
    with (
        SERVERS[kind](limits=limits) as server,
        socket.create_connection(server.address, timeout=TIMEOUT) as sock,
    ):
        assert sock.recv(10) == b""


@pytest.mark.parametrize("kind", ["daemon", "aio"])  # one inetd process sees one connection
def test_per_client_connection_cap(kind) -> None:
    """Past per_client_connections, a new connection is served once: its first query is
    answered, then it is closed; one that does not ask is closed (at the grace)."""
    limits = LimitsConfig(per_client_connections=1, over_limit="close")
    with SERVERS[kind](limits=limits) as server:
        with socket.create_connection(server.address, timeout=TIMEOUT) as held:
            held.sendall(b"1,1\r\n")
            assert held.recv(100) == b"1,1:ERROR:NO-USER\r\n"
            assert server.exchange(b"1,1\r\n2,2\r\n") == b"1,1:ERROR:NO-USER\r\n"
            with socket.create_connection(server.address, timeout=TIMEOUT) as idle:
                assert idle.recv(100) == b""  # closed without a word
        # the slot is free again
        for _ in range(50):
            if server.exchange(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n":
                break
        else:
            pytest.fail("the freed slot was not reused")


# -- custom lookups ----------------------------------------------------------------


def raising(error: type[BaseException]) -> procident.SyncLookup:
    def lookup(conn: procident.ConnectionId) -> procident.LookupResult:
        raise error()

    return lookup


def returning(result: procident.LookupResult) -> procident.SyncLookup:
    return lambda conn: result


LOOKUP_TABLE = [
    ("a string is an OTHER id", returning("nick"), b"USERID:OTHER:nick"),
    (
        "a UserIdReply as given",
        returning(procident.UserIdReply("bob", "UNIX", "UTF-8")),
        b"USERID:UNIX,UTF-8:bob",
    ),
    ("None is NO-USER", returning(None), b"ERROR:NO-USER"),
    ("an ErrorType", returning(procident.ErrorType.HIDDEN_USER), b"ERROR:HIDDEN-USER"),
    (
        "an ErrorReply",
        returning(procident.ErrorReply(procident.ErrorType.UNKNOWN_ERROR)),
        b"ERROR:UNKNOWN-ERROR",
    ),
    ("NoUser", raising(procident.NoUser), b"ERROR:NO-USER"),
    ("HiddenUser", raising(procident.HiddenUser), b"ERROR:HIDDEN-USER"),
    ("UnknownError", raising(procident.UnknownError), b"ERROR:UNKNOWN-ERROR"),
    ("InvalidPortError", raising(procident.InvalidPortError), b"ERROR:INVALID-PORT"),
    ("any other exception", raising(RuntimeError), b"ERROR:UNKNOWN-ERROR"),
    ("a reply the RFC forbids", returning("a\r\nb"), b"ERROR:UNKNOWN-ERROR"),
    ("an id over 512 octets", returning("x" * 513), b"ERROR:UNKNOWN-ERROR"),
    ("a wrong type", returning(42), b"ERROR:UNKNOWN-ERROR"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("lookup", "reply"), [c[1:] for c in LOOKUP_TABLE], ids=[c[0] for c in LOOKUP_TABLE]
)
def test_lookup_results_sync(lookup, reply) -> None:
    """LookupResponder turns each result or exception into its reply, never raising."""
    query = procident.Query(40001, 6667)
    assert procident.LookupResponder(lookup).respond(query, ALICE_CONN) == (
        b"40001,6667:" + reply + b"\r\n"
    )


@pytest.mark.parametrize(
    ("lookup", "reply"), [c[1:] for c in LOOKUP_TABLE], ids=[c[0] for c in LOOKUP_TABLE]
)
def test_lookup_results_async(lookup, reply) -> None:
    """The asyncio adapter gives the same replies, for the lookup as a coroutine too."""

    async def coroutine(conn: procident.ConnectionId) -> procident.LookupResult:
        await asyncio.sleep(0)
        return lookup(conn)

    for variant in (lookup, coroutine):
        with aio_server(variant) as server:
            assert server.exchange(b"40001,6667\r\n") == b"40001,6667:" + reply + b"\r\n"


def test_lookup_sees_the_whole_connection() -> None:
    """A lookup gets both addresses and both ports: the query's, as seen from here."""
    seen: list[procident.ConnectionId] = []

    def lookup(conn: procident.ConnectionId) -> procident.LookupResult:
        seen.append(conn)
        return "x"

    with aio_server(lookup) as server:
        server.exchange(b"123,456\r\n")
    assert seen == [ConnectionId(Endpoint(LOOPBACK, 123), Endpoint(LOOPBACK, 456))]


def test_slow_coroutine_times_out(caplog) -> None:
    """A coroutine lookup that runs past lookup_timeout is answered UNKNOWN-ERROR, and the
    server goes on serving."""

    async def slow(conn: procident.ConnectionId) -> procident.LookupResult:
        if conn.local.port == 1:
            await asyncio.sleep(30)
        return "fast"

    with aio_server(slow, lookup_timeout=0.2) as server:
        assert server.exchange(b"1,1\r\n2,2\r\n") == (
            b"1,1:ERROR:UNKNOWN-ERROR\r\n2,2:USERID:OTHER:fast\r\n"
        )
    assert "took more than 0.2s" in caplog.text


# -- the examples, end to end --------------------------------------------------------


@contextlib.contextmanager
def example(name: str, *args: str) -> Iterator[int]:
    """Run examples/NAME on a free port; yield the port once it listens."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / name), "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        yield int(match[1])
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def query(port: int, server_port: int, client_port: int) -> tuple[int, str]:
    """Ask with the project's own client: (exit status, output)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "procident",
            "query",
            "-p",
            str(port),
            "-t",
            "5",
            "127.0.0.1",
            str(server_port),
            str(client_port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode, result.stdout


def test_bouncer_example() -> None:
    """The bouncer example names its users, hides the hidden one, and knows nothing else."""
    with example("bouncer_ident.py", "40001:6667:alice", "40002:6697:bob", "--hide", "bob") as port:
        assert query(port, 40001, 6667) == (0, "type:    USERID\nos:      OTHER\nuser id: alice\n")
        assert query(port, 40002, 6697) == (1, "type:    ERROR\nerror:   HIDDEN-USER\n")
        assert query(port, 40003, 6667) == (1, "type:    ERROR\nerror:   NO-USER\n")


def test_async_lookup_example() -> None:
    """The async example answers after its directory does, and UNKNOWN-ERROR when that
    takes longer than its timeout."""
    with example("async_lookup.py", "40001:6667:carol", "--delay", "0.05") as port:
        assert query(port, 40001, 6667) == (0, "type:    USERID\nos:      UNIX\nuser id: carol\n")
        assert query(port, 1, 1) == (1, "type:    ERROR\nerror:   NO-USER\n")
    with example("async_lookup.py", "40001:6667:carol", "--delay", "2", "--timeout", "0.2") as port:
        assert query(port, 40001, 6667) == (1, "type:    ERROR\nerror:   UNKNOWN-ERROR\n")


def test_examples_pass_mypy_strict() -> None:
    """The examples, written against the public API only, type-check with mypy --strict."""
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed; it is in the test extra")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_names() -> None:
    """procident.__all__ lists what is public, and every name in it exists."""
    for name in procident.__all__:
        assert hasattr(procident, name), name
    assert set(procident.aio.__all__) == {"IdentServer", "serve_ident", "start_ident_server"}
    for path in (ROOT / "examples").glob("*.py"):
        used = set(re.findall(r"procident\.(\w+)", path.read_text()))
        assert used <= set(procident.__all__) | {"aio", "start_ident_server", "serve_ident"}, path


def test_inetd_holds_replies_for_min_response_time() -> None:
    """inetd mode keeps [reply] min_response_time, as the daemon does: no reply comes
    sooner than that after its query (it was sent at once before)."""
    import time

    config = replace(Config(), rules=(), reply=replace(Config().reply, min_response_time=0.4))
    with (
        inetd_server(config=config) as server,
        socket.create_connection(server.address, timeout=TIMEOUT) as sock,
    ):
        started = time.monotonic()
        sock.sendall(b"1,1\r\n40001,6667\r\n")
        first = sock.recv(100)
        after_first = time.monotonic() - started
        assert first == b"1,1:ERROR:NO-USER\r\n" and after_first >= 0.4
        assert sock.recv(100) == ALICE


def test_inetd_forward_that_outlasts_the_idle_window_still_answers() -> None:
    """A blocking forward that answers after the idle timeout has passed: its reply is
    still sent (it was dropped before), then the connection ends at the next timeout."""
    import time

    from test_forward import App

    def late(line: bytes) -> bytes:
        time.sleep(1.5)
        return line.strip() + b":USERID:UNIX:nick\r\n"

    app = App(late)
    try:
        config = tomllib.loads(
            "[limits]\nidle_timeout = 1\n[forward]\ntimeout = 4\n"
            f'[[rules]]\nuids = [1000]\naction = "forward"\nforward = "127.0.0.1:{app.port}"\n'
        )
        from procident.config import parse_config

        with inetd_server(config=parse_config(config)) as server:
            assert server.exchange(b"40001,6667\r\n", half_close=False) == (
                b"40001,6667:USERID:OTHER:nick\r\n"
            )
    finally:
        app.close()


@pytest.mark.parametrize("kind", ["daemon", "aio"])
def test_connection_cap_with_over_limit_error(kind) -> None:
    """With over_limit = "error", a connection over max_connections hears UNKNOWN-ERROR
    for its query, then is closed (the asyncio adapter closed it silently)."""
    limits = LimitsConfig(max_connections=1, over_limit="error")
    with (
        SERVERS[kind](limits=limits) as server,
        socket.create_connection(server.address, timeout=TIMEOUT) as held,
    ):
        held.sendall(b"1,1\r\n")
        assert held.recv(100) == b"1,1:ERROR:NO-USER\r\n"
        assert server.exchange(b"40001,6667\r\n") == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"


@pytest.mark.parametrize("kind", list(SERVERS))
def test_every_driver_logs_each_answer(kind, caplog) -> None:
    """Each driver writes the one answer line per query, through the one answer sink: the
    asyncio adapter too (it logged none), and malformed lines with their fields."""
    import logging

    caplog.set_level(logging.INFO, logger="procident")
    with SERVERS[kind]() as server:
        assert server.exchange(b"40001,6667\r\n") == ALICE
        assert server.exchange(b"x\r\n") == b"0,0:ERROR:INVALID-PORT\r\n"
    answers = [r for r in caplog.records if r.getMessage().startswith("answer client=")]
    assert [r.getMessage().split(" owner=")[0] for r in answers] == [
        "answer client=127.0.0.1 query=40001,6667",
        "answer client=127.0.0.1 query=malformed reply=INVALID-PORT",
    ]
    assert (
        answers[0]
        .getMessage()
        .endswith("reply=USERID:UNIX:alice rule=" + answers[0].fields["rule"])
    )
    assert answers[1].fields == {
        "event": "answer",
        "client": "127.0.0.1",
        "query": "malformed",
        "reply": "ERROR:INVALID-PORT",
        "rule": "malformed",
    }
