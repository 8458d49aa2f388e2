"""The one place where lookup, policy and error handling meet: Query -> Answer.

Any surprise below this point is caught here, logged with its traceback, and
answered UNKNOWN-ERROR; a failing lookup never stops the daemon.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from procident import policy
from procident.config import Config, ReplyConfig
from procident.homes import HELPER_TIMEOUT, FileState, HomeHelper, user_files_from
from procident.lookup import (
    Backend,
    ConnectionId,
    Endpoint,
    Found,
    LookupFailed,
    normalize_address,
)
from procident.lookup.conntrack import ConntrackTable
from procident.lookup.procfs import ProcfsBackend
from procident.protocol import (
    ErrorReply,
    Query,
    Reply,
    ReplyError,
    UserIdReply,
    format_reply,
    parse_reply,
    printable,
)
from procident.tokens import TokenError, TokenMaker
from procident.userfiles import UserFiles

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class NatPlan:
    """A translated connection's forward: what the inner host is asked about, and what
    to answer when it gives no usable answer."""

    inner: ConnectionId  # as the inner host sees it: its end, then the querier's
    fallback: Reply
    fallback_rule: str
    from_gateway: bool  # the query was itself forwarded, by a gateway in [nat] gateways

    @property
    def key(self) -> tuple[Endpoint, Endpoint]:
        """What the loop guard compares: one inner connection is asked about once at a time."""
        return self.inner.local, self.inner.remote


@dataclass(frozen=True, slots=True)
class Forward:
    """A query to pass on to another ident server before answering: an application's own
    (a rule's or a user's action "forward"), or an inner host's (NAT, `nat` set)."""

    target: Endpoint
    ask: Query  # the port pair to send: the query's own, or the inner connection's
    conn: ConnectionId
    decision: policy.Decision | None = None  # an application's: the rule's, or the user's
    owner: policy.Owner | None = None
    nat: NatPlan | None = None  # an inner host's


@dataclass(frozen=True, slots=True)
class Answer:
    """What was decided for one query, and why.

    line is None while a forward is outstanding: the server asks `forward.target`
    and calls Responder.finish_forward with what came back; and while the owner's
    files are being read (`pending`, their uid): the server asks again once they came.
    """

    line: bytes | None  # the reply line as sent, CR LF included
    reply: Reply | None
    rule: str
    found: Found | None = None
    owner: policy.Owner | None = None
    forward: Forward | None = None
    trace: tuple[str, ...] = field(default=(), compare=False)
    pending: int | None = None  # the uid whose files are awaited


