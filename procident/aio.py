"""An ident server on an asyncio loop, answering from a program's own lookup.

    import asyncio, procident.aio

    def lookup(conn: procident.ConnectionId) -> str | None:
        return my_connections.get((conn.local.port, conn.remote.port))

    asyncio.run(procident.aio.serve_ident(lookup, "0.0.0.0", 113))

The protocol rules and limits are the daemon's (PROTOCOL.md and [limits] of
procident.toml(5)): the same query reader, one reply per line in order,
INVALID-PORT for ports out of range, 0,0:INVALID-PORT and close for a line that
is no port pair, close without reply past 1000 bytes without an end of line,
the idle timeout restarted by each reply, a cap on queries per connection, on
connections in all and per client (an IPv4 address or an IPv6 /64), and a
per-client query rate. A lookup may be a coroutine function: it is awaited for
at most `lookup_timeout` seconds, and UNKNOWN-ERROR answers when it fails or
runs late.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

from procident._embed import Lookup, failure_line, reply_from, reply_line
from procident.admission import Admission
from procident.answerlog import record_answer
from procident.config import LimitsConfig
from procident.lookup import ConnectionId, Endpoint, endpoint_from_sockaddr
from procident.policy import UNKNOWN_ERROR
from procident.protocol import Query
from procident.session import Ask, Close, IdentSession, Outcome, Send, rules_from

__all__ = ["IdentServer", "serve_ident", "start_ident_server"]

log = logging.getLogger(__name__)

_RECV_SIZE = 4096
_MAX_OUTPUT = 4096  # unsent reply bytes past which a client is no longer read


@dataclass
class IdentServer:
    """A running ident server: the asyncio.Server, and who is connected (admission)."""

    server: asyncio.Server
    lookup: Lookup
    limits: LimitsConfig
    lookup_timeout: float
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.limits)

    @property
    def connections(self) -> int:
        """Connections open now (those held only to be refused do not count)."""
        return self.admission.within

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets (for their addresses)."""
        return tuple(self.server.sockets)

    def close(self) -> None:
        """Stop listening; open connections end at their next step."""
        self.server.close()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()


async def start_ident_server(
    lookup: Lookup,
    host: str | None = "127.0.0.1",
    port: int = 113,
    *,
    limits: LimitsConfig | None = None,
    lookup_timeout: float = 5.0,
) -> IdentServer:
    """Listen on host:port (host None: every address) and answer ident queries from
    `lookup`; returns once listening. Close it with .close() and await .wait_closed()."""
    state: IdentServer | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert state is not None
        await _serve_connection(state, reader, writer)

    server = await asyncio.start_server(handle, host, port, limit=_RECV_SIZE)
    state = IdentServer(server, lookup, limits or LimitsConfig(), lookup_timeout)
    return state


async def serve_ident(
    lookup: Lookup,
    host: str | None = "127.0.0.1",
    port: int = 113,
    *,
    limits: LimitsConfig | None = None,
    lookup_timeout: float = 5.0,
) -> None:
    """Serve ident queries from `lookup` until cancelled."""
    server = await start_ident_server(
        lookup, host, port, limits=limits, lookup_timeout=lookup_timeout
    )
    try:
        await server.server.serve_forever()
    finally:
        server.close()
        await server.wait_closed()


async def _serve_connection(
    state: IdentServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One connection: a driver of IdentSession on the asyncio loop."""
    limits = state.limits
    loop = asyncio.get_running_loop()
    try:
        peer = endpoint_from_sockaddr(writer.get_extra_info("peername"))
        local = endpoint_from_sockaddr(writer.get_extra_info("sockname"))
    except (OSError, TypeError, ValueError):  # reset before we looked
        writer.close()
        return
    ticket = state.admission.admit(peer.address)
    if isinstance(ticket, str):
        state.admission.refused(ticket, loop.time())
        writer.close()
        return
    writer.transport.set_write_buffer_limits(high=_MAX_OUTPUT)
    rules = rules_from(limits, None, ticket.refused, ticket.once)
    allow = functools.partial(state.admission.allow, ticket)
    session = IdentSession(rules, loop.time(), allow)
    try:
        while True:
            backlog = writer.transport.get_write_buffer_size()
            action = session.next_action(loop.time(), backlog)
            if isinstance(action, Ask):
                conn = ConnectionId(
                    Endpoint(local.address, action.query.server_port),
                    Endpoint(peer.address, action.query.client_port),
                )
                line = await _answer(state, action.query, conn)
                session.answer(action.seq, Outcome(line, "lookup"), loop.time())
            elif isinstance(action, Send):
                record_answer(log, peer, action.record)
                writer.write(action.line)  # one write per reply: a single send where it fits
            elif isinstance(action, Close):
                record_answer(log, peer, action.record)
                await asyncio.wait_for(writer.drain(), limits.idle_timeout)
                return
            else:
                deadline = session.deadline
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    if session.wants_read(backlog):
                        data = await asyncio.wait_for(reader.read(_RECV_SIZE), wait)
                        session.receive_data(data, loop.time())
                    elif backlog >= rules.output_bound:
                        # A client that does not read its replies is not read either.
                        await asyncio.wait_for(writer.drain(), wait)
                    elif wait:
                        await asyncio.sleep(wait)  # a reply held for min_response_time
                except asyncio.TimeoutError:
                    pass
                session.tick(loop.time())
    except (asyncio.TimeoutError, ConnectionError):
        return
    finally:
        state.admission.release(ticket)
        writer.close()


async def _answer(state: IdentServer, query: Query, conn: ConnectionId) -> bytes:
    """The reply line for `query`, from the lookup, awaited for at most lookup_timeout."""
    try:
        result = state.lookup(conn)
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, state.lookup_timeout)
        return reply_line(query, reply_from(result))
    except asyncio.TimeoutError:
        log.warning(
            "lookup for %d,%d took more than %gs",
            query.server_port,
            query.client_port,
            state.lookup_timeout,
        )
        return reply_line(query, UNKNOWN_ERROR)
    except Exception as err:
        return failure_line(query, err)
