"""The session state machine (procident.session), fed bytes, answers and time directly.

The shared protocol table runs here whole, one byte at a time, in random chunks and with
trailing data after a closing line; the other tests pin one rule each: held replies,
the idle timeout, caps, rates, the output bound and the terminal CLOSED state.
"""

from __future__ import annotations

import random

import pytest
from protocol_table import ALICE, PROTOCOL_TABLE

from procident.protocol import ErrorReply, ErrorType, Query, UserIdReply, format_reply
from procident.session import (
    CLOSED,
    FIRST_QUERY_GRACE,
    NEED_DATA,
    OPEN,
    PAUSED,
    Ask,
    Close,
    IdentSession,
    Outcome,
    Send,
    SessionRules,
)


def lookup(query: Query) -> Outcome:
    """alice owns 40001,6667; nothing else exists (the table's lookup)."""
    if (query.server_port, query.client_port) == (40001, 6667):
        reply = UserIdReply("alice", "UNIX")
        rule = "default"
    else:
        reply, rule = ErrorReply(ErrorType.NO_USER), "no-connection"
    return Outcome(format_reply(query.server_port, query.client_port, reply), rule)


class Driver:
    """The smallest driver: reads pieces while the session wants them (a lookup under way
    included: the client's bytes keep coming meanwhile, as over a socket), answers an Ask
    once there is nothing more to read, writes each Send, and moves time to the
    session's deadline when it waits."""

    def __init__(self, rules: SessionRules | None = None, allow=lambda now: True) -> None:
        self.now = 100.0
        self.session = IdentSession(rules or SessionRules(), self.now, allow)
        self.out = bytearray()
        self.sends: list[Send] = []
        self.closed: Close | None = None
        self.asking: Ask | None = None

    def pump(self) -> None:
        while self.closed is None:
            action = self.session.next_action(self.now, 0)
            if isinstance(action, Ask):
                self.asking = action
                return
            elif isinstance(action, Send):
                self.out += action.line
                self.sends.append(action)
            elif isinstance(action, Close):
                self.closed = action
            else:
                return

    def answer(self) -> None:
        assert self.asking is not None
        ask, self.asking = self.asking, None
        self.session.answer(ask.seq, lookup(ask.query), self.now)

    def run(self, pieces: list[bytes], half_close: bool) -> bytes:
        pending = list(pieces) + ([b""] if half_close else [])
        for _ in range(10_000):
            self.pump()
            if self.closed is not None:
                break
            if pending and self.session.wants_read():
                self.session.receive_data(pending.pop(0), self.now)
                continue
            if self.asking is not None:
                self.answer()
                continue
            deadline = self.session.deadline
            assert deadline is not None, "waiting with no deadline and nothing to read"
            self.now = max(self.now, deadline)
            self.session.tick(self.now)
        assert self.closed is not None and self.session.phase is CLOSED
        assert self.session.next_action(self.now) is PAUSED  # terminal: nothing more
        return bytes(self.out)


def chunked(data: bytes, how: str, seed: int = 1413) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytewise":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    pieces, at = [], 0
    while at < len(data):
        size = rng.randint(1, 7)
        pieces.append(data[at : at + size])
        at += size
    return pieces


@pytest.mark.parametrize("how", ["whole", "bytewise", "random"])
@pytest.mark.parametrize(
    ("data", "half_close", "expected"),
    [case[1:] for case in PROTOCOL_TABLE],
    ids=[case[0] for case in PROTOCOL_TABLE],
)
def test_protocol_table(data: bytes, half_close: bool, expected: bytes, how: str) -> None:
    """The shared table gives the same bytes however the input is split."""
    assert Driver().run(chunked(data, how), half_close) == expected


@pytest.mark.parametrize(
    ("closing", "expected"),
    [
        (b"abc\r\n", b"0,0:ERROR:INVALID-PORT\r\n"),
        (b"1" * 1001, b""),
    ],
    ids=["malformed", "overlong"],
)
def test_nothing_after_a_closing_line(closing: bytes, expected: bytes) -> None:
    """Bytes after a malformed or overlong line, even whole queries, are never answered."""
    for how in ("whole", "bytewise", "random"):
        data = b"1,1\r\n" + closing + b"40001,6667\r\n" * 3
        assert Driver().run(chunked(data, how), True) == b"1,1:ERROR:NO-USER\r\n" + expected


def test_the_query_past_the_cap_is_refused_however_the_bytes_are_split() -> None:
    """With over_limit = "error", a complete line received before the capping query's
    reply hears UNKNOWN-ERROR, whether it came in the same piece or a later one; none
    comes once the cap is answered."""
    rules = SessionRules(max_queries=2)
    for pieces in ([b"1,1\r\n1,1\r\n1,1\r\n"], [b"1,1\r\n", b"1,1\r\n", b"1,1\r\n"]):
        driver = Driver(rules)
        session = driver.session
        for piece in pieces:
            session.receive_data(piece, driver.now)
        # Every piece came before any reply (the driver read while a lookup was out).
        driver.run([], False)
        assert bytes(driver.out) == b"1,1:ERROR:NO-USER\r\n" * 2 + b"1,1:ERROR:UNKNOWN-ERROR\r\n"
        assert driver.closed is not None and driver.closed.reason == "refused"
        assert driver.sends[-1].record.rule == "limits.max_queries_per_connection"
    driver = Driver(rules)
    driver.session.receive_data(b"1,1\r\n1,1\r\n", driver.now)
    driver.run([], False)
    assert driver.closed is not None and driver.closed.reason == "done"