def passwd_name(uid: int) -> str | None:
    """The login name of `uid`, or None when passwd has no entry for it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def account_groups(name: str) -> frozenset[str]:
    """The names of the groups of account `name`, primary and supplementary."""
    try:
        gid = pwd.getpwnam(name).pw_gid
    except KeyError:
        return frozenset()
    names = set()
    for group in _group_ids(name, gid):
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(group).gr_name)
    return frozenset(names)


def _group_ids(name: str, gid: int) -> list[int]:
    try:
        return os.getgrouplist(name, gid)
    except OSError:
        return [gid]


def is_account(name: str) -> bool:
    """Whether passwd has an account of that name."""
    try:
        pwd.getpwnam(name)
    except (KeyError, ValueError):
        return False
    return True


NAME_TTL = 60.0  # seconds a uid's name (or its absence) is reused
NAME_CACHE_SIZE = 4096  # uids remembered at most
PROBLEM_LOG_INTERVAL = 10.0  # seconds between two lines about one user's unusable files


class TimedCache(Generic[K, V]):
    """key -> value, each remembered for `ttl` seconds; the oldest makes room when full.

    NSS lookups scan /etc/passwd (or ask a directory service) on every call;
    on a host with many accounts that would be most of a query's cost. A
    renamed or deleted account is therefore named the old way for up to `ttl`.
    """

    def __init__(
        self, lookup: Callable[[K], V], ttl: float = NAME_TTL, size: int = NAME_CACHE_SIZE
    ):
        self.lookup = lookup
        self.ttl = ttl
        self.size = size
        self._values: dict[K, tuple[V, float]] = {}  # key -> (value, expiry)

    def get(self, key: K, now: float) -> V:
        """The value for `key` as of `now`."""
        cached = self._values.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        value = self.lookup(key)
        self.put(key, value, now)  # re-inserted last: the dict stays in expiry order
        return value

    def put(self, key: K, value: V, now: float) -> None:
        """Remember `value` for `key` as of `now`, as get would have."""
        self._values.pop(key, None)
        if len(self._values) >= self.size:
            del self._values[next(iter(self._values))]
        self._values[key] = (value, now + self.ttl)


class UserNames(TimedCache[int, "str | None"]):
    """uid -> login name, remembered for NAME_TTL seconds."""

    def __init__(
        self,
        lookup: Callable[[int], str | None] = passwd_name,
        ttl: float = NAME_TTL,
        size: int = NAME_CACHE_SIZE,
    ) -> None:
        super().__init__(lookup, ttl, size)

    def name(self, uid: int, now: float) -> str | None:
        """The login name of `uid` as of `now`, or None when passwd has no entry."""
        return self.get(uid, now)


FileReader = Callable[[int, int], dict[str, FileState]]  # (uid, max size) -> states


class FilesPending(Exception):
    """A user's files are being read by the helper: the query waits for them (or for
    HELPER_TIMEOUT), and other queries go on meanwhile."""

    def __init__(self, uid: int) -> None:
        super().__init__(uid)
        self.uid = uid


class Accounts:
    """policy.Facts from passwd, group and the users' files, each cached for a while.

    Users' files come from `read_files` (a blocking call: inetd mode, the CLI) or from
    `helper`, asked from the event loop without waiting: user_files then raises
    FilesPending, the server calls `collect` when the helper's answers come, or
    `give_up` for a uid whose answer is late (its queries are then answered without the
    files, as if unreadable), and `settle` once the waiting queries are answered; every
    other query goes on in the meantime.
    """

    def __init__(
        self,
        config: Config,
        read_files: FileReader | None = None,
        groups: Callable[[str], frozenset[str]] = account_groups,
        account: Callable[[str], bool] = is_account,
        helper: HomeHelper | None = None,
    ) -> None:
        self.now = 0.0
        self.read_files = read_files
        self.helper = helper
        # uid -> the files that came (or the verdict that they will not in time), for
        # the queries that waited for them
        self._fresh: dict[int, UserFiles] = {}
        self._groups = TimedCache(groups)
        self._accounts = TimedCache(account)
        # uid -> (the problems last logged, when): see _report
        self._reported: dict[int, tuple[tuple[str, ...], float]] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Use a new configuration's [users] settings (forgetting files read before)."""
        self.users = config.users
        self._files: TimedCache[int, UserFiles] = TimedCache(
            self._read, ttl=config.users.cache_seconds
        )

    def groups(self, owner: policy.Owner) -> frozenset[str]:
        return self._groups.get(owner.name, self.now) if owner.name else frozenset()

    def is_account(self, name: str) -> bool:
        return self._accounts.get(name, self.now)

    def user_files(self, owner: policy.Owner) -> UserFiles:
        return self._files.get(owner.uid, self.now)

    def collect(self, now: float) -> list[int]:
        """Take the helper's answers that have come; the uids they are for. Each serves
        the queries waiting for it (until `settle`), and is cached like any read."""
        assert self.helper is not None
        self.now = now
        uids = []
        for uid, states in self.helper.collect():
            if states is None:
                files = UserFiles(problems=("malformed answer of the helper",), unreadable=True)
            else:
                files = user_files_from(states, self.users)
            self._report(uid, files.problems)
            self._fresh[uid] = files
            self._files.put(uid, files, now)
            uids.append(uid)
        return uids

    def give_up(self, uid: int) -> None:
        """The helper has not answered about `uid` in time: the queries waiting for it are
        answered without the files (until `settle`); its answer is still taken if it comes."""
        files = UserFiles(
            problems=(f"not read in time: the helper did not answer in {HELPER_TIMEOUT:g}s",),
            unreadable=True,
        )
        self._report(uid, files.problems)
        self._fresh[uid] = files

    def settle(self, uid: int) -> None:
        """The queries that waited for `uid`'s files are answered."""
        self._fresh.pop(uid, None)

    def _from_helper(self, uid: int) -> UserFiles:
        assert self.helper is not None
        fresh = self._fresh.get(uid)
        if fresh is not None:
            return fresh
        if self.helper.overdue(self.now):
            # Stuck on another user's files: ask (the answer is cached when it comes), but
            # make no one wait behind them.
            self.helper.ask(uid, self.users.max_file_size, self.now)
            files = UserFiles(problems=("not read: the helper is not answering",), unreadable=True)
        elif not self.helper.ask(uid, self.users.max_file_size, self.now):
            files = UserFiles(problems=("not read: the helper cannot be asked",), unreadable=True)
        else:
            raise FilesPending(uid)
        self._report(uid, files.problems)
        return files

    def _read(self, uid: int) -> UserFiles:
        if self.helper is not None:
            return self._from_helper(uid)
        if self.read_files is None:
            return UserFiles(problems=("user files are not read here",), unreadable=True)
        try:
            states = self.read_files(uid, self.users.max_file_size)
        except Exception as err:  # the helper died or hangs: fail closed
            files = UserFiles(problems=(f"cannot read: {err}",), unreadable=True)
        else:
            files = user_files_from(states, self.users)
        self._report(uid, files.problems)
        return files

    def _report(self, uid: int, problems: tuple[str, ...]) -> None:
        """One short line for what cannot be used of a user's files: when it changes, and
        else at most once per cache period (and PROBLEM_LOG_INTERVAL), however often the
        files are read; a file cannot flood the log."""
        if not problems:
            self._reported.pop(uid, None)
            return
        now = self.now
        interval = max(float(self.users.cache_seconds), PROBLEM_LOG_INTERVAL)
        last = self._reported.get(uid)
        if last is not None and last[0] == problems and now - last[1] < interval:
            return
        if len(self._reported) >= NAME_CACHE_SIZE:
            self._reported.clear()
        self._reported[uid] = (problems, now)
        log.warning("uid %d: %s", uid, printable("; ".join(problems), 300))


