"""What to answer about a connection, once the kernel has said who owns it. Pure.

decide() walks the [[rules]] (first match wins), lets the owner's own files
speak where a rule allows it, and returns a Decision. What it needs to know
beyond the query (an owner's groups, their files, whether a name is a local
account) comes from a Facts object, and randomness from a Random passed in, so
tests can give both. The per-client rate limiter is here too, with time passed in.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field, replace
from typing import Protocol

from procident.config import (
    CONCEALING,
    Config,
    ReplyConfig,
    Rule,
)
from procident.lookup import ConnectionId, Endpoint, Found, IPAddress
from procident.matching import connection_mismatch
from procident.protocol import ErrorReply, ErrorType, Reply, UserIdReply
from procident.userfiles import Choice, UserFiles


@dataclass(frozen=True, slots=True)
class Owner:
    """The owner of a socket: its uid and, if passwd has one, its login name."""

    uid: int
    name: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer and the rule that chose it (named in the log and by `procident lookup`).

    reply is None for the actions the responder completes: "token" (encrypt
    the connection's facts), "audit-id" (the owner's pseudonym for the querier's
    network and the period) and "forward" (ask the application at `forward`).
    """

    reply: Reply | None
    rule: str
    action: str = ""
    os: str = ""  # for "token", "audit-id" and "forward": the OS token of their id
    forward: Endpoint | None = None
    capabilities: frozenset[str] | None = None  # forward chosen by a user: what it may answer
    trace: tuple[str, ...] = field(default=(), compare=False)
    # The owner's file exists but says nothing for this connection (or cannot be read as
    # it is: mid-write): a bouncer may be writing its block right now.
    recheck: bool = field(default=False, compare=False)


class Facts(Protocol):
    """What decide() may ask about owners beyond the kernel's answer."""

    def groups(self, owner: Owner) -> frozenset[str]:
        """The names of the owner's groups, primary and supplementary."""
        ...

    def user_files(self, owner: Owner) -> UserFiles:
        """What the owner's home directory says (~/.noident, ~/.ident, their choices)."""
        ...

    def is_account(self, name: str) -> bool:
        """Whether `name` is the login name of an account on this host."""
        ...


NO_USER = ErrorReply(ErrorType.NO_USER)
HIDDEN_USER = ErrorReply(ErrorType.HIDDEN_USER)
UNKNOWN_ERROR = ErrorReply(ErrorType.UNKNOWN_ERROR)

_INBOUND_REPLIES: dict[str, Reply] = {"hide": HIDDEN_USER, "no-user": NO_USER}
_FIXED: dict[str, Reply] = {"hide": HIDDEN_USER, "no-user": NO_USER, "deny": UNKNOWN_ERROR}
RANDOM_ID_LENGTH = 8
_RANDOM_FIRST = string.ascii_lowercase
_RANDOM_REST = string.ascii_lowercase + string.digits
PRIVILEGED_PORTS = 1024  # a remote port below this needs spoof_privport (as oidentd)
# The capability a user's choice needs, beside the checks on "reply" ids.
_NEEDS = {
    "hide": "hide",
    "random": "random",
    "random-numeric": "random",
    "numeric": "numeric",
    "forward": "forward",
    "reply": "spoof",  # checked per id by check_spoof: the owner's own name needs none
}


class _Trace:
    """Collects the steps of a decision when asked to (procident lookup), else nothing."""

    __slots__ = ("steps",)

    def __init__(self, on: bool) -> None:
        self.steps: list[str] | None = [] if on else None

    def __call__(self, step: str) -> None:
        if self.steps is not None:
            self.steps.append(step)

    def done(self) -> tuple[str, ...]:
        return tuple(self.steps or ())


