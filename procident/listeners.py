"""Listening sockets: opening them from [server] listen (systemd's come ready-made), and
taking connections from them in batches, pausing instead of spinning when out of file
descriptors."""

from __future__ import annotations

import errno
import functools
import logging
import os
import selectors
import socket
from collections.abc import Callable
from typing import Any

from procident.lookup import Endpoint

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128
ACCEPT_BATCH = 64  # connections taken per readable listener, so no listener starves the rest
ACCEPT_PAUSE = 1.0  # seconds without accepting after EMFILE and the like
PAUSE_LOG_INTERVAL = 10.0
# accept() errors that mean "out of a resource": retrying at once would spin.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# accept() errors about one connection that went away before we took it.
_ABORTED = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}


class ListenError(Exception):
    """A listen address that cannot be bound."""


def open_listeners(endpoints: tuple[Endpoint, ...]) -> list[socket.socket]:
    """Bind and listen on every endpoint; a wildcard IPv6 address on a host without IPv6 is
    skipped with a warning, any other failure is a ListenError."""
    listeners: list[socket.socket] = []
    try:
        for endpoint in endpoints:
            sock = _listen(endpoint)
            if sock is not None:
                listeners.append(sock)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    if not listeners:
        raise ListenError("no listen address could be bound")
    return listeners


def _listen(endpoint: Endpoint) -> socket.socket | None:
    family = socket.AF_INET6 if endpoint.address.version == 6 else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        if family == socket.AF_INET6 and err.errno == errno.EAFNOSUPPORT:
            log.warning("not listening on %s: this host has no IPv6", endpoint)
            return None
        raise ListenError(f"cannot listen on {endpoint}: {err.strerror}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # Set explicitly: the system default varies, and an IPv4 listener
            # on the same port must not collide with this one.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(endpoint.address), endpoint.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        if (
            family == socket.AF_INET6
            and endpoint.address.is_unspecified
            and err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
        ):
            log.warning("not listening on %s: IPv6 is disabled on this host", endpoint)
            return None
        raise ListenError(f"cannot listen on {endpoint}: {err.strerror}") from None
    return sock


class Acceptor:
    """Takes connections from `listeners` (registered in `selector`) and hands each to
    `admit(sock, address)`, ACCEPT_BATCH at most per readable listener and turn.

    Out of file descriptors or memory, accept() would fail at once again: the listeners
    leave the selector for ACCEPT_PAUSE seconds, or until `resume` (a client left).
    """

    def __init__(
        self,
        listeners: list[socket.socket],
        selector: selectors.BaseSelector,
        admit: Callable[[socket.socket, tuple[str, int]], None],
        clock: Callable[[], float],
    ) -> None:
        self.listeners = listeners
        self.selector = selector
        self.admit = admit
        self.clock = clock
        self.resume_at: float | None = None
        self.pauses = 0
        self.pause_logged_at = float("-inf")
        self._listen()

    def tick(self, now: float) -> None:
        if self.resume_at is not None and now >= self.resume_at:
            self.resume()

    def resume(self) -> None:
        """Accept again, if paused."""
        if self.resume_at is not None:
            self.resume_at = None
            self._listen()

    def close(self) -> None:
        for sock in self.listeners:
            if self.resume_at is None:
                self.selector.unregister(sock)
            sock.close()

    def _listen(self) -> None:
        for sock in self.listeners:
            self.selector.register(
                sock, selectors.EVENT_READ, functools.partial(self._accept, sock, _taker(sock))
            )

    def _accept(
        self, listener: socket.socket, take: Callable[[], tuple[socket.socket, Any]], mask: int
    ) -> None:
        if self.resume_at is not None:
            return  # paused by another listener earlier in this same turn
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = take()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in _ABORTED:
                    continue
                # Out of file descriptors or memory, or stranger: the pending
                # connection stays in the backlog and the listener readable, so
                # retrying now would spin.
                self._pause(err)
                return
            self.admit(sock, address)

    def _pause(self, err: OSError) -> None:
        now = self.clock()
        self.pauses += 1
        if now - self.pause_logged_at >= PAUSE_LOG_INTERVAL:
            # At most one line per interval: a client leaving resumes accepting at once,
            # so a daemon at its file limit may pause often.
            level = logging.WARNING if err.errno in _EXHAUSTED else logging.ERROR
            log.log(
                level,
                "cannot accept: %s; not accepting for %.0fs, or until a client leaves "
                "(%d pause(s) since the last line)",
                err.strerror,
                ACCEPT_PAUSE,
                self.pauses,
            )
            self.pauses = 0
            self.pause_logged_at = now
        for sock in self.listeners:
            self.selector.unregister(sock)
        self.resume_at = now + ACCEPT_PAUSE


def _taker(listener: socket.socket) -> Callable[[], tuple[socket.socket, Any]]:
    """listener.accept, without what it costs per connection beyond the system call
    (about 1.7 us: reading the listener's family and type back as enums): the new
    socket is made from the integers read here, once, with the default timeout, as
    accept() makes it on Linux. A socket of another class (an embedder's subclass) keeps
    its own accept."""
    raw = getattr(listener, "_accept", None)
    if raw is None or type(listener) is not socket.socket:
        return listener.accept
    family, kind, proto = int(listener.family), int(listener.type), listener.proto
    make = socket.socket

    def take() -> tuple[socket.socket, Any]:
        fd, address = raw()
        try:
            return make(family, kind, proto, fd), address
        except BaseException:
            os.close(fd)
            raise

    return take