class Responder:
    """Answers queries from a lookup backend and the configuration."""

    def __init__(
        self,
        backend: Backend,
        config: Config,
        user_name: Callable[[int], str | None] = passwd_name,
        accounts: Accounts | None = None,
        tokens: TokenMaker | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        conntrack: ConntrackTable | None = None,
        any_remote: Callable[[Endpoint, int], list[Found]] | None = None,
    ) -> None:
        self.backend = backend
        # NAT: the connection-tracking table (opened as root at start), and the search of
        # the socket tables for queries forwarded by a gateway.
        self.conntrack = conntrack
        if any_remote is None:
            any_remote = getattr(backend, "find_any_remote", None)
        self.any_remote = any_remote or ProcfsBackend().find_any_remote
        self.names = UserNames(user_name)
        self.accounts = accounts or Accounts(config)
        self.tokens = tokens
        # Random ids stand in for a person: they must not be predictable.
        self.rng = rng or random.SystemRandom()
        self.wall_clock = wall_clock
        self.on_lookup: Callable[[float], None] | None = None  # each lookup's seconds
        self.config = config

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        self._config = config
        self.accounts.configure(config)

    def batch(self) -> AbstractContextManager[None]:
        """A block whose lookups may share one read of the kernel's tables (a loop turn)."""
        if self.conntrack is None or not self._config.nat.enabled:
            return self.backend.batch()
        return _both(self.backend.batch(), self.conntrack.batch())

    def respond(
        self, query: Query, conn: ConnectionId, now: float, explain: bool = False
    ) -> Answer:
        """Decide and format the reply to `query` about `conn`, at monotonic time `now`."""
        found: Found | None = None
        owner: policy.Owner | None = None
        config = self._config
        reply_config = config.reply
        try:
            if reply_config.reply_all:
                # One answer for every well-formed query: no lookup at all.
                reply: Reply = policy.configured_reply(reply_config.reply_all, reply_config)
                line = format_reply(query.server_port, query.client_port, reply)
                return Answer(line, reply, "reply.reply_all", trace=("[reply] reply_all is set",))
            nat = config.nat
            from_gateway = any(conn.remote.address in net for net in nat.gateways)
            steps: list[str] = []
            try:
                started = time.perf_counter()
                found = self.backend.find(conn)
                if found is None and from_gateway:
                    found, conn = self._from_gateway(conn, steps)
                if self.on_lookup is not None:
                    self.on_lookup(time.perf_counter() - started)
                if found is None and nat.enabled and self.conntrack is not None:
                    inner = self._inner(conn, from_gateway, steps)
                    if inner is not None:
                        # Translated, but from one of this host's own addresses (a
                        # process bound to the inner one): this host's socket.
                        found = self.backend.find(inner)
                        if found is None:
                            return self._translated(query, conn, inner, from_gateway, steps)
                        steps.append("the inner end is a socket of this host")
                        conn = inner
            except LookupFailed as err:
                if not reply_config.fallback:
                    raise
                log.error("lookup of %s failed: %s", _describe(conn), err)
                reply = policy.configured_reply(reply_config.fallback, reply_config)
                line = format_reply(query.server_port, query.client_port, reply)
                return Answer(line, reply, "reply.fallback")
            if found is not None and found.entry.owned:
                uid = found.entry.uid
                owner = policy.Owner(uid, self.names.name(uid, now))
            self.accounts.now = now
            decision = policy.decide(conn, found, owner, config, self.accounts, self.rng, explain)
            if steps and explain:
                decision = replace(decision, trace=(*steps, *decision.trace))
            if decision.reply is None:
                assert owner is not None
                if decision.action == "forward" and decision.forward is not None:
                    plan = Forward(decision.forward, query, conn, decision, owner)
                    return Answer(None, None, decision.rule, found, owner, plan, decision.trace)
                reply = self._token(decision, owner, conn)
            else:
                reply = decision.reply
            reply = policy.mask(reply, reply_config)
            line = format_reply(query.server_port, query.client_port, reply)
            return Answer(line, reply, decision.rule, found, owner, trace=decision.trace)
        except FilesPending as pending:
            return Answer(None, None, "users.pending", found, owner, pending=pending.uid)
        except Ambiguous as err:
            log.warning("cannot answer about %s: %s", _describe(conn), err)
            rule = f"nat: {err}"
        except LookupFailed as err:
            log.error("lookup of %s failed: %s", _describe(conn), err)
            rule = "lookup-failed"
        except TokenError as err:
            log.error("cannot make a token: %s", err)
            rule = "token-failed"
        except Exception:
            log.exception("unexpected error answering %s", _describe(conn))
            rule = "internal-error"
        reply = policy.UNKNOWN_ERROR
        return Answer(
            format_reply(query.server_port, query.client_port, reply), reply, rule, found, owner
        )

    def _from_gateway(
        self, conn: ConnectionId, steps: list[str]
    ) -> tuple[Found | None, ConnectionId]:
        """A query from a gateway in [nat] gateways that names no local connection: the
        gateway asks about a connection whose remote end is its outer peer, so look for
        the local end and the remote port with any remote address. Returns the socket
        found and the connection with its real remote end."""
        candidates = self.any_remote(conn.local, conn.remote.port)
        if not candidates:
            steps.append(
                f"asked by gateway {conn.remote.address}: no connection of "
                f"{conn.local} to port {conn.remote.port} at any address"
            )
            return None, conn
        owners = {found.entry.uid for found in candidates if found.entry.owned}
        if len(owners) > 1:
            raise Ambiguous(
                f"gateway {conn.remote.address} asks about {conn.local} and port "
                f"{conn.remote.port}: connections to {len(candidates)} addresses, of "
                f"{len(owners)} owners"
            )
        found = candidates[0]
        # An IPv4 connection of a dual-stack socket is listed with ::ffff:a.b.c.d.
        peer = normalize_address(found.entry.remote.address)
        real = ConnectionId(conn.local, Endpoint(peer, conn.remote.port))
        steps.append(
            f"asked by gateway {conn.remote.address}: the connection is "
            f"{real.local} <-> {real.remote}"
        )
        return found, real

    def _inner(
        self, conn: ConnectionId, from_gateway: bool, steps: list[str]
    ) -> ConnectionId | None:
        """The inner connection behind `conn` if this host translates it ([nat]): its
        original tuple in the connection-tracking table."""
        assert self.conntrack is not None
        remote = None if from_gateway else conn.remote.address
        inners = self.conntrack.find(conn.local, conn.remote.port, remote)
        if not inners:
            steps.append("no translated connection in the connection-tracking table")
            return None
        if len(inners) > 1:
            raise Ambiguous(
                f"{len(inners)} translated connections fit {conn.local} and the remote "
                f"port {conn.remote.port}"
            )
        inner = inners[0]
        steps.append(f"translated: inner host's connection {inner.local} <-> {inner.remote}")
        return inner

    def _translated(
        self,
        query: Query,
        conn: ConnectionId,
        inner: ConnectionId,
        from_gateway: bool,
        steps: list[str],
    ) -> Answer:
        """The answer for `conn`, which this host translates for the inner host's
        connection `inner`: from the inner host's ident daemon or the map ([nat])."""
        config = self._config
        nat = config.nat
        mapped = policy.nat_map(inner.local.address, config, self.rng)
        if mapped is not None:
            steps.append(f"{mapped.rule}: matches {inner.local.address}; {mapped.action}")
        else:
            steps.append(f"no [[nat.map]] entry for {inner.local.address}")
        if nat.forward and (nat.order == "forward" or mapped is None):
            target = Endpoint(inner.local.address, nat.port)
            if mapped is not None:
                assert mapped.reply is not None
                fallback, fallback_rule = mapped.reply, mapped.rule
            else:
                fallback, fallback_rule = policy.UNKNOWN_ERROR, "no map entry"
            steps.append(
                f"ask {target} about {inner.local.port},{inner.remote.port}; "
                f"if it cannot answer: {fallback_rule}"
            )
            plan = NatPlan(inner, fallback, fallback_rule, from_gateway)
            forward = Forward(target, Query(inner.local.port, inner.remote.port), conn, nat=plan)
            return Answer(None, None, "nat", forward=forward, trace=tuple(steps))
        if mapped is not None:
            assert mapped.reply is not None
            reply, rule = mapped.reply, f"nat {mapped.rule}"
        else:
            reply, rule = policy.UNKNOWN_ERROR, "nat: no map entry, forward off"
        reply = policy.mask(reply, config.reply)
        line = format_reply(query.server_port, query.client_port, reply)
        return Answer(line, reply, rule, trace=tuple(steps))

    def _token(self, decision: policy.Decision, owner: policy.Owner, conn: ConnectionId) -> Reply:
        if self.tokens is None:
            raise TokenError(f"{decision.rule}: action token, but no token key is loaded")
        token = self.tokens.make(owner.uid, self.wall_clock(), conn)
        return UserIdReply(token, decision.os, self._config.reply.charset or None)

    def finish_forward(
        self, query: Query, answer: Answer, line: bytes | None, failure: str = ""
    ) -> Answer:
        """The answer to send once the forward of `answer` has its reply `line` (end of
        line removed), or failed for the reason `failure`."""
        plan = answer.forward
        assert plan is not None
        rule = answer.rule
        try:
            if plan.nat is not None:
                reply, note = translated_reply(plan, line, failure)
            else:
                reply, note = forwarded_reply(
                    query, plan, line, failure, self.accounts, self._config.reply
                )
            reply = policy.mask(reply, self._config.reply)
            out = format_reply(query.server_port, query.client_port, reply)
        except Exception:
            log.exception("unexpected error finishing a forward to %s", plan.target)
            reply, note = policy.UNKNOWN_ERROR, "internal-error"
            out = format_reply(query.server_port, query.client_port, reply)
        if plan.nat is not None:
            rule = f"nat forward {plan.target} {plan.ask.server_port},{plan.ask.client_port}"
        else:
            rule = f"{rule} forward {plan.target}"
        return Answer(out, reply, f"{rule}: {note}", answer.found, answer.owner)


