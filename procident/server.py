"""The selectors loop: a thin driver of one IdentSession per client connection.

Single-threaded. Each selector key's data is the callback for its file, so the loop
body never grows. The rules of a connection are the session's (procident.session);
this module moves bytes and time between sockets and sessions, admits connections
(procident.admission), asks the responder, forwards and the user-file helper without
waiting, and hands every record to the one answer sink (procident.answerlog).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from procident.admission import Admission, Ticket, client_key, refusal_words
from procident.answering import Answering
from procident.answerlog import hold_lines, record_answer, release_lines
from procident.config import Config, ConfigError
from procident.connection import RECV_SIZE, SEND_BUFFER, Connection, Deadlines
from procident.listeners import Acceptor, ListenError, open_listeners
from procident.lookup import Endpoint, IPAddress, endpoint_from_sockaddr
from procident.metrics import Metrics
from procident.metrics_http import MetricsOutputs
from procident.process import Notifier, SignalWakeup
from procident.responder import Responder
from procident.session import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    Ask,
    Close,
    IdentSession,
    Record,
    Send,
    rules_from,
)

__all__ = ["ListenError", "Server", "client_key", "open_listeners"]

log = logging.getLogger(__name__)

_SILENT = frozenset({"done", "refused", "malformed"})  # Close records nothing logs or counts
REAP_EVERY = 0.01  # seconds between two looks at every connection, at max_connections


class Server:
    """Serves ident queries on the given listening sockets until stopped."""

    def __init__(
        self,
        config: Config,
        responder: Responder,
        listeners: list[socket.socket],
        reload: Callable[[Config], Config] | None = None,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        metrics_listener: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics(getattr(getattr(responder, "backend", None), "name", "?"))
        responder.on_lookup = self.metrics.lookup
        self.responder = responder
        self.listeners = listeners
        for listener in listeners:
            # Accepted connections inherit the listener's send buffer: set once here,
            # not by a setsockopt for every connection.
            with contextlib.suppress(OSError):
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.reload = reload
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self.admission = Admission(config.limits, config.access)
        self.rules = rules_from(config.limits, config.reply)  # for each new session
        self.sessions: dict[Connection, None] = {}  # every open connection, oldest first
        self.by_client: dict[int, set[Connection]] = {}
        # Connections over their client's cap that have not asked yet, oldest first.
        self.unasked: dict[Connection, None] = {}
        self.deadlines = Deadlines()  # when to tick each session
        self.later: list[Connection] = []  # connections to read next turn (see _pump)
        # Asks answered later: forwards, the user-file helper, a bouncer's late block.
        self.answering = Answering(
            responder,
            self.selector,
            clock,
            lambda: self.config.forward.timeout,
            self.metrics,
            self._continue,
            self.sessions.__contains__,
        )
        self.reaped_at = float("-inf")  # the last look for closed connections at max_connections
        self.running = False
        self.signals = SignalWakeup(self.selector)
        self.acceptor = Acceptor(self.listeners, self.selector, self._admit, clock)
        self.outputs = MetricsOutputs(
            metrics_listener, config.metrics, self.selector, self.render_metrics, clock
        )

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
        self.running = True
        where = ", ".join(str(endpoint_from_sockaddr(s.getsockname())) for s in self.listeners)
        log.info("serving on %s", where)
        self.notifier.notify("READY=1", f"STATUS=serving on {where}")
        try:
            with self.signals.installed():
                while self.running:
                    self.step()
        finally:
            self.notifier.notify("STOPPING=1")
            self.close()

    def step(self, timeout: float | None = None) -> None:
        """One turn of the loop: wait for events (at most `timeout` seconds, or until the
        next deadline), handle them, then signals and deadlines."""
        wait = self._timeout()
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        later, self.later = self.later, []
        events = self.selector.select(0 if later else wait)
        hold_lines()  # the turn's answer lines go out in one write
        try:
            # The queries of one turn may share a table read; gateways' wait for its end.
            with self.responder.batch(), self.answering.gathering():
                for key, mask in events:
                    key.data(mask)
                for conn in later:  # (see _pump) read now: closed, more, or register it
                    if conn in self.sessions and not conn.events:
                        self._on_event(conn, selectors.EVENT_READ)
        finally:
            release_lines()
        if self.signals.pending:
            self._handle_signals()
        self._tick(self.clock())

    def close(self) -> None:
        """Close every connection and listener (writing the metrics textfile a last time)."""
        for conn in list(self.sessions):
            self._close(conn)
        self.outputs.close()
        self.answering.close()
        self.acceptor.close()
        self.listeners = []
        self.selector.close()
        self.signals.close()

    def _timeout(self) -> float | None:
        # Once per turn: the common case (sessions only) costs no list.
        heap = self.deadlines.heap
        due = heap[0][0] if heap else None
        paused = self.acceptor.resume_at is not None
        if self.answering.waiting or paused:
            others = (self.answering.next_deadline(), self.acceptor.resume_at)
            due = min(d for d in (due, *others) if d is not None)
        outputs = self.outputs.deadlines()
        if outputs:
            due = min(outputs) if due is None else min(due, *outputs)
        return None if due is None else max(0.0, due - self.clock())

    def _tick(self, now: float) -> None:
        self.answering.tick(now)
        heap = self.deadlines.heap
        for conn in self.deadlines.due(now) if heap and heap[0][0] <= now else ():
            if conn not in self.sessions:
                continue
            if conn.retry_at is not None:
                conn.retry_at = None
                self._continue(conn, self.answering.retry)
                continue
            if conn.session.phase is CLOSED:
                self._close(conn)  # its last replies could not be sent in time
                continue
            conn.session.tick(now)
            self._pump(conn)
        self.outputs.tick(now)
        self.acceptor.tick(now)

    # -- signals and reloads --------------------------------------------------

    def _handle_signals(self) -> None:
        for signum in self.signals.take():
            if signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                log.info("%s", self.metrics.summary(self.admission.within))
            else:
                log.info("stopping on %s", signal.Signals(signum).name)
                self.running = False

    def _reload(self) -> None:
        if self.reload is None:
            log.info("SIGHUP: nothing to reload")
            return
        self.notifier.reloading()
        try:
            config = self.reload(self.config)  # procident.startup.reloader: what may change
        except ConfigError as err:
            log.error("reload failed, keeping the current configuration: %s", err)
            self.notifier.notify("READY=1", "STATUS=reload failed; serving as before")
            return
        except Exception:  # a bug in reading it must not end the daemon either
            log.exception("reload failed, keeping the current configuration")
            self.notifier.notify("READY=1", "STATUS=reload failed; serving as before")
            return
        self.apply(config)
        log.info("configuration reloaded")
        self.notifier.notify("READY=1", "STATUS=configuration reloaded")

    def apply(self, config: Config) -> None:
        """Serve with a new configuration (what a reload may change: see
        procident.startup.RELOAD_RULES)."""
        now = self.clock()
        self.admission.update(config.limits, config.access)
        if config.forward.timeout < self.config.forward.timeout:
            self.answering.shorten(now + config.forward.timeout)
        self.config = config
        self.responder.config = config
        self.rules = rules = rules_from(config.limits, config.reply)
        for conn in self.sessions:
            conn.session.update_rules(rules, now)
            self.deadlines.schedule(conn, self.sessions)

    # -- metrics --------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Client connections open now, those held only to be refused included."""
        return len(self.sessions)

    @property
    def forwards_under_way(self) -> int:
        """Queries waiting for another ident server's answer."""
        return len(self.answering.forwards)

    @property
    def unsent(self) -> int:
        """Reply bytes the kernel has not taken yet, over every connection."""
        return sum(len(conn.output) for conn in self.sessions)

    @property
    def accepting(self) -> bool:
        """False while accepting is paused for want of a file descriptor."""
        return self.acceptor.resume_at is None

    @property
    def nat_asking(self) -> int:
        """Inner connections being asked about by NAT forwards (the loop guard's table)."""
        return len(self.answering.forwards.nat_asking)

    def render_metrics(self) -> str:
        # (open connections: those held only to be refused do not count)
        return self.metrics.render(self.admission.within)

    # -- accepting ------------------------------------------------------------

    def _admit(self, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            peer = endpoint_from_sockaddr(address)
            local = endpoint_from_sockaddr(sock.getsockname()).address
            if sock.gettimeout() is not None:  # (a default timeout an embedder set)
                sock.setblocking(False)
            # Else the socket stays blocking, and every recv and send says MSG_DONTWAIT:
            # the same, without an ioctl for each connection.
        except OSError:  # reset before we looked
            sock.close()
            return
        admission = self.admission
        ticket = admission.admit(peer.address)
        if isinstance(ticket, str) or ticket.refused:
            # Full: connections closed but not yet seen make room, else the oldest that is
            # over its client's cap and has not asked (an idle hog's, not one within a cap).
            if ticket != "access" and (self._reap(peer.address) or self._evict()):
                if isinstance(ticket, Ticket):
                    admission.release(ticket)
                ticket = admission.admit(peer.address)
        elif admission.first_over and self._reap(peer.address):
            # The first over the client's cap: connections it closed may make room.
            admission.release(ticket)
            ticket = admission.admit(peer.address)
        if isinstance(ticket, str):
            sock.close()
            self._refused(ticket, peer)
            return
        if ticket.refused:
            self._refused(ticket.refused, peer)  # admitted only to hear UNKNOWN-ERROR
        key = ticket.key
        rules = self.rules
        if ticket.refused or ticket.once:
            rules = replace(rules, refused=ticket.refused, once=ticket.once)
        now = self.clock()
        session = IdentSession(rules, now, admission.rate_for(ticket))
        conn = Connection(sock, peer, local, ticket, session)
        self.sessions[conn] = None
        if ticket.once:
            self.unasked[conn] = None
        group = self.by_client.get(key)
        if group is None:
            self.by_client[key] = {conn}
        else:
            group.add(conn)
        # Clients send their query right after connecting: read it now, in this turn
        # (and its lookup batch), instead of a turn later.
        self._on_event(conn, selectors.EVENT_READ)

    def _reap(self, address: IPAddress) -> int:
        """Before refusing a connection over a cap, take the end of input of this client's
        connections (of every client's, at max_connections: every REAP_EVERY at most) that
        closed while this loop was busy accepting: a client that never has more than N
        connections open is never refused by a cap of N."""
        limits = self.admission.limits
        candidates: list[Connection] = list(self.by_client.get(client_key(address), ()))
        now = self.clock()
        if self.admission.within >= limits.max_connections and now - self.reaped_at >= REAP_EVERY:
            self.reaped_at = now
            candidates = list(self.sessions)
        reaped = 0
        for conn in candidates:
            if conn in self.sessions and conn.session.wants_read(len(conn.output)):
                self._on_event(conn, selectors.EVENT_READ)
                reaped += conn not in self.sessions
        return reaped

    def _evict(self) -> bool:
        """Close the oldest connection admitted over its client's cap that has not asked
        yet, to make room for a new one; False when there is none."""
        if not self.unasked:
            return False
        victim = next(iter(self.unasked))
        self._refused("per_client_connections", victim.peer)
        self._close(victim)
        return True

    def _refused(self, limit: str, peer: Endpoint) -> None:
        # A flood must not flood the log too: per limit, one line per interval, with a count.
        self.metrics.refused[limit] += 1
        count = self.admission.refused(limit, self.clock())
        if count:
            log.warning("refused %d %s (latest from %s)", count, refusal_words(limit), peer.address)

    # -- connections ----------------------------------------------------------

    def _on_event(self, conn: Connection, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE and not conn.flush():
                self._close(conn)  # reset by the client
            if mask & selectors.EVENT_READ and conn in self.sessions:
                session = conn.session
                if session.wants_read(len(conn.output)):  # else: closing, or queries wait
                    try:
                        data = conn.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        self._close(conn)
                    else:
                        if data:
                            conn.looked = False  # (see _pump) progress: it may wait again
                        session.receive_data(data, self.clock())  # b"": the client is done
            if conn in self.sessions:
                self._pump(conn)
        except Exception:
            # A bug must cost one connection, never the daemon.
            log.exception("unexpected error serving %s; closing it", conn.peer)
            self._close(conn)

    def _pump(self, conn: Connection) -> None:
        """Take the session's actions until it waits; then wait for what it needs."""
        session = conn.session
        sessions = self.sessions
        now = self.clock()
        action: object = PAUSED
        while conn in sessions:
            action = session.next_action(now, len(conn.output))
            # type() is: cheaper than isinstance, for every action of every query
            if type(action) is Send:
                record = action.record
                record_answer(log, conn.peer, record, self.config.log.user_names, self.metrics)
                if record.kind == "rate":
                    self._refused("per_client_rate", conn.peer)
                if not conn.queue(action.line):
                    self._close(conn)  # reset by the client
            elif type(action) is Ask:
                if conn.ticket.once:
                    self.unasked.pop(conn, None)
                conn.asking = action
                self.answering.resolve(conn)
                now = self.clock()
            elif type(action) is Close:
                if action.record.kind not in _SILENT:
                    self._sink(conn, action.record)
                if action.reason == "idle" or action.reason == "over-cap":
                    self._close(conn)  # a client that read nothing for that long: now
                    return
                conn.flush_by = now + self.config.limits.idle_timeout  # to send what is left
                break
            else:
                break
        if conn not in sessions:
            return
        output = conn.output
        if session.phase is CLOSED and not output:
            self._close(conn)  # everything said
            return
        # NEED_DATA: the session reads (it says so only below the output bound).
        reading = action is NEED_DATA or session.wants_read(len(output))
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if output else 0)
        if events != conn.events:
            # The callback is made here, not kept on the connection: that would be a
            # reference cycle, left to the cyclic garbage collector for every connection.
            if events == selectors.EVENT_READ and not conn.events and not conn.looked:
                # It waits for its client (who reads the answer and closes, as a rule):
                # read it again next turn, which comes at once, before registering it.
                # Most have closed by then: no epoll_ctl to add it, none to remove it.
                # Once per chunk of input: a client that sends nothing more is
                # registered at the next turn, so an idle one never spins the loop.
                conn.looked = True
                self.later.append(conn)
            else:
                if not events:
                    self.selector.unregister(conn.sock)
                elif not conn.events:
                    callback = functools.partial(self._on_event, conn)
                    self.selector.register(conn.sock, events, callback)
                else:
                    callback = functools.partial(self._on_event, conn)
                    self.selector.modify(conn.sock, events, callback)
                conn.events = events
        if conn.retry_at is not None:
            deadline: float | None = conn.retry_at
        else:
            deadline = conn.flush_by if session.phase is CLOSED else session.deadline
        if deadline is not None and deadline != conn.due:  # Deadlines.schedule, inline
            conn.due = deadline
            deadlines = self.deadlines
            deadlines.pushed += 1
            heapq.heappush(deadlines.heap, (deadline, deadlines.pushed, conn))
            if len(deadlines.heap) > 4 * len(sessions) + 64:
                deadlines.compact(sessions)

    def _sink(self, conn: Connection, record: Record) -> None:
        record_answer(log, conn.peer, record, self.config.log.user_names, self.metrics)
        if record.kind == "rate":
            self._refused("per_client_rate", conn.peer)
        elif record.kind == "over-cap":
            self._refused("per_client_connections", conn.peer)

    def _close(self, conn: Connection) -> None:
        if conn not in self.sessions:
            return
        del self.sessions[conn]
        if conn.ticket.once:
            self.unasked.pop(conn, None)
        clients = self.by_client[conn.ticket.key]
        clients.discard(conn)
        if not clients:
            del self.by_client[conn.ticket.key]
        self.admission.release(conn.ticket)
        self.answering.drop(conn)
        if conn.events:
            self.selector.unregister(conn.sock)
        conn.sock.close()
        if self.acceptor.resume_at is not None:
            self.acceptor.resume()  # paused for want of a file descriptor: one is free now

    def _continue(self, conn: Connection, step: Callable[[Connection], None]) -> None:
        """Run `step` (an answer came), then the session's next actions."""
        try:
            step(conn)
            if conn in self.sessions:
                self._pump(conn)
        except Exception:
            log.exception("unexpected error serving %s; closing it", conn.peer)
            self._close(conn)