def test_held_replies_wait_keep_their_order_and_are_not_cut_by_the_idle_timeout() -> None:
    """With min_response_time, every reply waits that long after its query was read, in
    order, and a reply that falls due after the idle deadline is still sent."""
    rules = SessionRules(idle_timeout=1.0, min_response_time=0.8)
    driver = Driver(rules)
    session = driver.session
    driver.now += 0.9  # the query arrives 0.1 s before the idle deadline
    session.receive_data(b"1,1\r\n40001,6667\r\n", driver.now)
    driver.pump()
    driver.answer()
    driver.pump()
    assert driver.out == b"" and session.deadline == pytest.approx(driver.now + 0.8)
    driver.now += 0.5
    session.tick(driver.now)  # past the first idle deadline: not closed, still held
    driver.pump()
    assert driver.out == b"" and driver.closed is None
    driver.now += 0.3
    session.tick(driver.now)
    driver.pump()  # due; the next query is asked only now, and held in its turn
    assert driver.out == b"1,1:ERROR:NO-USER\r\n" and driver.asking is not None
    driver.answer()
    driver.pump()
    assert driver.out == b"1,1:ERROR:NO-USER\r\n"
    driver.now += 0.8
    session.tick(driver.now)
    driver.pump()
    assert driver.out == b"1,1:ERROR:NO-USER\r\n" + ALICE and driver.closed is None


def test_the_idle_timeout_does_not_run_while_an_ask_is_out() -> None:
    """A lookup (or forward) that outlasts the idle window still gets its reply sent; the
    window restarts after it."""
    session = IdentSession(SessionRules(idle_timeout=1.0), 0.0)
    session.receive_data(b"40001,6667\r\n", 0.5)
    ask = session.next_action(0.5)
    assert isinstance(ask, Ask) and session.deadline is None
    session.tick(5.0)
    assert session.phase is OPEN and session.next_action(5.0) is PAUSED
    session.answer(ask.seq, lookup(ask.query), 5.0)
    send = session.next_action(5.0)
    assert isinstance(send, Send) and send.line == ALICE
    assert session.next_action(5.0) is NEED_DATA and session.deadline == 6.0
    session.tick(6.0)
    close = session.next_action(6.0)
    assert isinstance(close, Close) and close.reason == "idle" and close.record.kind == "idle"


def test_an_answer_to_nothing_outstanding_is_dropped() -> None:
    """A late or repeated answer, or one after the session closed, changes nothing."""
    session = IdentSession(SessionRules(), 0.0)
    session.receive_data(b"1,1\r\n", 0.0)
    ask = session.next_action(0.0)
    assert isinstance(ask, Ask)
    session.answer(ask.seq + 1, lookup(ask.query), 0.0)  # not this one
    assert session.next_action(0.0) is PAUSED
    session.answer(ask.seq, lookup(ask.query), 0.0)
    session.answer(ask.seq, Outcome(b"forged\r\n", "x"), 0.0)
    sends = [session.next_action(0.0)]
    assert isinstance(sends[0], Send) and sends[0].line == b"1,1:ERROR:NO-USER\r\n"
    assert session.next_action(0.0) is NEED_DATA


def test_a_failed_lookup_is_unknown_error() -> None:
    """fail(): the query hears UNKNOWN-ERROR, and the session goes on."""
    session = IdentSession(SessionRules(), 0.0)
    session.receive_data(b"7,8\r\n1,1\r\n", 0.0)
    ask = session.next_action(0.0)
    assert isinstance(ask, Ask)
    session.fail(ask.seq, 0.0)
    send = session.next_action(0.0)
    assert isinstance(send, Send) and send.line == b"7,8:ERROR:UNKNOWN-ERROR\r\n"
    assert send.record.rule == "internal-error"
    assert isinstance(session.next_action(0.0), Ask)


def test_admitted_over_a_cap_the_first_query_hears_unknown_error() -> None:
    """rules.refused: the connection's first query hears UNKNOWN-ERROR with the cap as its
    rule, then the session closes."""
    driver = Driver(SessionRules(refused="per_client_connections"))
    assert driver.run([b"40001,6667\r\n1,1\r\n"], True) == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"
    assert driver.sends[0].record.rule == "limits.per_client_connections"
    assert driver.closed is not None and driver.closed.reason == "refused"


