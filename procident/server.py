"""The selectors loop: listeners, sessions, timeouts, limits, signals.

Single-threaded. Each selector key's data is the callback for its file, so the
loop body never grows. Every per-connection resource is bounded: input (one
line plus one recv), parsed-but-unanswered queries (one recv's worth), output
(MAX_OUTPUT, after which the client is no longer read), lifetime (the idle
timeout, restarted only by a reply) and the number of connections.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import logging
import selectors
import signal
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

from procident._exchange import MALFORMED_REPLY
from procident.admission import RateLimiter, allowed, client_key
from procident.answerlog import log_answer
from procident.config import Config, ConfigError
from procident.forward import ForwardClient, ForwardFailed
from procident.homes import HELPER_TIMEOUT
from procident.lookup import ConnectionId, Endpoint, IPAddress, endpoint_from_sockaddr
from procident.metrics import MAX_HTTP_REQUEST, Metrics, http_response, write_textfile
from procident.policy import UNKNOWN_ERROR
from procident.process import Notifier
from procident.protocol import (
    ErrorReply,
    ErrorType,
    Event,
    InvalidPort,
    Malformed,
    Overlong,
    Query,
    QueryReader,
    format_reply,
)
from procident.responder import Answer, Responder

log = logging.getLogger(__name__)

RECV_SIZE = 4096
MAX_OUTPUT = 4096  # pending reply bytes past which a client is no longer read
# The kernel's send buffer per connection: replies are at most ~600 bytes, and
# a fixed size keeps autotuning from parking megabytes for a client that never
# reads (on loopback it grows with the 64 KiB MSS).
SEND_BUFFER = 16384
LISTEN_BACKLOG = 128
ACCEPT_BATCH = 64  # connections taken per readable listener, so no listener starves the rest
ACCEPT_PAUSE = 1.0  # seconds without accepting after EMFILE and the like
REFUSAL_LOG_INTERVAL = 10.0
MAX_SCRAPERS = 8  # metrics connections open at once
MAX_SCRAPERS_PER_CLIENT = 2  # of them, from one client (an IPv4 address, an IPv6 /64)
SCRAPE_TIMEOUT = 1.0  # seconds a metrics client has to send its request
MAX_OVERFLOW = 64  # connections over a cap kept open at once to be answered UNKNOWN-ERROR
# Sections bound at start: listeners and the account (root is gone by a
# reload), the lookup backend, the token key (readable by root only), and the
# metrics listener and textfile.
RESTART_ONLY = ("server", "lookup", "tokens", "metrics")
# accept() errors that mean "out of a resource": retrying at once would spin.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# accept() errors about one connection that went away before we took it.
_ABORTED = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}


def _rate_settings(config: Config) -> tuple[float, int, int]:
    limits = config.limits
    return limits.per_client_rate, limits.per_client_burst, limits.clients_tracked


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


class Session:
    """One ident client connection."""

    __slots__ = (
        "sock",
        "peer",
        "local",
        "key",
        "reader",
        "pending",
        "output",
        "deadline",
        "queries",
        "closing",
        "eof",
        "events",
        "forwarding",
        "refused",
        "asked_at",
        "held",
        "awaiting",
    )

    def __init__(self, sock: socket.socket, peer: Endpoint, local: IPAddress, deadline: float):
        self.sock = sock
        self.peer = peer
        self.local = local  # the address the client reached us on (RFC 1413 §3)
        self.key = client_key(peer.address)
        self.reader = QueryReader()
        self.pending: deque[Event] = deque()  # parsed, not yet answered
        self.output = bytearray()  # replies the kernel has not taken yet
        self.deadline = deadline
        self.queries = 0
        self.closing = False  # close once the output is sent
        self.eof = False  # the client will send nothing more
        self.events = 0  # the selector events registered (0: not registered)
        # An answer waiting for an application's ident server: (client, query, answer).
        self.forwarding: tuple[ForwardClient, Query, Answer] | None = None
        # Over a limit, with limits.over_limit = "error": the limit's name; its next
        # query is answered UNKNOWN-ERROR, then the connection is closed.
        self.refused = ""
        self.asked_at = 0.0  # when the query being answered was read
        self.held = b""  # a reply kept back until [reply] min_response_time has passed
        # A query whose owner's files the helper is reading: (query, uid).
        self.awaiting: tuple[Query, int] | None = None


class Server:
    """Serves ident queries on the given listening sockets until stopped."""

    def __init__(
        self,
        config: Config,
        responder: Responder,
        listeners: list[socket.socket],
        reload: Callable[[], Config] | None = None,
        clock: Callable[[], float] = time.monotonic,
        notifier: Notifier | None = None,
        metrics_listener: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        self.metrics = Metrics(getattr(getattr(responder, "backend", None), "name", "?"))
        responder.on_lookup = self.metrics.lookup
        self.metrics_listener = metrics_listener
        # Metrics clients: connection -> (request so far, deadline, client key); a few,
        # briefly, oldest first.
        self.scrapers: dict[socket.socket, tuple[bytes, float, object]] = {}
        self.next_textfile = clock() if config.metrics.textfile else None
        self.responder = responder
        self.listeners = listeners
        self.reload = reload
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        # Sessions in order of deadline, so expiry looks only at the first: one
        # idle timeout for all and deadlines that only move forward keep the
        # order when a session moves to the end (apply() keeps it on reload).
        self.sessions: OrderedDict[Session, None] = OrderedDict()
        self.per_client: dict[object, int] = {}
        self.overflow = 0  # sessions over a connection cap, only to be refused (see Session)
        # Sessions waiting for a forward, in order of its deadline (one timeout for all).
        self.forwards: OrderedDict[Session, float] = OrderedDict()
        # Inner connections (NAT) being asked about -> how many forwards ask: the loop guard.
        self.nat_asking: dict[tuple[Endpoint, Endpoint], int] = {}
        # Sessions whose query waits for the helper to read a user's files: uid -> them,
        # and uid -> when to answer without the files, in order (one timeout for all).
        self.file_waits: dict[int, list[Session]] = {}
        self.file_deadlines: OrderedDict[int, float] = OrderedDict()
        self.helper = getattr(getattr(responder, "accounts", None), "helper", None)
        # Replies kept back by [reply] min_response_time: (due, order, session).
        self.held: list[tuple[float, int, Session]] = []
        self.held_count = 0
        self.limiter = RateLimiter.for_limits(config.limits)
        self.resume_accepting_at: float | None = None
        self.pauses = 0
        self.pause_logged_at = float("-inf")
        self.refusals: dict[str, int] = {}
        self.refusal_logged_at: dict[str, float] = {}
        self.running = False
        self.signals: list[int] = []
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        for sock in (self._wakeup_r, self._wakeup_w):
            sock.setblocking(False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._drain_wakeup)
        self._listen()
        if metrics_listener is not None:
            metrics_listener.setblocking(False)
            self.selector.register(metrics_listener, selectors.EVENT_READ, self._accept_scraper)
        if self.helper is not None:
            self.selector.register(self.helper, selectors.EVENT_READ, self._on_helper)

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled}
        previous_fd = signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self.running = True
        where = ", ".join(str(endpoint_from_sockaddr(s.getsockname())) for s in self.listeners)
        log.info("serving on %s", where)
        self.notifier.notify("READY=1", f"STATUS=serving on {where}")
        try:
            while self.running:
                self.step()
        finally:
            self.notifier.notify("STOPPING=1")
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.close()

    def step(self, timeout: float | None = None) -> None:
        """One turn of the loop: wait for events (at most `timeout` seconds, or until the
        next deadline), handle them, then signals and deadlines."""
        wait = self._timeout()
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        events = self.selector.select(wait)
        with self.responder.batch():  # the queries of one turn may share a table read
            for key, mask in events:
                key.data(mask)
        self._handle_signals()
        self._tick(self.clock())

    def close(self) -> None:
        """Close every session and listener (writing the metrics textfile a last time)."""
        for session in list(self.sessions):
            self._close(session)
        if self.next_textfile is not None:
            self.write_textfile()
        for scraper in list(self.scrapers):
            self._close_scraper(scraper)
        if self.helper is not None and not self.helper.gone:
            self.selector.unregister(self.helper)
        if self.metrics_listener is not None:
            self.selector.unregister(self.metrics_listener)
            self.metrics_listener.close()
        for sock in self.listeners:
            if self.resume_accepting_at is None:
                self.selector.unregister(sock)
            sock.close()
        self.listeners = []
        self.selector.close()
        self._wakeup_r.close()
        self._wakeup_w.close()

    def _timeout(self) -> float | None:
        deadlines = []
        if self.sessions:
            deadlines.append(next(iter(self.sessions)).deadline)
        if self.forwards:
            deadlines.append(next(iter(self.forwards.values())))
        if self.file_deadlines:
            deadlines.append(next(iter(self.file_deadlines.values())))
        if self.held:
            deadlines.append(self.held[0][0])
        if self.resume_accepting_at is not None:
            deadlines.append(self.resume_accepting_at)
        if self.next_textfile is not None:
            deadlines.append(self.next_textfile)
        deadlines += [deadline for _, deadline, _ in self.scrapers.values()]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock())

    def _tick(self, now: float) -> None:
        while self.held and self.held[0][0] <= now:
            _, _, session = heapq.heappop(self.held)
            if session.held and session in self.sessions:
                line, session.held = session.held, b""
                self._queue(session, line)
                try:
                    self._advance(session)
                except Exception:
                    log.exception("unexpected error serving %s; closing it", session.peer)
                    self._close(session)
        while self.file_deadlines:
            uid, deadline = next(iter(self.file_deadlines.items()))
            if deadline > now:
                break
            self.responder.accounts.give_up(uid)
            self._files_came(uid)
        while self.forwards:
            session, deadline = next(iter(self.forwards.items()))
            if deadline > now:
                break
            self._forward_done(session, None, f"no answer in {self.config.forward.timeout:g}s")
        while self.sessions:
            session = next(iter(self.sessions))
            if session.deadline > now:
                break
            log.debug("closing %s: idle for %ds", session.peer, self.config.limits.idle_timeout)
            self.metrics.timed_out += 1
            self._close(session)
        for scraper, (_, deadline, _) in list(self.scrapers.items()):
            if deadline <= now:
                self._close_scraper(scraper)
        if self.next_textfile is not None and now >= self.next_textfile:
            self.write_textfile()
            self.next_textfile = now + self.config.metrics.interval
        if self.resume_accepting_at is not None and now >= self.resume_accepting_at:
            self.resume_accepting_at = None
            self._listen()

    # -- signals --------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _drain_wakeup(self, mask: int) -> None:
        try:
            while self._wakeup_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                log.info("%s", self.metrics.summary(self._open_connections()))
            else:
                log.info("stopping on %s", signal.Signals(signum).name)
                self.running = False

    def _reload(self) -> None:
        if self.reload is None:
            log.info("SIGHUP: nothing to reload")
            return
        self.notifier.reloading()
        try:
            config = self.reload()
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
        """Serve with a new configuration; [server] changes wait for a restart."""
        waiting = [
            name for name in RESTART_ONLY if getattr(config, name) != getattr(self.config, name)
        ]
        if waiting:
            log.warning(
                "%s settings take effect at the next start",
                ", ".join(f"[{name}]" for name in waiting),
            )
            # Keep describing what runs, so the next reload warns again.
            config = replace(config, **{name: getattr(self.config, name) for name in waiting})
        shorter = config.limits.idle_timeout < self.config.limits.idle_timeout
        if _rate_settings(config) != _rate_settings(self.config):
            self.limiter = RateLimiter.for_limits(config.limits)  # else buckets carry over
        if config.forward.timeout < self.config.forward.timeout:
            cap = self.clock() + config.forward.timeout
            for session, deadline in sorted(self.forwards.items(), key=lambda item: item[1]):
                self.forwards[session] = min(deadline, cap)
                self.forwards.move_to_end(session)
        self.config = config
        self.responder.config = config
        if shorter:
            # The new timeout applies to open connections too. Capping their
            # deadlines at now + timeout also keeps self.sessions in deadline
            # order: every deadline set from now on is at least that.
            cap = self.clock() + config.limits.idle_timeout
            for session in self.sessions:
                session.deadline = min(session.deadline, cap)
            for session in sorted(self.sessions, key=lambda s: s.deadline):
                self.sessions.move_to_end(session)

    # -- metrics --------------------------------------------------------------

    def _open_connections(self) -> int:
        """Client connections served now; those held only to be refused do not count."""
        return len(self.sessions) - self.overflow

    def render_metrics(self) -> str:
        return self.metrics.render(self._open_connections())

    def write_textfile(self) -> None:
        """Write the metrics to [metrics] textfile, atomically; a failure is logged."""
        path = self.config.metrics.textfile
        if not path:
            return
        try:
            write_textfile(path, self.render_metrics())
        except OSError as err:
            log.error("cannot write metrics to %s: %s", path, err.strerror)

    def _accept_scraper(self, mask: int) -> None:
        """Take a metrics client. The newest always gets a slot: one that holds connections
        open without asking (slots last SCRAPE_TIMEOUT) loses its own oldest once it holds
        MAX_SCRAPERS_PER_CLIENT, and the oldest of all goes when MAX_SCRAPERS are open; so
        idle connections, from one address or a few, cannot keep monitoring out."""
        assert self.metrics_listener is not None
        try:
            sock, address = self.metrics_listener.accept()
            key = client_key(endpoint_from_sockaddr(address).address)
        except (OSError, ValueError):
            return
        own = [other for other, (_, _, owner) in self.scrapers.items() if owner == key]
        if len(own) >= MAX_SCRAPERS_PER_CLIENT:
            self._close_scraper(own[0])
        elif len(self.scrapers) >= MAX_SCRAPERS:
            self._close_scraper(next(iter(self.scrapers)))
        sock.setblocking(False)
        self.scrapers[sock] = (b"", self.clock() + SCRAPE_TIMEOUT, key)
        self.selector.register(
            sock, selectors.EVENT_READ, functools.partial(self._on_scraper, sock)
        )
        self._on_scraper(sock, selectors.EVENT_READ)  # the request is often there already

    def _on_scraper(self, sock: socket.socket, mask: int) -> None:
        request, deadline, key = self.scrapers[sock]
        try:
            data = sock.recv(MAX_HTTP_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        request += data
        response = http_response(request, self.render_metrics()) if data else None
        if response is None and data and len(request) < MAX_HTTP_REQUEST:
            self.scrapers[sock] = (request, deadline, key)
            return
        if response is not None:
            with contextlib.suppress(OSError):
                sock.send(response)  # a few KiB: one send into a fresh socket's buffer
        self._close_scraper(sock)

    def _close_scraper(self, sock: socket.socket) -> None:
        del self.scrapers[sock]
        self.selector.unregister(sock)
        sock.close()

    # -- accepting ------------------------------------------------------------

    def _listen(self) -> None:
        for sock in self.listeners:
            self.selector.register(
                sock, selectors.EVENT_READ, functools.partial(self._accept, sock)
            )

    def _accept(self, listener: socket.socket, mask: int) -> None:
        if self.resume_accepting_at is not None:
            return  # paused by another listener earlier in this same turn
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in _ABORTED:
                    continue
                # Out of file descriptors or memory, or stranger: the pending
                # connection stays in the backlog and the listener readable, so
                # retrying now would spin.
                self._pause_accepting(err)
                return
            self._admit(sock, address)

    def _pause_accepting(self, err: OSError) -> None:
        now = self.clock()
        self.pauses += 1
        if now - self.pause_logged_at >= REFUSAL_LOG_INTERVAL:
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
        self.resume_accepting_at = self.clock() + ACCEPT_PAUSE

    def _admit(self, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            peer = endpoint_from_sockaddr(address)
            local = endpoint_from_sockaddr(sock.getsockname()).address
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:  # reset before we looked
            sock.close()
            return
        limits = self.config.limits
        key = client_key(peer.address)
        if not allowed(peer.address, self.config.access):
            self._refuse(sock, peer, "access")
            return
        over = ""
        if len(self.sessions) - self.overflow >= limits.max_connections:
            over = "max_connections"
        elif self.per_client.get(key, 0) >= limits.per_client_connections:
            over = "per_client_connections"
        if over and (limits.over_limit == "close" or self.overflow >= MAX_OVERFLOW):
            self._refuse(sock, peer, over)
            return
        session = Session(sock, peer, local, self.clock() + limits.idle_timeout)
        self.sessions[session] = None
        if over:
            # over_limit = "error": its query gets UNKNOWN-ERROR. Such sessions are
            # few (MAX_OVERFLOW) and count against no cap, so they hold no client back.
            self._refuse(None, peer, over)
            session.refused = over
            self.overflow += 1
        else:
            self.per_client[key] = self.per_client.get(key, 0) + 1
        session.events = selectors.EVENT_READ
        self.selector.register(sock, session.events, functools.partial(self._on_event, session))
        # Clients send their query right after connecting: read it now, in this turn
        # (and its lookup batch), instead of a turn later.
        self._on_event(session, selectors.EVENT_READ)

    def _refuse(self, sock: socket.socket | None, peer: Endpoint, limit: str) -> None:
        if sock is not None:
            sock.close()
        # A flood must not flood the log too: per limit, one line per interval, with a count.
        self.metrics.refused[limit] += 1
        self.refusals[limit] = self.refusals.get(limit, 0) + 1
        now = self.clock()
        if now - self.refusal_logged_at.get(limit, float("-inf")) >= REFUSAL_LOG_INTERVAL:
            if limit == "access":
                what = "connection(s) from clients the [access] lists refuse"
            elif limit == "per_client_rate":
                what = "query(s) over limits.per_client_rate"
            else:
                what = f"connection(s) over limits.{limit}"
            log.warning("refused %d %s (latest from %s)", self.refusals[limit], what, peer.address)
            self.refusals[limit] = 0
            self.refusal_logged_at[limit] = now

    # -- sessions -------------------------------------------------------------

    def _on_event(self, session: Session, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._send(session)
            if mask & selectors.EVENT_READ and session in self.sessions:
                self._receive(session)
            if session in self.sessions:
                self._advance(session)
        except Exception:
            # A bug must cost one connection, never the daemon.
            log.exception("unexpected error serving %s; closing it", session.peer)
            self._close(session)

    def _receive(self, session: Session) -> None:
        try:
            data = session.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(session)
            return
        if not data:
            session.eof = True  # half-closed: answer what came, then close
            return
        session.pending.extend(session.reader.feed(data))

    def _advance(self, session: Session) -> None:
        """Answer queued queries while the client keeps up, then set what to wait for."""
        while (
            session.pending
            and not session.closing
            and session.forwarding is None
            and session.awaiting is None
            and not session.held
            and len(session.output) < MAX_OUTPUT
        ):
            self._answer(session, session.pending.popleft())
        busy = session.forwarding is not None or session.awaiting is not None or bool(session.held)
        if session.refused == "max_queries_per_connection" and not session.pending and not busy:
            session.closing = True  # no query waits to hear it is one too many
        if session.closing and not busy:
            session.pending.clear()
        if session not in self.sessions:
            return
        # Replies go out in query order: what arrives during a forward waits in
        # `pending` (one recv's worth at most: reading stops while it is not empty).
        wants_read = not (session.closing or session.eof or session.pending)
        wants_read = wants_read and len(session.output) < MAX_OUTPUT
        events = (selectors.EVENT_READ if wants_read else 0) | (
            selectors.EVENT_WRITE if session.output else 0
        )
        if not events and not busy:
            self._close(session)  # nothing more to read or send
        elif events != session.events:
            callback = functools.partial(self._on_event, session)
            if not events:
                self.selector.unregister(session.sock)
            elif not session.events:
                self.selector.register(session.sock, events, callback)
            else:
                self.selector.modify(session.sock, events, callback)
            session.events = events

    def _answer(self, session: Session, event: Event) -> None:
        if isinstance(event, Overlong):
            self.metrics.overlong += 1
            log.info("closing %s: line longer than the limit", session.peer)
            session.closing = True
            return
        if isinstance(event, Malformed):
            self.metrics.malformed += 1
            log.info("answer client=%s query=malformed reply=INVALID-PORT", session.peer.address)
            self._queue(session, MALFORMED_REPLY)
            session.closing = True
            return
        limits = self.config.limits
        session.queries += 1
        session.asked_at = self.clock()
        if session.refused:
            # Over a cap, with over_limit = "error": this answer, then close.
            session.closing = True
            line = format_reply(event.server_port, event.client_port, UNKNOWN_ERROR)
            self._log_answer(session, event, line, f"limits.{session.refused}")
            self._reply(session, line)
            return
        if session.queries >= limits.max_queries_per_connection:
            if limits.over_limit == "error":
                session.refused = "max_queries_per_connection"
            else:
                session.closing = True
        if not self.limiter.allow(session.key, self.clock()):
            self._refuse(None, session.peer, "per_client_rate")
            if self.config.limits.over_limit == "close":
                session.closing = True
                return
            line = format_reply(event.server_port, event.client_port, UNKNOWN_ERROR)
        elif isinstance(event, InvalidPort):
            line = format_reply(
                event.server_port, event.client_port, ErrorReply(ErrorType.INVALID_PORT)
            )
            self._log_answer(session, event, line, "port-range")
        else:
            self._resolve(session, event)
            return
        self._reply(session, line)

    def _resolve(self, session: Session, query: Query) -> None:
        """Answer a query that passed the limits: now, or once a forward or the owner's
        files come (then this runs again)."""
        answer = self._respond(session, query)
        if answer.pending is not None:
            uid = answer.pending
            session.awaiting = (query, uid)
            self.file_waits.setdefault(uid, []).append(session)
            if uid not in self.file_deadlines:
                self.file_deadlines[uid] = self.clock() + HELPER_TIMEOUT
            return
        if answer.forward is not None:
            self._forward(session, query, answer)
            return
        assert answer.line is not None
        self._log_answer(session, query, answer.line, answer.rule, answer)
        self._reply(session, answer.line)

    # -- users' files, read by the helper -------------------------------------

    def _on_helper(self, mask: int) -> None:
        assert self.helper is not None
        for uid in self.responder.accounts.collect(self.clock()):
            self._files_came(uid)
        if self.helper.gone:
            log.error("the user-file helper has exited; users' files are no longer read")
            self.selector.unregister(self.helper)
            for uid in list(self.file_deadlines):
                self.responder.accounts.give_up(uid)
                self._files_came(uid)

    def _files_came(self, uid: int) -> None:
        """The files of `uid` came, or will not in time: answer the queries waiting."""
        self.file_deadlines.pop(uid, None)
        waiting = self.file_waits.pop(uid, [])
        try:
            self._answer_waiting(waiting)
        finally:
            self.responder.accounts.settle(uid)

    def _answer_waiting(self, waiting: list[Session]) -> None:
        for session in waiting:
            if session.awaiting is None or session not in self.sessions:
                continue
            query, _ = session.awaiting
            session.awaiting = None
            try:
                self._resolve(session, query)
                if session in self.sessions:
                    self._advance(session)
            except Exception:
                log.exception("unexpected error serving %s; closing it", session.peer)
                self._close(session)

    def _reply(self, session: Session, line: bytes) -> None:
        """Send the reply to a well-formed query, or keep it back until
        [reply] min_response_time has passed since the query was read: hidden,
        absent and found owners then take the same minimum time to answer."""
        due = session.asked_at + self.config.reply.min_response_time
        if due <= self.clock():
            self._queue(session, line)
            return
        session.held = line
        self.held_count += 1
        heapq.heappush(self.held, (due, self.held_count, session))

    # -- forwards -------------------------------------------------------------

    def _forward(self, session: Session, query: Query, answer: Answer) -> None:
        assert answer.forward is not None
        nat = answer.forward.nat
        # The loop guard: gateways that forward to each other in a circle would pass one
        # query around until every timeout ran out. A query forwarded by a gateway about
        # an inner connection this daemon is already asking about is such a circle (or a
        # repeat), and is not forwarded again.
        if nat is not None and nat.from_gateway and nat.key in self.nat_asking:
            failure = f"loop guard: already asking about {nat.inner.local}"
            self._finish_forward(session, query, answer, None, failure)
            return
        try:
            client = ForwardClient(answer.forward.target, answer.forward.ask)
        except ForwardFailed as err:
            self._finish_forward(session, query, answer, None, str(err))
            return
        if nat is not None:
            self.nat_asking[nat.key] = self.nat_asking.get(nat.key, 0) + 1
        session.forwarding = (client, query, answer)
        self.forwards[session] = self.clock() + self.config.forward.timeout
        self.selector.register(
            client.sock, client.events, functools.partial(self._on_forward, session)
        )

    def _on_forward(self, session: Session, mask: int) -> None:
        assert session.forwarding is not None
        client = session.forwarding[0]
        try:
            line = client.handle(mask)
        except ForwardFailed as err:
            self._forward_done(session, None, str(err))
            return
        except Exception:
            log.exception("unexpected error forwarding to %s", client.target)
            self._forward_done(session, None, "internal error")
            return
        if line is not None:
            self._forward_done(session, line, "")
        else:
            self.selector.modify(
                client.sock, client.events, functools.partial(self._on_forward, session)
            )

    def _forward_done(self, session: Session, line: bytes | None, failure: str) -> None:
        """The forward of `session` has an answer `line`, or failed: reply, then go on."""
        assert session.forwarding is not None
        client, query, answer = session.forwarding
        self.metrics.forwards["answered" if line is not None else "failed"] += 1
        self._drop_forward(session)
        self._finish_forward(session, query, answer, line, failure)
        if session in self.sessions:
            try:
                self._advance(session)
            except Exception:
                log.exception("unexpected error serving %s; closing it", session.peer)
                self._close(session)

    def _drop_forward(self, session: Session) -> None:
        if session.forwarding is None:
            return
        client, _, answer = session.forwarding
        session.forwarding = None
        del self.forwards[session]
        nat = answer.forward.nat if answer.forward is not None else None
        if nat is not None:
            count = self.nat_asking.pop(nat.key) - 1
            if count:
                self.nat_asking[nat.key] = count
        self.selector.unregister(client.sock)
        client.close()

    def _finish_forward(
        self, session: Session, query: Query, answer: Answer, line: bytes | None, failure: str
    ) -> None:
        final = self.responder.finish_forward(query, answer, line, failure)
        assert final.line is not None
        self._log_answer(session, query, final.line, final.rule, final)
        self._reply(session, final.line)

    def _respond(self, session: Session, query: Query) -> Answer:
        conn = ConnectionId(
            local=Endpoint(session.local, query.server_port),
            remote=Endpoint(session.peer.address, query.client_port),
        )
        return self.responder.respond(query, conn, self.clock())

    def _queue(self, session: Session, line: bytes) -> None:
        self.metrics.reply(line)
        # The idle timer restarts after each reply (PROTOCOL.md).
        session.deadline = self.clock() + self.config.limits.idle_timeout
        self.sessions.move_to_end(session)
        if session.output:
            session.output += line
            return
        # One send per reply line: libident fails on replies that come in pieces.
        try:
            sent = session.sock.send(line)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            session.closing = True
            return
        session.output += line[sent:]

    def _send(self, session: Session) -> None:
        try:
            sent = session.sock.send(session.output)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            session.output.clear()
            session.closing = True
            return
        del session.output[:sent]

    def _close(self, session: Session) -> None:
        if session not in self.sessions:
            return
        del self.sessions[session]
        self._drop_forward(session)
        if session.awaiting is not None:
            waiting = self.file_waits.get(session.awaiting[1], [])
            if session in waiting:
                waiting.remove(session)
            session.awaiting = None
        session.held = b""  # its entry in self.held is skipped when due
        if session.refused in ("max_connections", "per_client_connections"):
            self.overflow -= 1
        else:
            count = self.per_client[session.key] - 1
            if count:
                self.per_client[session.key] = count
            else:
                del self.per_client[session.key]
        if session.events:
            self.selector.unregister(session.sock)
        session.sock.close()
        if self.resume_accepting_at is not None:
            # Paused for want of a file descriptor: one is free now.
            self.resume_accepting_at = None
            self._listen()

    def _log_answer(
        self,
        session: Session,
        query: Query | InvalidPort,
        line: bytes,
        rule: str,
        answer: Answer | None = None,
    ) -> None:
        peer = session.peer.address
        names = self.config.log.user_names
        log_answer(log, peer, query.server_port, query.client_port, line, rule, answer, names)
