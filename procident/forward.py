"""Asking an application's own ident server, without blocking the event loop.

A ForwardClient connects, sends one query, and reads one reply line; the
server drives it from its selector and gives up at the forward timeout. What
comes back is only text: Responder.finish_forward judges it.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from dataclasses import replace

from procident.lookup import Endpoint
from procident.protocol import MAX_LINE, Query
from procident.responder import Answer, Responder


class ForwardFailed(Exception):
    """The application's ident server could not be asked, or did not answer."""


class ForwardClient:
    """One query to one ident server; the socket is non-blocking."""

    def __init__(self, target: Endpoint, query: Query) -> None:
        self.target = target
        family = socket.AF_INET6 if target.address.version == 6 else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.output = b"%d,%d\r\n" % (query.server_port, query.client_port)
        self.buffer = bytearray()
        self.connected = False
        try:
            code = self.sock.connect_ex((str(target.address), target.port))
        except OSError as err:  # e.g. no route, no IPv6
            self.sock.close()
            raise ForwardFailed(f"cannot connect: {err.strerror}") from None
        if code not in (0, errno.EINPROGRESS):
            self.sock.close()
            raise ForwardFailed(f"cannot connect: {os.strerror(code)}")

    @property
    def events(self) -> int:
        """What to wait for: writable until the query is sent, then readable."""
        return selectors.EVENT_WRITE if self.output else selectors.EVENT_READ

    def handle(self, mask: int) -> bytes | None:
        """Go on after the selector reported `mask`; the reply line once complete (end of
        line removed), else None. ForwardFailed when the server fails to answer."""
        if not self.connected:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise ForwardFailed(f"cannot connect: {os.strerror(code)}")
            self.connected = True
        try:
            if self.output:
                sent = self.sock.send(self.output)
                self.output = self.output[sent:]
                return None
            data = self.sock.recv(MAX_LINE + 2)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            raise ForwardFailed(f"connection failed: {err.strerror}") from None
        if not data:
            raise ForwardFailed("closed without a complete answer")
        self.buffer += data
        end = self.buffer.find(b"\n")
        if end >= 0:
            return bytes(self.buffer[:end]).rstrip(b"\r")
        if len(self.buffer) > MAX_LINE:
            raise ForwardFailed(f"no end of line in {MAX_LINE} bytes")
        return None

    def close(self) -> None:
        self.sock.close()


def forward_blocking(responder: Responder, query: Query, answer: Answer, timeout: float) -> Answer:
    """Carry out the forward of `answer` while the caller waits, for at most `timeout`
    seconds (the daemon does it inside its loop; `lookup` and inetd mode, here)."""
    assert answer.forward is not None
    deadline = time.monotonic() + timeout
    line: bytes | None = None
    failure = ""
    try:
        client = ForwardClient(answer.forward.target, answer.forward.ask)
    except ForwardFailed as err:
        return responder.finish_forward(query, answer, None, str(err))
    with selectors.DefaultSelector() as selector:
        selector.register(client.sock, client.events)
        try:
            while line is None:
                left = deadline - time.monotonic()
                events = selector.select(left) if left > 0 else []
                if not events:
                    failure = f"no answer in {timeout:g}s"
                    break
                line = client.handle(events[0][1])
                selector.modify(client.sock, client.events)
        except ForwardFailed as err:
            failure = str(err)
        finally:
            selector.unregister(client.sock)
            client.close()
    final = responder.finish_forward(query, answer, line, failure)
    return replace(final, trace=answer.trace)