@pytest.mark.parametrize("how", ["whole", "bytewise", "random"])
def test_over_the_per_client_cap_a_connection_is_answered_once(how: str) -> None:
    """rules.once (admitted past per_client_connections): its first query is answered for
    real, then the session closes; a second query is never asked about."""
    driver = Driver(SessionRules(once=True))
    data = b"40001,6667\r\n1,1\r\n"
    assert driver.run(chunked(data, how), False) == b"40001,6667:USERID:UNIX:alice\r\n"
    assert driver.closed is not None and driver.closed.reason == "done"


def test_over_the_per_client_cap_a_connection_that_does_not_ask_goes_at_the_grace() -> None:
    """rules.once and no query: the session closes at FIRST_QUERY_GRACE, not the idle
    timeout, with a record the driver counts as a refusal by the cap."""
    session = IdentSession(SessionRules(idle_timeout=60, once=True), 0.0)
    assert session.deadline == FIRST_QUERY_GRACE
    session.tick(FIRST_QUERY_GRACE - 0.001)
    assert session.next_action(FIRST_QUERY_GRACE - 0.001) is NEED_DATA
    session.tick(FIRST_QUERY_GRACE)
    close = session.next_action(FIRST_QUERY_GRACE)
    assert isinstance(close, Close) and close.reason == "over-cap"
    assert close.record.rule == "limits.per_client_connections"
    assert session.phase is CLOSED


@pytest.mark.parametrize("over_limit", ["error", "close"])
def test_over_the_rate(over_limit: str) -> None:
    """allow() is asked once per well-formed query; over the rate, the query hears
    UNKNOWN-ERROR (error) or the connection closes without a reply (close)."""
    asked = []

    def allow(now: float) -> bool:
        asked.append(now)
        return len(asked) < 2

    driver = Driver(SessionRules(over_limit=over_limit), allow)
    out = driver.run([b"1,1\r\n2,2\r\n3,3\r\n"], True)
    if over_limit == "error":
        assert out == b"1,1:ERROR:NO-USER\r\n2,2:ERROR:UNKNOWN-ERROR\r\n3,3:ERROR:UNKNOWN-ERROR\r\n"
        assert [s.record.kind for s in driver.sends] == ["answer", "rate", "rate"]
        assert len(asked) == 3
    else:
        assert out == b"1,1:ERROR:NO-USER\r\n"
        assert driver.closed is not None and driver.closed.reason == "rate"


def test_the_output_bound_stops_answers_and_reading() -> None:
    """With the driver's unsent output at the bound, no more queries are taken and no
    more is read; once it drains, answering goes on."""
    session = IdentSession(SessionRules(output_bound=100), 0.0)
    session.receive_data(b"1,1\r\n2,2\r\n", 0.0)
    assert session.next_action(0.0, backlog=100) is PAUSED
    assert not session.wants_read(backlog=100)
    assert isinstance(session.next_action(0.0, backlog=99), Ask)


def test_a_shorter_idle_timeout_on_reload_applies_to_open_sessions() -> None:
    """update_rules: the new idle timeout counts from now at the latest; the cap the
    connection was admitted over stays."""
    session = IdentSession(SessionRules(idle_timeout=60, refused="max_connections"), 0.0)
    session.update_rules(SessionRules(idle_timeout=5), 10.0)
    assert session.deadline == 15.0 and session.rules.refused == "max_connections"
    session.update_rules(SessionRules(idle_timeout=100), 11.0)
    assert session.deadline == 15.0


def test_end_of_input_answers_what_came_then_closes() -> None:
    """b"" after queries: each is answered, then Close("done"); an incomplete line at the
    end is no query."""
    driver = Driver()
    assert driver.run([b"1,1\r\n40001,6667\r\n2,2"], True) == b"1,1:ERROR:NO-USER\r\n" + ALICE
    assert driver.closed is not None and driver.closed.reason == "done"


def test_hidden_absent_and_found_leave_at_the_same_time() -> None:
    """With min_response_time, a reply leaves exactly that long after its query was read,
    however long its lookup took (answered at once, or just before the time): the latency
    tells nothing about the owner."""
    delay = 0.05
    for took in (0.0, 0.001, 0.03, 0.0499):
        session = IdentSession(SessionRules(min_response_time=delay), 0.0)
        session.receive_data(b"40001,6667\r\n", 1.0)
        ask = session.next_action(1.0)
        assert isinstance(ask, Ask)
        session.answer(ask.seq, lookup(ask.query), 1.0 + took)
        assert session.next_action(1.0 + took) is PAUSED
        assert session.deadline == pytest.approx(1.0 + delay)
        assert session.next_action(1.0 + delay - 1e-6) is PAUSED
        send = session.next_action(1.0 + delay)
        assert isinstance(send, Send) and send.line == ALICE


def test_each_reply_is_one_send() -> None:
    """Pipelined queries, split anyhow: each Send is exactly one whole reply line (the
    drivers write each Send with one send: libident fails on replies in pieces)."""
    driver = Driver()
    data = b"1,1\r\n40001,6667\r\n0,5\r\n2,2\r\n"
    driver.run(chunked(data, "random", seed=7), True)
    assert [send.line.count(b"\n") for send in driver.sends] == [1, 1, 1, 1]
    assert all(send.line.endswith(b"\r\n") for send in driver.sends)
