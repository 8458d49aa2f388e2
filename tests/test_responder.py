"""The responder: lookup, policy, validation and the one choke point for surprises."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace

import pytest
from conftest import DictBackend

from procident.accounts import UserNames, passwd_name
from procident.config import Config, ReplyConfig
from procident.lookup import ConnectionId, Endpoint, Found, LookupFailed, SocketEntry, TcpState
from procident.protocol import Query
from procident.responder import Responder

LOCAL = Endpoint(ipaddress.IPv6Address("2001:db8::1"), 40001)
REMOTE = Endpoint(ipaddress.IPv6Address("2001:db8::7"), 6667)
CONN = ConnectionId(LOCAL, REMOTE)
QUERY = Query(40001, 6667)
NAMES = {1000: "alice", 1001: "bob\nmallory"}


def entry(uid: int, inode: int = 4242) -> SocketEntry:
    return SocketEntry(LOCAL, REMOTE, TcpState.ESTABLISHED, uid, inode)


def responder(table, reply: ReplyConfig | None = None, listening=frozenset()) -> Responder:
    config = replace(Config(), reply=reply or ReplyConfig())
    return Responder(DictBackend(table, listening), config, NAMES.get)


def test_answers_with_login_name() -> None:
    """A live socket is answered with its owner's name, and the answer keeps the evidence."""
    answer = responder({CONN: entry(1000)}).respond(QUERY, CONN, 0.0)
    assert answer.line == b"40001,6667:USERID:UNIX:alice\r\n"
    assert answer.owner is not None and answer.owner.uid == 1000 and answer.rule == "default"


def test_no_connection() -> None:
    """An absent connection is NO-USER."""
    assert responder({}).respond(QUERY, CONN, 0.0).line == b"40001,6667:ERROR:NO-USER\r\n"


def test_uid_zero_inode_zero_is_never_root() -> None:
    """A socket nobody holds (uid 0, inode 0) is NO-USER, never root."""
    answer = Responder(DictBackend({CONN: entry(0, inode=0)}), Config(), passwd_name).respond(
        QUERY, CONN, 0.0
    )
    assert answer.line == b"40001,6667:ERROR:NO-USER\r\n" and answer.owner is None


def test_unknown_uid_numeric() -> None:
    """A uid without a passwd entry is sent as a number with OS OTHER."""
    answer = responder({CONN: entry(3_000_000_000)}).respond(QUERY, CONN, 0.0)
    assert answer.line == b"40001,6667:USERID:OTHER:3000000000\r\n"


def test_mask_errors() -> None:
    """With mask_errors, NO-USER goes out as UNKNOWN-ERROR."""
    answer = responder({}, ReplyConfig(mask_errors=True)).respond(QUERY, CONN, 0.0)
    assert answer.line == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"


def test_inbound_hidden() -> None:
    """A connection to a listening port is HIDDEN-USER by default."""
    answer = responder({CONN: entry(1000)}, listening=frozenset({40001})).respond(QUERY, CONN, 0.0)
    assert answer.line == b"40001,6667:ERROR:HIDDEN-USER\r\n" and answer.rule == "reply.inbound"


class FailingBackend:
    name = "failing"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def find(self, conn: ConnectionId) -> Found | None:
        raise self.error


def test_lookup_failure_is_unknown_error(caplog: pytest.LogCaptureFixture) -> None:
    """A lookup that could not look is UNKNOWN-ERROR, and its cause is logged."""
    answer = Responder(FailingBackend(LookupFailed("table gone")), Config()).respond(
        QUERY, CONN, 0.0
    )
    assert answer.line == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n" and answer.rule == "lookup-failed"
    assert "table gone" in caplog.text


def test_unexpected_exception_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Any surprise becomes UNKNOWN-ERROR and a logged traceback, not a crash."""
    with caplog.at_level(logging.ERROR):
        answer = Responder(FailingBackend(RuntimeError("boom")), Config()).respond(QUERY, CONN, 0.0)
    assert answer.line == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n" and answer.rule == "internal-error"
    (record,) = caplog.records
    assert record.exc_info is not None and "RuntimeError: boom" in caplog.text


def test_invalid_user_id_never_reaches_the_wire(caplog: pytest.LogCaptureFixture) -> None:
    """A name with LF is caught by the validator: UNKNOWN-ERROR, not an injected line."""
    answer = responder({CONN: entry(1001)}).respond(QUERY, CONN, 0.0)
    assert answer.line == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n"
    assert b"mallory" not in answer.line and "control character LF" in caplog.text


def test_passwd_name() -> None:
    """Names come from passwd; a uid without an entry has none."""
    assert passwd_name(0) == "root"
    assert passwd_name(3_000_000_000) is None


def test_names_are_cached_for_a_while() -> None:
    """A uid's name is looked up once per NAME_TTL, absent names too; then looked up anew."""
    calls: list[int] = []

    def lookup(uid: int) -> str | None:
        calls.append(uid)
        return NAMES.get(uid)

    names = UserNames(lookup, ttl=60)
    assert [names.name(1000, now) for now in (0, 30, 59.9)] == ["alice"] * 3
    assert names.name(77, 0) is None and names.name(77, 10) is None
    assert calls == [1000, 77]
    assert names.name(1000, 60) == "alice" and calls == [1000, 77, 1000]


