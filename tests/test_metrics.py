"""Metrics: counts after a known sequence of queries, scraped over HTTP, written to a
textfile, and summarised on SIGUSR1."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import stat
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomllib
from conftest import DictBackend, requires_root
from harness import IO_TIMEOUT, wait_for
from test_forward import Fixture
from test_server import Clock, connect, pump, read_until_closed, received

from procident.config import parse_config
from procident.lookup import Endpoint
from procident.metrics import Metrics, http_response
from procident.responder import Responder
from procident.server import Server, open_listeners


def sample(text: str, name: str) -> float:
    """The value of one sample, e.g. 'procident_replies_total{type="NO-USER"}'."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in:\n{text}"
    return float(match[1])


def exchange(fixture: MetricsFixture, data: bytes) -> bytes:
    client = connect(fixture.server)
    client.send(data)
    client.shutdown(socket.SHUT_WR)
    with client:
        return read_until_closed(fixture.server, client)


def scrape(
    fixture: MetricsFixture, request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
) -> bytes:
    client = socket.create_connection(fixture.metrics_listener.getsockname())
    client.setblocking(False)
    client.send(request)
    with client:
        return read_until_closed(fixture.server, client)


class MetricsFixture(Fixture):
    """test_forward's in-process server, with a metrics listener as serve opens one."""

    def __init__(self, config_text: str) -> None:
        self.config = parse_config(tomllib.loads(config_text))
        self.backend = DictBackend({})
        self.responder = Responder(self.backend, self.config, {1000: "alice"}.get)
        self.clock = Clock()
        loopback = (Endpoint(ipaddress.IPv4Address("127.0.0.1"), 0),)
        self.metrics_listener = open_listeners(loopback)[0]
        self.server = Server(
            self.config,
            self.responder,
            open_listeners(loopback),
            clock=self.clock,
            metrics_listener=self.metrics_listener,
        )


@pytest.fixture
def make() -> Iterator[Callable[[str], MetricsFixture]]:
    made: list[MetricsFixture] = []

    def factory(text: str = "") -> MetricsFixture:
        made.append(MetricsFixture("[limits]\nper_client_rate = 1\nper_client_burst = 4\n" + text))
        return made[-1]

    yield factory
    for fixture in made:
        fixture.server.close()


def test_counts_after_known_queries(make) -> None:
    """Two NO-USER, one USERID, one INVALID-PORT, one malformed line, one query over the
    rate, one overlong line: each counted where it belongs, and the lookups timed."""
    fixture = make()
    fixture.own(40001, 6667)
    assert exchange(fixture, b"1,1\r\n2,2\r\n40001,6667\r\n0,5\r\nhello\r\n") == (
        b"1,1:ERROR:NO-USER\r\n2,2:ERROR:NO-USER\r\n40001,6667:USERID:UNIX:alice\r\n"
        b"0,5:ERROR:INVALID-PORT\r\n0,0:ERROR:INVALID-PORT\r\n"
    )
    # four queries took the burst of 4 (a malformed line is no query): this one is over
    assert exchange(fixture, b"3,3\r\n") == b"3,3:ERROR:UNKNOWN-ERROR\r\n"
    assert exchange(fixture, b"9" * 1001) == b""
    response = scrape(fixture)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    text = body.decode()
    assert sample(text, 'procident_replies_total{type="NO-USER"}') == 2
    assert sample(text, 'procident_replies_total{type="USERID"}') == 1
    assert sample(text, 'procident_replies_total{type="INVALID-PORT"}') == 2
    assert sample(text, 'procident_replies_total{type="UNKNOWN-ERROR"}') == 1
    assert sample(text, 'procident_replies_total{type="HIDDEN-USER"}') == 0
    assert sample(text, 'procident_refused_total{limit="per_client_rate"}') == 1
    assert sample(text, "procident_malformed_total") == 1
    assert sample(text, "procident_overlong_total") == 1
    assert sample(text, "procident_lookup_seconds_count") == 3  # 1,1 2,2 40001,6667
    assert sample(text, 'procident_lookup_seconds_bucket{le="+Inf"}') == 3
    assert sample(text, "procident_open_connections") == 0
    assert sample(text, 'procident_backend_info{backend="dict"}') == 1


