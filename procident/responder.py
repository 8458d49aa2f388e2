"""The one place where lookup, policy and error handling meet: Query -> Answer.

Any surprise below this point is caught here, logged with its traceback, and
answered UNKNOWN-ERROR; a failing lookup never stops the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TypeVar

from procident import policy
from procident.accounts import Accounts, FilesPending, UserNames, passwd_name
from procident.auditid import AuditIds
from procident.config import Config
from procident.forwarded import Forward, NatPlan, forwarded_reply, translated_reply
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
    Query,
    Reply,
    UserIdReply,
    format_reply,
    printable,
)
from procident.tokens import TokenError, TokenMaker

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


# A query about the owner's connection whose file has no block for it (a bouncer may be
# writing it: it learns the connection's port only once connected, and the IRC server
# can ask first) waits up to FILE_RACE_WAIT seconds, looking again every FILE_RACE_POLL.
FILE_RACE_WAIT = 0.2
FILE_RACE_POLL = 0.025


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
    recheck: bool = False  # policy.Decision.recheck: the owner's file may be being written


class Responder:
    """Answers queries from a lookup backend and the configuration."""

    def __init__(
        self,
        backend: Backend,
        config: Config,
        user_name: Callable[[int], str | None] = passwd_name,
        accounts: Accounts | None = None,
        tokens: TokenMaker | None = None,
        audit_ids: AuditIds | None = None,
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
        self.audit_ids = audit_ids
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

    def from_gateway(self, conn: ConnectionId) -> bool:
        """Whether `conn`'s querier is a gateway of [nat] gateways (its query names no
        connection of this host: the tables are searched by local end and remote port)."""
        gateways = self._config.nat.gateways
        return bool(gateways) and any(conn.remote.address in net for net in gateways)

    def prepare(self, conns: list[ConnectionId]) -> None:
        """The queries of a batch about to be answered, gathered: those from gateways
        share one search of the kernel's tables (the backend's prefetch_any_remote),
        where each would walk the whole table alone. A failure here costs nothing: each
        query's own search then says so."""
        search = self.any_remote
        prefetch = getattr(self.backend, "prefetch_any_remote", None)
        if prefetch is None or getattr(search, "__self__", None) is not self.backend:
            return
        with contextlib.suppress(LookupFailed):
            prefetch([(conn.local, conn.remote.port) for conn in conns if self.from_gateway(conn)])

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
            from_gateway = self.from_gateway(conn)
            steps: list[str] = []
            try:
                started = time.perf_counter()
                found = self.backend.find(conn)
                if found is None and from_gateway:
                    found, conn = self._from_gateway(conn, steps, explain)
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
            return Answer(
                line,
                reply,
                decision.rule,
                found,
                owner,
                trace=decision.trace,
                recheck=decision.recheck,
            )
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
        self, conn: ConnectionId, steps: list[str], explain: bool = True
    ) -> tuple[Found | None, ConnectionId]:
        """A query from a gateway in [nat] gateways that names no local connection: the
        gateway asks about a connection whose remote end is its outer peer, so look for
        the local end and the remote port with any remote address. Returns the socket
        found and the connection with its real remote end (`steps`: what it did, when
        explaining)."""
        candidates = self.any_remote(conn.local, conn.remote.port)
        if not candidates:
            if explain:
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
        if explain:
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
        """The reply of action "token" or "audit-id"."""
        if decision.action == "audit-id":
            if self.audit_ids is None:
                raise TokenError(f"{decision.rule}: action audit-id, but no token key is loaded")
            made = self.audit_ids.make(owner.uid, self.wall_clock(), conn.remote.address)
        else:
            if self.tokens is None:
                raise TokenError(f"{decision.rule}: action token, but no token key is loaded")
            made = self.tokens.make(owner.uid, self.wall_clock(), conn)
        return UserIdReply(made, decision.os, self._config.reply.charset or None)

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


@contextlib.contextmanager
def _both(
    first: AbstractContextManager[None], second: AbstractContextManager[None]
) -> Iterator[None]:
    with first, second:
        yield


class Ambiguous(Exception):
    """A query that fits more than one connection (one asked by a NAT gateway)."""


def _describe(conn: ConnectionId) -> str:
    return f"{conn.local} <-> {conn.remote}"


def waited(answer: Answer) -> Answer:
    """The rules' answer after waiting for the owner's file in vain, saying so in its rule."""
    return replace(answer, rule=f"{answer.rule} (waited {FILE_RACE_WAIT:g}s)", recheck=False)


def describe_owner(answer: Answer | None) -> str:
    """The real owner of the connection, for the log: name(uid), or why there is none."""
    if answer is None or answer.found is None:
        return "-"
    if answer.owner is None:
        return "-(no process)"
    return f"{answer.owner.name or '?'}(uid={answer.owner.uid})"


def explain(local: Endpoint, remote: Endpoint, answer: Answer) -> list[str]:
    """What `procident lookup` prints: the connection, what the kernel has, the owner,
    each policy step, the rule and the reply (text others wrote escaped)."""
    found = answer.found
    lines = [f"connection: {local} (this host) <-> {remote} (querier)"]
    if found is None:
        lines.append("kernel:     no socket with these four values")
    else:
        entry = found.entry
        lines.append(
            f"kernel:     {entry.source}: {entry.state.name}, uid {entry.uid}, inode {entry.inode}"
        )
        if found.inbound:
            lines.append(f"inbound:    port {local.port} has a listening socket on this host")
    if found is not None and answer.owner is None:
        lines.append("owner:      none: no process holds this socket")
    elif answer.owner is not None:
        lines.append(f"owner:      {describe_owner(answer)}")
    lines += [f"policy:     {printable(step)}" for step in answer.trace]
    lines.append(f"rule:       {printable(answer.rule)}")
    line = (answer.line or b"").rstrip(b"\r\n")
    lines.append(f"reply:      {printable(line.decode('utf-8', 'surrogateescape'))}")
    return lines
