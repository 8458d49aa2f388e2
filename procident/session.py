"""One ident connection's rules, as a state machine without I/O (in the spirit of h11).

Bytes, the end of the client's input, the answers to its queries and the time go in;
actions come out, pulled one at a time with next_action():

- Ask(seq, query): this query needs an answer (the driver looks it up, forwards it,
  asks an application...) and gives it back with answer(seq, outcome, now), or says
  the lookup raised with fail(seq, now). Nothing else comes out while an Ask is out.
- Send(line, record): write this reply line, in one send where the kernel takes it.
- Close(reason, record): close once what was sent before has been written.
- NEED_DATA: nothing to do until more bytes (or the end of input) come.
- PAUSED: nothing to do until an answer comes, a held reply falls due (call tick at
  `deadline`), or the driver's unsent output shrinks below the bound.

After a Close the session is CLOSED for good: nothing more comes out. It owns what
PROTOCOL.md says about one connection: the query reader, replies in order, INVALID-PORT
and malformed lines, max_queries_per_connection and over_limit, the per-query rate
decision (`allow`, shared by the driver's connections), replies held until
[reply] min_response_time, the idle timeout (which does not run while an Ask is out or
a reply is held: the forward timeout bounds the one, min_response_time the other), the
output bound and the answer to a connection admitted over a cap. It does not look up,
log, count or admit: each Send and Close carries a Record for the driver's one sink.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

from procident.protocol import (
    ErrorReply,
    ErrorType,
    InvalidPort,
    Malformed,
    Overlong,
    Query,
    QueryReader,
    format_reply,
)

MALFORMED_REPLY = format_reply(0, 0, ErrorReply(ErrorType.INVALID_PORT))
_UNKNOWN = ErrorReply(ErrorType.UNKNOWN_ERROR)
_INVALID = ErrorReply(ErrorType.INVALID_PORT)
OUTPUT_BOUND = 4096  # unsent reply bytes past which the session takes no more queries


@dataclass(frozen=True, slots=True)
class SessionRules:
    """The rules of one connection, from [limits] and [reply] (see rules_from)."""

    idle_timeout: float = 60.0
    max_queries: int = 20
    over_limit: str = "error"  # or "close"
    min_response_time: float = 0.0
    output_bound: int = OUTPUT_BOUND
    # Admitted over this cap (limits.over_limit = "error"): the first query hears
    # UNKNOWN-ERROR, then the connection ends. Empty: admitted within every cap.
    refused: str = ""
    # Admitted over limits.per_client_connections: answered like any, but only if its
    # query comes within FIRST_QUERY_GRACE, and closed after that one reply (an IRC
    # server in a reconnection wave asks at once, and closes after the answer anyway).
    once: bool = False


def rules_from(
    limits: object, reply: object, refused: str = "", once: bool = False
) -> SessionRules:
    """SessionRules from a LimitsConfig and a ReplyConfig (config.py's dataclasses)."""
    return SessionRules(
        idle_timeout=float(getattr(limits, "idle_timeout")),  # noqa: B009
        max_queries=int(getattr(limits, "max_queries_per_connection")),  # noqa: B009
        over_limit=str(getattr(limits, "over_limit")),  # noqa: B009
        min_response_time=float(getattr(reply, "min_response_time", 0.0)),
        refused=refused,
        once=once,
    )


# Seconds a connection over limits.per_client_connections has to send its query. Clients
# send it right after connecting; a client holding connections idle loses those past the
# cap at this age.
FIRST_QUERY_GRACE = 2.0


class Outcome(NamedTuple):
    """The answer to an Ask: the reply line (CR LF included), the rule that chose it,
    and whatever the driver wants back in the Send's record (the responder's Answer)."""

    line: bytes
    rule: str
    detail: object = None


class Record(NamedTuple):
    """What the answer sink logs and counts for one Send or Close.

    kind, for a Send: "answer" (a looked-up reply), "port-range", "rate" (over the
    per-client rate), "refused" (over a cap, or past max_queries_per_connection),
    "malformed"; for a Close: "overlong", "idle", "over-cap" (admitted over
    limits.per_client_connections, and no query came in time), "malformed", "refused",
    "rate" (over the rate with over_limit = "close", without a reply) or "done" (the
    client's input ended, or the queries allowed were answered).
    """

    kind: str
    query: Query | InvalidPort | None = None
    line: bytes = b""
    rule: str = ""
    detail: object = None


class Ask(NamedTuple):
    seq: int
    query: Query


class Send(NamedTuple):
    line: bytes
    record: Record


class Close(NamedTuple):
    reason: str
    record: Record


class Wait(enum.Enum):
    NEED_DATA = "need data"
    PAUSED = "paused"


_DONE = Close("done", Record("done"))
NEED_DATA = Wait.NEED_DATA
PAUSED = Wait.PAUSED
Action = Ask | Send | Close | Wait


class Phase(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


OPEN, CLOSED = Phase.OPEN, Phase.CLOSED


class IdentSession:
    """The state of one ident connection; see the module's description.

    `allow(now)` is asked once per well-formed query: False means over the client's
    query rate (the limiter is shared by the driver's connections).
    """

    def __init__(
        self,
        rules: SessionRules,
        now: float,
        allow: Callable[[float], bool] | None = None,
    ) -> None:
        self.rules = rules
        self.allow = allow
        self.phase = OPEN
        self._reader = QueryReader()
        self._events: deque[Query | InvalidPort | Malformed | Overlong] = deque()
        self._eof = False
        self._queries = 0
        self._refused = rules.refused  # the next query hears UNKNOWN-ERROR, then close
        self._asking: Ask | None = None
        self._asked_at = 0.0
        self._seq = 0
        self._held: tuple[float, Send] | None = None  # a reply kept back, and when it is due
        self._closing: Close | None = None  # to come out once the replies before it have
        wait = min(FIRST_QUERY_GRACE, rules.idle_timeout) if rules.once else rules.idle_timeout
        self._idle_at = now + wait

    # -- in --------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """The next bytes from the client; b"" is the end of its input (a half-close):
        what came before is answered, then the session closes."""
        if self.phase is CLOSED or self._eof:
            return
        if not data:
            self._eof = True
            return
        self._events.extend(self._reader.feed(data))

    def answer(self, seq: int, outcome: Outcome, now: float) -> None:
        """The reply line to Ask `seq`."""
        ask = self._asking
        if ask is None or ask.seq != seq or self.phase is CLOSED:
            return  # an answer to nothing outstanding (the session moved on): dropped
        self._asking = None
        line = outcome.line
        send = Send(line, Record("answer", ask.query, line, outcome.rule, outcome.detail))
        self._held = (self._asked_at + self.rules.min_response_time, send)  # as _hold does

    def fail(self, seq: int, now: float) -> None:
        """The driver's lookup for Ask `seq` raised: UNKNOWN-ERROR (the driver logs why)."""
        ask = self._asking
        if ask is None or ask.seq != seq:
            return
        line = format_reply(ask.query.server_port, ask.query.client_port, _UNKNOWN)
        self.answer(seq, Outcome(line, "internal-error"), now)

    def tick(self, now: float) -> None:
        """Time has passed: a held reply may be due, the idle timeout may have run out."""
        if self.phase is CLOSED:
            return
        if (
            self._asking is None
            and self._held is None
            and self._closing is None
            and now >= self._idle_at
        ):
            if self.rules.once and not self._queries:
                # Over the client's cap, and no query: it was held idle, so it goes.
                record = Record("over-cap", rule="limits.per_client_connections")
                self._closing = Close("over-cap", record)
                return
            self._closing = Close("idle", Record("idle", rule=f"{self.rules.idle_timeout:g}"))

    def update_rules(self, rules: SessionRules, now: float) -> None:
        """A reload: the new rules apply from now on; a shorter idle timeout applies to the
        time already waited too. The cap this connection was admitted over stays."""
        self.rules = replace(rules, refused=self.rules.refused, once=self.rules.once)
        self._idle_at = min(self._idle_at, now + rules.idle_timeout)

    # -- out -------------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """When to call tick: a held reply's due time, else the idle deadline; None while
        an Ask is out (the driver bounds that wait) or once closed."""
        if self.phase is CLOSED or self._asking is not None:
            return None
        if self._held is not None:
            return self._held[0]
        return self._idle_at

    def wants_read(self, backlog: int = 0) -> bool:
        """Whether the driver should read from the client: not once its input ended or
        the session is closing, not while parsed queries wait (one read of look-ahead at
        most), and not while `backlog` unsent bytes reach the output bound."""
        return (
            self.phase is OPEN
            and not self._eof
            and self._closing is None
            and not self._reader.finished
            and not self._events
            and backlog < self.rules.output_bound
        )

    def next_action(self, now: float, backlog: int = 0) -> Action:
        """The next thing for the driver to do (see the module's description); `backlog`
        is how many reply bytes it has not managed to send yet."""
        if self.phase is CLOSED or self._asking is not None:
            return PAUSED
        if self._held is not None:
            due, send = self._held
            if due > now:
                return PAUSED
            self._held = None
            self._idle_at = now + self.rules.idle_timeout  # restarted by each reply
            return send
        if self._closing is not None:
            return self._close()
        if backlog >= self.rules.output_bound:
            return PAUSED  # a client that does not read is not answered further
        while self._events:
            action = self._next_event(self._events.popleft(), now)
            if action is not None:
                return action
        if self._refused == "max_queries_per_connection" or self._eof:
            # No query waits to hear it is one too many; or the client is done.
            self._closing = _DONE
            return self._close()
        return NEED_DATA

    # -- inside ----------------------------------------------------------------

    def _close(self) -> Close:
        assert self._closing is not None
        self.phase = CLOSED
        self._events.clear()
        return self._closing

    def _next_event(
        self, event: Query | InvalidPort | Malformed | Overlong, now: float
    ) -> Action | None:
        kind = type(event)
        if kind is Overlong:
            self._closing = Close("overlong", Record("overlong"))
            return self._close()
        if kind is Malformed:
            self._closing = Close("malformed", Record("malformed"))
            return Send(MALFORMED_REPLY, Record("malformed", None, MALFORMED_REPLY, "malformed"))
        assert isinstance(event, (Query, InvalidPort))
        if self._refused:
            # Over a cap, or one query past max_queries_per_connection: this answer, then
            # the connection ends (limits.over_limit = "error").
            line = format_reply(event.server_port, event.client_port, _UNKNOWN)
            self._closing = Close("refused", Record("refused"))
            rule = f"limits.{self._refused}"
            return self._reply_now(Send(line, Record("refused", event, line, rule)), now)
        self._queries += 1
        rules = self.rules
        if rules.once:
            self._closing = _DONE  # over the client's cap: this one reply, then the end
        elif self._queries >= rules.max_queries:
            if rules.over_limit == "error":
                self._refused = "max_queries_per_connection"
            else:
                self._closing = _DONE
        if self.allow is not None and not self.allow(now):
            return self._over_rate(event, now)
        if kind is InvalidPort:
            line = format_reply(event.server_port, event.client_port, _INVALID)
            return self._reply_now(Send(line, Record("port-range", event, line, "port-range")), now)
        assert isinstance(event, Query)
        self._seq += 1
        self._asking = Ask(self._seq, event)
        self._asked_at = now
        return self._asking

    def _over_rate(self, event: Query | InvalidPort, now: float) -> Action:
        if self.rules.over_limit == "close":
            self._closing = Close("rate", Record("rate", event))
            return self._close()
        line = format_reply(event.server_port, event.client_port, _UNKNOWN)
        return self._reply_now(
            Send(line, Record("rate", event, line, "limits.per_client_rate")), now
        )

    def _reply_now(self, send: Send, now: float) -> Action:
        """A reply decided without an Ask: it waits for min_response_time like any."""
        self._asked_at = now
        self._hold(send)
        return self.next_action(now)

    def _hold(self, send: Send) -> None:
        """Keep the reply back until min_response_time after its query was read: hidden,
        absent and found owners then take the same time to answer (held replies keep
        their order: nothing else comes out meanwhile). next_action sends it when due."""
        self._held = (self._asked_at + self.rules.min_response_time, send)