def test_idle_timeouts_counted(make) -> None:
    """A connection closed at the idle timeout counts as timed out."""
    fixture = make("idle_timeout = 2\n")
    client = connect(fixture.server)
    pump(fixture.server, 3)
    fixture.clock.now += 3
    pump(fixture.server, 3)
    assert received(client) is None
    assert sample(scrape(fixture).decode(), "procident_timed_out_total") == 1


def test_http_requests() -> None:
    """GET and HEAD of /metrics are served; other paths 404, other methods 405; an
    incomplete request waits."""
    body = Metrics("netlink").render(open_connections=3)
    assert sample(body, "procident_open_connections") == 3
    assert http_response(b"GET /metrics HTTP/1.1\r\nHost: x\r", body) is None
    ok = http_response(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", body)
    assert ok is not None and ok.endswith(body.encode())
    head = http_response(b"HEAD /metrics HTTP/1.0\r\n\r\n", body)
    assert head is not None and head.endswith(b"\r\n\r\n") and body.encode() not in head
    assert http_response(b"GET /secret HTTP/1.0\r\n\r\n", body).startswith(b"HTTP/1.0 404")  # type: ignore[union-attr]
    assert http_response(b"POST /metrics HTTP/1.0\r\n\r\n", body).startswith(b"HTTP/1.0 405")  # type: ignore[union-attr]


def test_slow_scraper_is_closed(make) -> None:
    """A metrics client that never finishes its request is closed after 1 second."""
    fixture = make()
    client = socket.create_connection(fixture.metrics_listener.getsockname())
    client.setblocking(False)
    client.send(b"GET /metr")
    pump(fixture.server, 3)
    assert received(client) == b""  # open, and waiting for the rest
    fixture.clock.now += 0.5
    pump(fixture.server, 3)
    assert received(client) == b""
    fixture.clock.now += 0.6
    pump(fixture.server, 3)
    assert received(client) is None


@requires_root
def test_daemon_metrics(start_daemon, workdir: Path) -> None:
    """The daemon serves metrics.listen, writes the textfile atomically, and logs the
    counts on SIGUSR1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    textfile = workdir / "procident.prom"
    workdir.chmod(0o777)  # the daemon runs as nobody and renames into it
    daemon = start_daemon(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\ntextfile = "{textfile}"\ninterval = 1\n'
    )
    assert daemon.ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=IO_TIMEOUT) as page:
        text = page.read().decode()
    assert sample(text, 'procident_replies_total{type="NO-USER"}') == 1
    wait_for(
        lambda: (
            textfile.exists()
            and 'procident_replies_total{type="NO-USER"} 1' in textfile.read_text()
        ),
        IO_TIMEOUT,
    )
    assert not list(workdir.glob("procident.prom.*.tmp"))
    daemon.process.send_signal(signal.SIGUSR1)
    daemon.wait_log(r"metrics: replies USERID=0 INVALID-PORT=0 NO-USER=1 ")


def test_open_connections_gauge(make) -> None:
    """The gauge counts the connections being served now; one held over max_connections
    only to be refused does not count."""
    fixture = make("max_connections = 1\n")
    clients = [connect(fixture.server) for _ in range(2)]
    pump(fixture.server, 5)
    assert fixture.server.connections == 2  # one of them only to hear UNKNOWN-ERROR
    assert sample(fixture.server.render_metrics(), "procident_open_connections") == 1
    for client in clients:
        client.close()
    pump(fixture.server, 5)
    assert sample(fixture.server.render_metrics(), "procident_open_connections") == 0


def test_textfile_is_world_readable_and_never_written_through_a_link(tmp_path: Path) -> None:
    """In node_exporter's directory (shared, and under systemd's UMask=0077) the textfile
    comes out 0644, for node_exporter's account to read; a link planted at its temporary
    name is replaced, and the file it points to is left alone."""
    from procident.metrics import write_textfile

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "procident.prom"
    (tmp_path / f"procident.prom.{os.getpid()}.tmp").symlink_to(victim)
    old = os.umask(0o077)
    try:
        write_textfile(str(path), "procident_up 1\n")
    finally:
        os.umask(old)
    assert victim.read_text() == "precious\n"
    assert path.read_text() == "procident_up 1\n" and not path.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["procident.prom", "victim"]
