"""Listening sockets: opening them from [server] listen (systemd's come ready-made)."""

from __future__ import annotations

import errno
import logging
import socket

from procident.lookup import Endpoint

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128


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