def translated_reply(plan: Forward, line: bytes | None, failure: str) -> tuple[Reply, str]:
    """What to send for an inner host's answer (NAT), and a note for the log.

    The answer must be about the inner port pair that was asked; a USERID's id and
    OS token pass the reply validators again. The inner host's own errors are its
    policy and are passed on; no answer, or one not understood, gives the fallback
    (the [[nat.map]] entry, else UNKNOWN-ERROR).
    """
    nat = plan.nat
    assert nat is not None
    answered, note = read_answer(line, failure, plan.ask)
    if answered is not None:
        try:
            format_reply(1, 1, answered)
        except ReplyError as err:
            note = f"answer refused: {err}"
        else:
            return answered, note
    return nat.fallback, f"{note}; {nat.fallback_rule}"


def read_answer(line: bytes | None, failure: str, asked: Query) -> tuple[Reply | None, str]:
    """Another ident server's answer (end of line removed) to the query `asked`: the reply
    it carries and "answered", or None and why not. It is read like any reply
    (protocol.parse_reply) and must be about the port pair asked; an error outside the
    RFC's four is no answer."""
    if line is None or failure:
        return None, failure or "failed"
    try:
        parsed = parse_reply(line)
    except ValueError as err:
        return None, f"answer not understood: {err}"
    if (parsed.server_port, parsed.client_port) != (asked.server_port, asked.client_port):
        return None, "answer about another port pair"
    if isinstance(parsed.reply, str):
        return None, f"answer with an unknown error {parsed.reply[:40]!r}"
    return parsed.reply, "answered"