def decide(
    conn: ConnectionId,
    found: Found | None,
    owner: Owner | None,
    config: Config,
    facts: Facts,
    rng: random.Random,
    explain: bool = False,
) -> Decision:
    """Choose the reply for `conn`, which the kernel listed as `found` (or did not).

    conn.local is this host's end (the address the query arrived on and the
    server port), conn.remote the querier's (its address and the client port).
    """
    trace = _Trace(explain)
    reply_config = config.reply
    if found is None:
        if reply_config.fallback:
            trace("no such connection; [reply] fallback is set")
            fallback = configured_reply(reply_config.fallback, reply_config)
            return Decision(fallback, "reply.fallback", "reply", trace=trace.done())
        trace("no such connection")
        return Decision(NO_USER, "no-connection", trace=trace.done())
    if owner is None:
        # No process holds the socket: its owner closed it (TIME_WAIT,
        # FIN_WAIT2, orphans) or has not accepted it yet. The kernel lists
        # it with uid 0, which must never be read as root.
        trace("the socket has no owner (closed, or not accepted yet)")
        return Decision(NO_USER, "no-owner", trace=trace.done())
    # A connection to a local listening service: naming its account tells
    # reverse-ident scanners which user runs each service. Only rules that
    # say inbound = true speak for it, unless [reply] inbound = "answer".
    inbound_only = found.inbound and reply_config.inbound != "answer"
    if found.inbound:
        trace(f"inbound: the local port {conn.local.port} has a listening socket")
    groups: frozenset[str] | None = None
    chosen: Rule | None = None
    for rule in config.rules:
        if inbound_only and not rule.inbound:
            trace(f"{rule.name}: skipped (not for inbound connections)")
            continue
        if rule.groups and groups is None:
            groups = facts.groups(owner)
        miss = _mismatch(rule, conn, owner, groups or frozenset())
        if miss:
            trace(f"{rule.name}: no match ({miss})")
            continue
        trace(f"{rule.name}: matches; action {rule.action}")
        chosen = rule
        break
    if chosen is None:
        if inbound_only:
            trace(f"no rule for this inbound connection; [reply] inbound = {reply_config.inbound}")
            return Decision(
                _INBOUND_REPLIES[reply_config.inbound], "reply.inbound", trace=trace.done()
            )
        trace("no rule matches; the owner's name")
    action = chosen.action if chosen else "real"
    name = chosen.name if chosen else "default"
    if action in CONCEALING:
        return Decision(_FIXED[action], name, action, trace=trace.done())

    users = config.users
    recheck = False
    if users.opt_in or users.noident or (chosen and chosen.user_may):
        files = facts.user_files(owner)
        for problem in files.problems:
            trace(f"user file ignored: {problem}")
        if files.unreadable and (users.opt_in or users.noident):
            # Fail closed: the owner may have asked to be hidden.
            trace("the owner's files cannot be read; hidden, as they may ask to be")
            return Decision(HIDDEN_USER, "users.unreadable", "hide", trace=trace.done())
        if users.opt_in and not files.ident:
            trace("[users] opt_in: the owner has no ~/.ident")
            return Decision(HIDDEN_USER, "users.opt_in", "hide", trace=trace.done())
        if users.noident and files.noident:
            trace("[users] noident: the owner has a ~/.noident")
            return Decision(HIDDEN_USER, "~/.noident", "hide", trace=trace.done())
        if chosen and chosen.user_may:
            # The rule's own answer: the log says why the owner's file gave none.
            if files.choices is None:
                name = f"{name}+no user file"
                if files.problems:
                    name = f"{name} (unusable)"
                    recheck = not files.unreadable
            else:
                choice = files.choices.choose(conn)
                if choice is None:
                    trace(f"{files.choices.path}: no choice for this connection")
                    name = f"{name}+{files.choices.path}: no block for this connection"
                    recheck = True
                else:
                    refusal = _refusal(choice, owner, conn, chosen.user_may, facts)
                    if not refusal:
                        trace(f"{choice.where}: the owner chooses {choice.action}")
                        return _user_act(choice, owner, chosen, reply_config, rng, trace)
                    trace(f"{choice.where}: {choice.action} refused ({refusal})")
                    name = f"{name}+{choice.where}: {choice.action} refused"
    decision = _act(chosen, name, owner, reply_config, rng, trace)
    return replace(decision, recheck=True) if recheck else decision


def _mismatch(rule: Rule, conn: ConnectionId, owner: Owner, groups: frozenset[str]) -> str:
    """Why `rule` does not match (the first field that fails), or "" when it does."""
    names_owner = (
        (owner.name is not None and owner.name in rule.users)
        or any(low <= owner.uid <= high for low, high in rule.uids)
        or not rule.groups.isdisjoint(groups)
    )
    if (rule.users or rule.uids or rule.groups) and not names_owner:
        return "owner"
    return connection_mismatch(rule, conn)


def configured_reply(user_id: str, reply: ReplyConfig) -> UserIdReply:
    """A fixed id of [reply] (reply_all, fallback): not a login name, so other_os."""
    return UserIdReply(user_id, reply.other_os, _charset(reply, None))


def _charset(reply: ReplyConfig, rule: Rule | None) -> str | None:
    return (rule.charset if rule and rule.charset else reply.charset) or None


def random_id(rng: random.Random) -> str:
    """A fresh alphanumeric id that starts with a letter."""
    return rng.choice(_RANDOM_FIRST) + "".join(
        rng.choice(_RANDOM_REST) for _ in range(RANDOM_ID_LENGTH - 1)
    )


