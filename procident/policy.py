"""What to answer about a connection, once the kernel has said who owns it. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from procident.config import ReplyConfig
from procident.lookup import Found
from procident.protocol import ErrorReply, ErrorType, Reply, UserIdReply


@dataclass(frozen=True, slots=True)
class Owner:
    """The owner of a socket: its uid and, if passwd has one, its login name."""

    uid: int
    name: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    """A reply and the rule that chose it (named in the log and by `procident lookup`)."""

    reply: Reply
    rule: str


NO_USER = ErrorReply(ErrorType.NO_USER)
HIDDEN_USER = ErrorReply(ErrorType.HIDDEN_USER)
UNKNOWN_ERROR = ErrorReply(ErrorType.UNKNOWN_ERROR)

_INBOUND_REPLIES: dict[str, Reply] = {"hide": HIDDEN_USER, "no-user": NO_USER}


def decide(found: Found | None, owner: Owner | None, reply: ReplyConfig) -> Decision:
    """Choose the reply for a connection the kernel listed (or did not)."""
    if found is None:
        return Decision(NO_USER, "no-connection")
    if owner is None:
        # No process holds the socket: its owner closed it (TIME_WAIT,
        # FIN_WAIT2, orphans) or has not accepted it yet. The kernel lists
        # it with uid 0, which must never be read as root.
        return Decision(NO_USER, "no-owner")
    if found.inbound and reply.inbound != "answer":
        # A connection to a local listening service: naming its account tells
        # reverse-ident scanners which user runs each service.
        return Decision(_INBOUND_REPLIES[reply.inbound], "reply.inbound")
    charset = reply.charset or None
    if owner.name is None:
        if reply.unknown_uid == "no-user":
            return Decision(NO_USER, "reply.unknown_uid")
        # Not a login name, so OTHER (RFC 1413 §5).
        return Decision(UserIdReply(str(owner.uid), reply.other_os, charset), "reply.unknown_uid")
    return Decision(UserIdReply(owner.name, reply.os, charset), "owner")


def mask(reply: Reply, config: ReplyConfig) -> Reply:
    """With mask_errors on, NO-USER and HIDDEN-USER become UNKNOWN-ERROR (RFC 1413 §5).

    INVALID-PORT is left alone: it tells the querier about its own query, and
    nothing about the host.
    """
    if config.mask_errors and reply in (NO_USER, HIDDEN_USER):
        return UNKNOWN_ERROR
    return reply