def test_name_cache_is_bounded() -> None:
    """However many uids are asked about, the cache keeps at most `size` of them."""
    names = UserNames(lambda uid: None, ttl=60, size=100)
    for uid in range(10_000):
        names.name(uid, 0)
    assert len(names._values) == 100
    assert set(names._values) == set(range(9_900, 10_000))  # the newest stay


def test_responder_reuses_names() -> None:
    """The responder asks passwd once for repeated queries about one owner."""
    calls: list[int] = []
    r = Responder(
        DictBackend({CONN: entry(1000)}), Config(), lambda uid: calls.append(uid) or "alice"
    )
    for now in range(5):
        assert r.respond(QUERY, CONN, float(now)).line.endswith(b":alice\r\n")
    assert calls == [1000]


def with_config(text: str) -> Config:
    import tomllib

    from procident.config import parse_config

    return parse_config(tomllib.loads(text))


def test_token_reply_decodes_to_the_connection() -> None:
    """action token sends an OTHER id that the key turns back into uid, time and conn."""
    from procident.tokens import TokenMaker

    maker = TokenMaker({1: bytes(32)})
    config = with_config('[[rules]]\naction = "token"\n')
    answer = Responder(
        DictBackend({CONN: entry(1000)}), config, NAMES.get, tokens=maker, wall_clock=lambda: 1234.5
    ).respond(QUERY, CONN, 0.0)
    assert answer.line is not None and answer.line.startswith(b"40001,6667:USERID:OTHER:")
    token = answer.line.rstrip(b"\r\n").rsplit(b":", 1)[1].decode()
    facts = maker.read(token)
    assert (facts.uid, facts.time, facts.conn) == (1000, 1234, CONN)


def test_token_without_key_is_unknown_error(caplog) -> None:
    """A token rule with no key loaded is UNKNOWN-ERROR and a logged reason, not a crash."""
    config = with_config('[[rules]]\naction = "token"\n')
    with caplog.at_level(logging.ERROR):
        answer = Responder(DictBackend({CONN: entry(1000)}), config, NAMES.get).respond(
            QUERY, CONN, 0.0
        )
    assert answer.line == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n" and answer.rule == "token-failed"
    assert "no token key is loaded" in caplog.text and "Traceback" not in caplog.text


def test_audit_id_reply_is_the_owners_id_for_the_querier() -> None:
    """action audit-id sends the id AuditIds makes for the owner, the querier's address
    and the time; with no key loaded, UNKNOWN-ERROR and a logged reason."""
    from procident.auditid import AuditIds, Scheme

    ids = AuditIds({1: bytes(32)}, Scheme())
    config = with_config('[[rules]]\naction = "audit-id"\n')
    answer = Responder(
        DictBackend({CONN: entry(1000)}), config, NAMES.get, audit_ids=ids, wall_clock=lambda: 1e9
    ).respond(QUERY, CONN, 0.0)
    expected = ids.make(1000, 1e9, CONN.remote.address)
    assert answer.line == b"40001,6667:USERID:OTHER:%s\r\n" % expected.encode()
    alone = Responder(DictBackend({CONN: entry(1000)}), config, NAMES.get)
    failed = alone.respond(QUERY, CONN, 0.0)
    assert failed.line == b"40001,6667:ERROR:UNKNOWN-ERROR\r\n" and failed.rule == "token-failed"


def test_reply_all_needs_no_lookup() -> None:
    """reply_all answers every well-formed query the same, without asking the kernel."""
    backend = DictBackend({})
    config = with_config('[reply]\nreply_all = "container"\n')
    answer = Responder(backend, config, NAMES.get).respond(QUERY, CONN, 0.0)
    assert answer.line == b"40001,6667:USERID:OTHER:container\r\n"
    assert answer.rule == "reply.reply_all" and backend.finds == []


def test_fallback_on_lookup_failure() -> None:
    """With fallback set, a failed lookup is answered with it instead of UNKNOWN-ERROR."""
    config = with_config('[reply]\nfallback = "nat-user"\n')
    answer = Responder(FailingBackend(LookupFailed("gone")), config).respond(QUERY, CONN, 0.0)
    assert answer.line == b"40001,6667:USERID:OTHER:nat-user\r\n"
    assert answer.rule == "reply.fallback"
