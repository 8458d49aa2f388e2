"""How the selectors daemon answers a session's Ask, without waiting: from the responder
at once, or once another ident server (a forward), the user-file helper, or a bouncer
writing the owner's file late (responder.FILE_RACE_WAIT) has answered; a NAT gateway's
at the end of the loop's turn, with the turn's other gateway queries (one search of the
kernel's table for all). Part of the daemon's driver (server.py); the session's rules
stay the session's.
"""

from __future__ import annotations

import logging
import selectors
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from procident.accounts import FileWaits
from procident.connection import Connection
from procident.forwarding import Forwards
from procident.homes import HELPER_TIMEOUT
from procident.lookup import ConnectionId, Endpoint
from procident.metrics import Metrics
from procident.protocol import Query
from procident.responder import FILE_RACE_POLL, FILE_RACE_WAIT, Answer, Responder, waited
from procident.session import Outcome

log = logging.getLogger(__name__)


class Answering:
    """The Asks of the daemon's connections under way. `proceed(conn, step)` is the
    server's: run `step(conn)`, then take the session's next actions (a failure closes
    the connection only); `alive(conn)`: whether the connection is still open."""

    def __init__(
        self,
        responder: Responder,
        selector: selectors.BaseSelector,
        clock: Callable[[], float],
        forward_timeout: Callable[[], float],
        metrics: Metrics,
        proceed: Callable[[Connection, Callable[[Connection], None]], None],
        alive: Callable[[Connection], bool],
    ) -> None:
        self.responder = responder
        self.selector = selector
        self.clock = clock
        self.forward_timeout = forward_timeout
        self.metrics = metrics
        self.proceed = proceed
        self.alive = alive
        # Connections waiting for another ident server (and the NAT loop guard).
        self.forwards = Forwards(selector, self._forward_done)
        # Connections whose query waits for the helper to read a user's files.
        self.file_waits: FileWaits[Connection] = FileWaits()
        self.helper = getattr(getattr(responder, "accounts", None), "helper", None)
        if self.helper is not None:
            selector.register(self.helper, selectors.EVENT_READ, self._on_helper)
        # In a turn of the loop (gathering): the connections whose Ask comes from a NAT
        # gateway, answered together at the end of the turn (one search of the tables).
        self.gathered: list[tuple[Connection, ConnectionId]] | None = None

    def next_deadline(self) -> float | None:
        dues = [
            due
            for due in (self.forwards.next_deadline(), self.file_waits.next_deadline())
            if due is not None
        ]
        return min(dues) if dues else None

    @property
    def waiting(self) -> bool:
        """Whether any Ask waits for a forward or the helper (then next_deadline counts)."""
        return bool(self.forwards.deadlines or self.file_waits.deadlines)

    def tick(self, now: float) -> None:
        if self.file_waits.deadlines:
            for uid in self.file_waits.overdue(now):
                self.responder.accounts.give_up(uid)
                self._files_came(uid)
        if self.forwards.deadlines:
            self.forwards.expire(now, self.forward_timeout())

    def shorten(self, latest: float) -> None:
        """A reload shortened [forward] timeout: no forward under way waits past `latest`."""
        self.forwards.shorten(latest)

    def drop(self, conn: Connection) -> None:
        """`conn` is closing: forget what it waits for."""
        if self.forwards.under_way:
            self.forwards.drop(conn)
        if conn.awaiting is not None:
            self.file_waits.remove(conn.awaiting, conn)
            conn.awaiting = None

    def close(self) -> None:
        if self.helper is not None and not self.helper.gone:
            self.selector.unregister(self.helper)

    # -- answering -------------------------------------------------------------

    @contextmanager
    def gathering(self) -> Iterator[None]:
        """A turn of the loop: the Asks of NAT gateways wait for its end, then are
        answered together (Responder.prepare: one walk of the kernel's table for all of
        them instead of one each), in the order they came."""
        self.gathered = []
        try:
            yield
        finally:
            gathered, self.gathered = self.gathered, None
            if gathered:
                try:
                    self.responder.prepare([ident for _, ident in gathered])
                except Exception:  # a bug: each query then searches alone, none is lost
                    log.exception("unexpected error preparing %d gateway queries", len(gathered))
                for conn, _ in gathered:
                    if self.alive(conn) and conn.asking is not None:
                        self.proceed(conn, self.resolve)

    def resolve(self, conn: Connection) -> None:
        """Answer the session's Ask: now, or once a forward or the owner's files come
        (then this runs again)."""
        ask = conn.asking
        assert ask is not None
        query = ask.query
        ident = ConnectionId(
            local=Endpoint(conn.local, query.server_port),
            remote=Endpoint(conn.peer.address, query.client_port),
        )
        if self.gathered is not None and self.responder.from_gateway(ident):
            self.gathered.append((conn, ident))  # answered at the end of the turn
            return
        answer = self.responder.respond(query, ident, self.clock())
        if answer.pending is not None:
            conn.awaiting = answer.pending
            self.file_waits.add(answer.pending, conn, self.clock() + HELPER_TIMEOUT)
            return
        if answer.forward is not None:
            self._forward(conn, query, answer)
            return
        if answer.recheck:
            # No block for this connection in the owner's file: the bouncer may be writing
            # it right now. Look again for a moment (no client waits when a block matches).
            now = self.clock()
            if conn.race_until is None:
                conn.race_until = now + FILE_RACE_WAIT
            if now < conn.race_until:
                conn.fallback = answer
                conn.retry_at = min(now + FILE_RACE_POLL, conn.race_until)
                return
            answer = waited(answer)
        self._answered(conn, answer)

    def retry(self, conn: Connection) -> None:
        """The owner's file is looked at again, or the wait is over (conn.retry_at came)."""
        if conn.asking is None:
            return
        assert conn.race_until is not None and conn.fallback is not None
        if self.clock() >= conn.race_until:
            self._answered(conn, waited(conn.fallback))
            return
        if conn.fallback.owner is not None:
            self.responder.accounts.read_again(conn.fallback.owner.uid)
        self.resolve(conn)

    def _answered(self, conn: Connection, answer: Answer) -> None:
        conn.race_until = conn.fallback = None
        ask, conn.asking = conn.asking, None
        assert ask is not None and answer.line is not None
        conn.session.answer(ask.seq, Outcome(answer.line, answer.rule, answer), self.clock())

    # -- users' files, read by the helper ---------------------------------------

    def _on_helper(self, mask: int) -> None:
        assert self.helper is not None
        for uid in self.responder.accounts.collect(self.clock()):
            self._files_came(uid)
        if self.helper.gone:
            log.error("the user-file helper has exited; users' files are no longer read")
            self.selector.unregister(self.helper)
            for uid in self.file_waits.uids():
                self.responder.accounts.give_up(uid)
                self._files_came(uid)

    def _files_came(self, uid: int) -> None:
        """The files of `uid` came, or will not in time: answer the queries waiting."""
        try:
            for conn in self.file_waits.pop(uid):
                if conn.awaiting is None or not self.alive(conn):
                    continue
                conn.awaiting = None
                self.proceed(conn, self.resolve)
        finally:
            self.responder.accounts.settle(uid)

    # -- forwards ----------------------------------------------------------------

    def _forward(self, conn: Connection, query: Query, answer: Answer) -> None:
        deadline = self.clock() + self.forward_timeout()
        failure = self.forwards.start(conn, answer, deadline)
        if failure:
            self._answered(conn, self.responder.finish_forward(query, answer, None, failure))

    def _forward_done(
        self, owner: Hashable, answer: Answer, line: bytes | None, failure: str
    ) -> None:
        """The forward of `owner` (a connection) has an answer `line`, or failed: reply,
        then go on."""
        assert isinstance(owner, Connection) and owner.asking is not None
        query = owner.asking.query
        self.metrics.forwards["answered" if line is not None else "failed"] += 1

        def finish(conn: Connection) -> None:
            self._answered(conn, self.responder.finish_forward(query, answer, line, failure))

        self.proceed(owner, finish)