def _act(
    rule: Rule | None,
    name: str,
    owner: Owner,
    reply: ReplyConfig,
    rng: random.Random,
    trace: _Trace,
) -> Decision:
    action = rule.action if rule else "real"
    charset = _charset(reply, rule)
    # Ids that are not login names go with OTHER (RFC 1413 §5), unless the rule says.
    other = rule.os if rule and rule.os else reply.other_os
    if action == "real":
        if owner.name is None:
            trace(f"uid {owner.uid} has no passwd entry; [reply] unknown_uid = {reply.unknown_uid}")
            if reply.unknown_uid == "no-user":
                return Decision(NO_USER, "reply.unknown_uid", trace=trace.done())
            return Decision(
                UserIdReply(str(owner.uid), other, charset), "reply.unknown_uid", trace=trace.done()
            )
        os = rule.os if rule and rule.os else reply.os
        return Decision(UserIdReply(owner.name, os, charset), name, action, trace=trace.done())
    assert rule is not None
    if action in ("token", "audit-id", "forward"):  # completed by the responder
        return Decision(None, name, action, other, rule.forward, trace=trace.done())
    user_id = _made_id(action, owner, rule.reply, rng)
    return Decision(UserIdReply(user_id, other, charset), name, action, trace=trace.done())


def _made_id(action: str, owner: Owner, replies: tuple[str, ...], rng: random.Random) -> str:
    """The id of action numeric, reply (one of `replies`), random or random-numeric."""
    if action == "numeric":
        return str(owner.uid)
    if action == "reply":
        return rng.choice(replies)
    if action == "random":
        return random_id(rng)
    assert action == "random-numeric", action
    return f"user{rng.randrange(100000)}"


def _refusal(
    choice: Choice, owner: Owner, conn: ConnectionId, may: frozenset[str], facts: Facts
) -> str:
    """Why the rule's capabilities do not allow `choice`, or "" when they do."""
    needed = _NEEDS[choice.action]
    if choice.action != "reply" and needed not in may:
        return f"needs {needed}"
    if choice.action == "reply":
        for user_id in choice.reply:
            refusal = check_spoof(user_id, owner, conn, may, facts)
            if refusal:
                return refusal
    return ""


def check_spoof(
    user_id: str, owner: Owner, conn: ConnectionId, may: frozenset[str], facts: Facts
) -> str:
    """Why an id the owner chose may not be sent under `may`, or "" when it may.

    The owner's own name is always theirs to send. Another id needs spoof; one
    that names another account also spoof_all; towards a remote port below
    1024 (a privileged service on the querier's host) also spoof_privport.
    """
    if user_id == owner.name:
        return ""
    if user_id != user_id.strip():
        return "leading or trailing white space"
    if "spoof" not in may:
        return "needs spoof"
    if conn.remote.port < PRIVILEGED_PORTS and "spoof_privport" not in may:
        return f"remote port {conn.remote.port} is below 1024: needs spoof_privport"
    if "spoof_all" not in may:
        for name in read_as(user_id):
            if name != owner.name and facts.is_account(name):
                return f"{user_id[:40]!r} reads as {name!r}, another account: needs spoof_all"
    return ""


def read_as(user_id: str) -> tuple[str, ...]:
    """The names an ident client may take `user_id` for: clients strip white space, some
    (Squid, s6) keep only what follows the last colon, and many compare without case.
    So " secalice", "x:secalice" and "SECALICE" all read as "secalice"."""
    forms = [user_id.strip(), user_id.rsplit(":", 1)[-1].strip()]
    forms += [form.lower() for form in forms] + [form.casefold() for form in forms]
    return tuple(dict.fromkeys(form for form in forms if form))


def _user_act(
    choice: Choice,
    owner: Owner,
    rule: Rule,
    reply: ReplyConfig,
    rng: random.Random,
    trace: _Trace,
) -> Decision:
    name = f"{rule.name}+{choice.where}"
    other = rule.os or reply.other_os
    charset = _charset(reply, rule)
    if choice.action == "hide":
        return Decision(HIDDEN_USER, name, "hide", trace=trace.done())
    if choice.action == "forward":
        return Decision(
            None, name, "forward", other, choice.forward, rule.user_may, trace=trace.done()
        )
    user_id = _made_id(choice.action, owner, choice.reply, rng)
    if user_id == owner.name:  # a login name after all
        other = rule.os or reply.os
    return Decision(UserIdReply(user_id, other, charset), name, choice.action, trace=trace.done())


def mask(reply: Reply, config: ReplyConfig) -> Reply:
    """With mask_errors on, NO-USER and HIDDEN-USER become UNKNOWN-ERROR (RFC 1413 §5).

    INVALID-PORT is left alone: it tells the querier about its own query, and
    nothing about the host.
    """
    if config.mask_errors and reply in (NO_USER, HIDDEN_USER):
        return UNKNOWN_ERROR
    return reply


def nat_map(inner: IPAddress, config: Config, rng: random.Random) -> Decision | None:
    """The [[nat.map]] answer for the inner host at `inner` (first match wins), or None."""
    for entry in config.nat.map:
        if not any(inner in network for network in entry.hosts):
            continue
        if entry.action != "reply":
            return Decision(_FIXED[entry.action], entry.name, entry.action)
        user_id = entry.reply[0] if len(entry.reply) == 1 else rng.choice(entry.reply)
        reply = UserIdReply(
            user_id,
            entry.os or config.reply.other_os,
            entry.charset or config.reply.charset or None,
        )
        return Decision(reply, entry.name, "reply")
    return None