@contextlib.contextmanager
def _both(
    first: AbstractContextManager[None], second: AbstractContextManager[None]
) -> Iterator[None]:
    with first, second:
        yield


class Ambiguous(Exception):
    """A query that fits more than one connection (one asked by a NAT gateway)."""


def forwarded_reply(
    query: Query,
    plan: Forward,
    line: bytes | None,
    failure: str,
    facts: policy.Facts,
    config: ReplyConfig,
) -> tuple[Reply, str]:
    """What to send for a forward's result, and a note for the log.

    The application's answer is read like any reply (protocol.parse_reply) and
    must be about the same port pair; its id passes the one validator again
    when formatted. When the forward was a user's choice, the id must also be
    one the user may send (policy.check_spoof), and an error (which conceals the
    owner as hiding does) needs the user's hide capability. A forward that fails gives
    UNKNOWN-ERROR for a rule's forward; for a user's, HIDDEN-USER if the user
    may hide, else the owner's name (as oidentd does).
    """
    decision = plan.decision
    assert decision is not None and plan.owner is not None
    may = decision.capabilities
    charset = config.charset or None
    reply: Reply | None = None
    answered, note = read_answer(line, failure, plan.ask)
    if isinstance(answered, ErrorReply):
        # Any error conceals the owner: from a user's own application it stands only
        # where the user may hide (else the fallback below names them).
        if may is None or "hide" in may:
            reply = answered
        else:
            note = f"answer ERROR:{answered.error.value} refused: needs hide"
    elif answered is not None:
        user_id = answered.user_id
        refusal = ""
        if may is not None:
            refusal = policy.check_spoof(user_id, plan.owner, plan.conn, may, facts)
        try:
            format_reply(1, 1, UserIdReply(user_id, decision.os))
        except ReplyError as err:
            refusal = str(err)
        if refusal:
            note = f"answer {user_id[:40]!r} refused: {refusal}"
        else:
            # The owner's login name goes as UNIX (or [reply] os); any other id as OTHER.
            opsys = config.os if user_id == plan.owner.name else decision.os
            reply = UserIdReply(user_id, opsys, charset)
    if reply is None:
        if may is None:
            reply = policy.UNKNOWN_ERROR
        elif "hide" in may or plan.owner.name is None:
            reply = policy.HIDDEN_USER
        else:
            reply = UserIdReply(plan.owner.name, config.os, charset)
    return reply, note


def _describe(conn: ConnectionId) -> str:
    return f"{conn.local} <-> {conn.remote}"


def describe_owner(answer: Answer | None) -> str:
    """The real owner of the connection, for the log: name(uid), or why there is none."""
    if answer is None or answer.found is None:
        return "-"
    if answer.owner is None:
        return "-(no process)"
    return f"{answer.owner.name or '?'}(uid={answer.owner.uid})"
