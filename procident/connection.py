"""One client connection of the selectors daemon: its socket, its session, the replies the
kernel has not taken yet; and the heap of deadlines at which sessions are ticked."""

from __future__ import annotations

import heapq
import socket
from collections.abc import Iterator

from procident.admission import Ticket
from procident.lookup import Endpoint, IPAddress
from procident.responder import Answer
from procident.session import CLOSED, OUTPUT_BOUND, Ask, IdentSession

RECV_SIZE = 4096
MAX_OUTPUT = OUTPUT_BOUND  # pending reply bytes past which a client is no longer read
# The kernel's send buffer per connection: replies are at most ~600 bytes, and
# a fixed size keeps autotuning from parking megabytes for a client that never
# reads (on loopback it grows with the 64 KiB MSS).
SEND_BUFFER = 16384


class Connection:
    """One ident client connection: its socket, its session, what it waits for. The I/O
    methods return False when the socket failed (reset by the client): close it then."""

    __slots__ = (
        "sock",
        "peer",
        "local",
        "ticket",
        "session",
        "output",
        "events",
        "asking",
        "awaiting",
        "flush_by",
        "due",
        "retry_at",
        "race_until",
        "fallback",
        "looked",
    )

    def __init__(
        self,
        sock: socket.socket,
        peer: Endpoint,
        local: IPAddress,
        ticket: Ticket,
        session: IdentSession,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.local = local  # the address the client reached us on (RFC 1413 §3)
        self.ticket = ticket
        self.session = session
        self.output = bytearray()  # replies the kernel has not taken yet
        self.events = 0  # the selector events registered (0: not registered)
        # Read again at the next turn before it is registered (Server: most clients have
        # closed by then, and a closed one needs no registering at all).
        self.looked = False
        self.asking: Ask | None = None  # the session's Ask being answered
        self.awaiting: int | None = None  # the uid whose files the helper is reading
        self.flush_by: float | None = None  # closed: the time left to send its output
        self.due: float | None = None  # the deadline last put in the heap (Deadlines)
        # Waiting for a bouncer to write the owner's file (FILE_RACE_WAIT): when to look
        # again, until when, and the answer to send if no block comes.
        self.retry_at: float | None = None
        self.race_until: float | None = None
        self.fallback: Answer | None = None

    @property
    def deadline(self) -> float | None:
        if self.retry_at is not None:
            return self.retry_at
        return self.flush_by if self.session.phase is CLOSED else self.session.deadline

    def queue(self, line: bytes) -> bool:
        """Send one reply line, or keep it until the kernel takes it."""
        if self.output:
            self.output += line
            return True
        # One send per reply line: libident fails on replies that come in pieces.
        try:
            sent = self.sock.send(line, socket.MSG_DONTWAIT)  # (the socket may block)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # reset by the client: nothing more can reach it
            return False
        self.output += line[sent:]
        return True

    def flush(self) -> bool:
        """Send what is kept, as much as the kernel takes."""
        try:
            sent = self.sock.send(self.output, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:  # reset by the client
            return False
        del self.output[:sent]
        return True


class Deadlines:
    """When to tick each connection: a heap of (deadline, order, connection). An entry
    whose deadline is no longer the connection's (`due`) is stale and skipped."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Connection]] = []
        self.pushed = 0

    def next(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def schedule(self, conn: Connection, live: dict[Connection, None]) -> None:
        """Put the connection's deadline in the heap, if it moved. `live`: the open
        connections (stale entries are dropped when they outnumber them)."""
        deadline = conn.deadline
        if deadline is not None and deadline != conn.due:
            self.push(conn, deadline, live)

    def push(self, conn: Connection, deadline: float, live: dict[Connection, None]) -> None:
        # (server._pump has this inline: once per query)
        conn.due = deadline
        self.pushed += 1
        heapq.heappush(self.heap, (deadline, self.pushed, conn))
        if len(self.heap) > 4 * len(live) + 64:
            self.compact(live)

    def compact(self, live: dict[Connection, None]) -> None:
        """Drop the stale entries: each connection keeps its current deadline."""
        self.heap = [e for e in self.heap if e[2].due == e[0] and e[2] in live]
        heapq.heapify(self.heap)

    def due(self, now: float) -> Iterator[Connection]:
        """The connections whose deadline has come, each taken off the heap."""
        # self.heap each time: what the caller does with a connection may compact it.
        while self.heap and self.heap[0][0] <= now:
            due, _, conn = heapq.heappop(self.heap)
            if conn.due != due:
                continue  # its deadline moved
            conn.due = None
            yield conn
