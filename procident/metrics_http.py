"""The metrics scrape endpoint ([metrics] listen) and textfile, on the daemon's selector.

A few clients at a time, briefly: each client (an IPv4 address, an IPv6 /64) holds at
most MAX_SCRAPERS_PER_CLIENT of the MAX_SCRAPERS slots, the newest connection always
gets one (the oldest of its client, else the oldest of all, makes room), and a request
must come within SCRAPE_TIMEOUT; so idle connections cannot keep monitoring out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import selectors
import socket
from collections.abc import Callable

from procident.admission import client_key
from procident.lookup import endpoint_from_sockaddr
from procident.metrics import MAX_HTTP_REQUEST, http_response, write_textfile
from procident.settings import MetricsConfig

log = logging.getLogger(__name__)

MAX_SCRAPERS = 8  # metrics connections open at once
MAX_SCRAPERS_PER_CLIENT = 2  # of them, from one client
SCRAPE_TIMEOUT = 1.0  # seconds a metrics client has to send its request


class ScrapeEndpoint:
    """GET /metrics on `listener`, registered in `selector`; `render` makes the page."""

    def __init__(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        render: Callable[[], str],
        clock: Callable[[], float],
    ) -> None:
        self.listener = listener
        self.selector = selector
        self.render = render
        self.clock = clock
        # connection -> (request so far, deadline, client key), oldest first
        self.scrapers: dict[socket.socket, tuple[bytes, float, object]] = {}
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, self._accept)

    def deadlines(self) -> list[float]:
        return [deadline for _, deadline, _ in self.scrapers.values()]

    def expire(self, now: float) -> None:
        """Close the clients whose request did not come in time."""
        for sock, (_, deadline, _) in list(self.scrapers.items()):
            if deadline <= now:
                self._close(sock)

    def close(self) -> None:
        for sock in list(self.scrapers):
            self._close(sock)
        self.selector.unregister(self.listener)
        self.listener.close()

    def _accept(self, mask: int) -> None:
        try:
            sock, address = self.listener.accept()
            key = client_key(endpoint_from_sockaddr(address).address)
        except (OSError, ValueError):
            return
        own = [other for other, (_, _, owner) in self.scrapers.items() if owner == key]
        if len(own) >= MAX_SCRAPERS_PER_CLIENT:
            self._close(own[0])
        elif len(self.scrapers) >= MAX_SCRAPERS:
            self._close(next(iter(self.scrapers)))
        sock.setblocking(False)
        self.scrapers[sock] = (b"", self.clock() + SCRAPE_TIMEOUT, key)
        self.selector.register(sock, selectors.EVENT_READ, functools.partial(self._read, sock))
        self._read(sock, selectors.EVENT_READ)  # the request is often there already

    def _read(self, sock: socket.socket, mask: int) -> None:
        request, deadline, key = self.scrapers[sock]
        try:
            data = sock.recv(MAX_HTTP_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        request += data
        response = http_response(request, self.render()) if data else None
        if response is None and data and len(request) < MAX_HTTP_REQUEST:
            self.scrapers[sock] = (request, deadline, key)
            return
        if response is not None:
            with contextlib.suppress(OSError):
                sock.send(response)  # a few KiB: one send into a fresh socket's buffer
        self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        del self.scrapers[sock]
        self.selector.unregister(sock)
        sock.close()


def write_metrics_file(path: str, text: str) -> None:
    """Write the metrics to [metrics] textfile, atomically; a failure is logged."""
    try:
        write_textfile(path, text)
    except OSError as err:
        log.error("cannot write metrics to %s: %s", path, err.strerror)


class Textfile:
    """[metrics] textfile: the metrics written atomically every `interval` seconds, and a
    last time at close ([metrics] is read at start only: see startup.RELOAD_RULES)."""

    def __init__(self, path: str, interval: float, render: Callable[[], str], now: float) -> None:
        self.path = path
        self.interval = interval
        self.render = render
        self.due: float | None = now if path else None  # the next write

    def tick(self, now: float) -> None:
        if self.due is not None and now >= self.due:
            self.write()
            self.due = now + self.interval

    def write(self) -> None:
        if self.path:
            write_metrics_file(self.path, self.render())

    def close(self) -> None:
        if self.due is not None:
            self.write()


class MetricsOutputs:
    """Where the metrics go: the scrape endpoint on `listener` (if any), the textfile of
    `config` (if any); their deadlines are the loop's to keep."""

    def __init__(
        self,
        listener: socket.socket | None,
        config: MetricsConfig,
        selector: selectors.BaseSelector,
        render: Callable[[], str],
        clock: Callable[[], float],
    ) -> None:
        self.scrape = (
            ScrapeEndpoint(listener, selector, render, clock) if listener is not None else None
        )
        self.textfile = Textfile(config.textfile, config.interval, render, clock())

    def deadlines(self) -> list[float]:
        dues = self.scrape.deadlines() if self.scrape is not None and self.scrape.scrapers else []
        if self.textfile.due is not None:
            dues.append(self.textfile.due)
        return dues

    def tick(self, now: float) -> None:
        if self.scrape is not None:
            self.scrape.expire(now)
        self.textfile.tick(now)

    def close(self) -> None:
        self.textfile.close()
        if self.scrape is not None:
            self.scrape.close()
