"""Judging another ident server's answer (pure): an application's, for a rule's or a
user's forward, and an inner host's behind NAT. Its text is only text: it must be a valid
reply about the port pair asked, and what it says must be allowed to stand.
"""

from __future__ import annotations

from dataclasses import dataclass

from procident import policy
from procident.config import ReplyConfig
from procident.lookup import ConnectionId, Endpoint
from procident.protocol import (
    ErrorReply,
    ErrorType,
    Query,
    Reply,
    ReplyError,
    UserIdReply,
    format_reply,
    parse_reply,
)


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
    RFC's four is no answer. White space around the id is dropped, as clients drop it."""
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
    reply = parsed.reply
    if isinstance(reply, UserIdReply) and reply.user_id != reply.user_id.strip(" \t"):
        # "P , Q : USERID : X : qsalice" (Quassel, The Lounge): clients strip the space
        # before the id, so it is no part of it when sent on.
        reply = UserIdReply(reply.user_id.strip(" \t"), reply.os, reply.charset)
    return reply, "answered"


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
    if (
        isinstance(answered, ErrorReply)
        and answered.error is ErrorType.NO_USER
        and plan.conn.remote.address != plan.target.address
    ):
        # The Lounge's identd (and any that checks who asks) answers only a query from
        # the IRC server itself: to a forward, from this host, it says NO-USER.
        note = (
            "answered NO-USER; an application that answers only the IRC server itself "
            "(The Lounge's identd) cannot be forwarded to: use its oidentd file instead"
        )
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
