"""Answering ident from a program's own idea of who owns a connection.

A lookup is any callable that takes the ConnectionId a query is about and
returns what to answer, or raises an IdentError for an RFC error:

- a str: that user id, sent with the OS token "OTHER" (not a login name of
  this host; RFC 1413 section 5); a UserIdReply: exactly that;
- None, or raising NoUser: "no such connection" (ERROR:NO-USER);
- raising HiddenUser: ERROR:HIDDEN-USER; UnknownError: ERROR:UNKNOWN-ERROR;
  InvalidPortError: ERROR:INVALID-PORT; an ErrorReply or ErrorType returned
  says the same.

It may be a coroutine function; procident.aio awaits it with a timeout.
LookupResponder turns a query into the reply line, with one choke point: any
other exception, or a reply the validator refuses (an id with CR, LF or NUL,
or over 512 octets), becomes UNKNOWN-ERROR and a logged traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import ClassVar

from procident.lookup import ConnectionId
from procident.protocol import ErrorReply, ErrorType, Query, Reply, UserIdReply, format_reply

log = logging.getLogger(__name__)

LookupResult = str | UserIdReply | ErrorReply | ErrorType | None
"""What a lookup returns: an id, a whole USERID reply, an RFC error, or None (NO-USER)."""

SyncLookup = Callable[[ConnectionId], LookupResult]
AsyncLookup = Callable[[ConnectionId], Awaitable[LookupResult]]
Lookup = SyncLookup | AsyncLookup

OTHER = "OTHER"


class IdentError(Exception):
    """An RFC 1413 error a lookup raises; each subclass is one error token."""

    error: ClassVar[ErrorType] = ErrorType.UNKNOWN_ERROR


class NoUser(IdentError):
    """There is no such connection, or it has no owner to name (NO-USER)."""

    error = ErrorType.NO_USER


class HiddenUser(IdentError):
    """The owner is not to be named (HIDDEN-USER)."""

    error = ErrorType.HIDDEN_USER


class UnknownError(IdentError):
    """The owner cannot be told, for any other reason (UNKNOWN-ERROR)."""

    error = ErrorType.UNKNOWN_ERROR


class InvalidPortError(IdentError):
    """The port pair is not one this program will answer about (INVALID-PORT)."""

    error = ErrorType.INVALID_PORT


def reply_from(result: LookupResult) -> Reply:
    """The reply a lookup's result stands for (see the module's description)."""
    if result is None:
        return ErrorReply(ErrorType.NO_USER)
    if isinstance(result, str):
        return UserIdReply(result, OTHER)
    if isinstance(result, ErrorType):
        return ErrorReply(result)
    if isinstance(result, (UserIdReply, ErrorReply)):
        return result
    raise TypeError(f"a lookup returned {type(result).__name__}, not an id, a reply or None")


def reply_line(query: Query, reply: Reply) -> bytes:
    """The reply line for `query`, CR LF included; UNKNOWN-ERROR (and a log line) when the
    reply is one the RFC forbids."""
    try:
        return format_reply(query.server_port, query.client_port, reply)
    except ValueError:
        log.exception("refusing to send a reply about %d,%d", query.server_port, query.client_port)
        return format_reply(
            query.server_port, query.client_port, ErrorReply(ErrorType.UNKNOWN_ERROR)
        )


def failure_line(query: Query, err: BaseException) -> bytes:
    """The reply line when a lookup raised `err`: its RFC error, or UNKNOWN-ERROR."""
    if isinstance(err, IdentError):
        return reply_line(query, ErrorReply(err.error))
    log.error(
        "lookup for %d,%d failed",
        query.server_port,
        query.client_port,
        exc_info=(type(err), err, err.__traceback__),
    )
    return reply_line(query, ErrorReply(ErrorType.UNKNOWN_ERROR))


class LookupResponder:
    """Answers queries from a synchronous lookup callable."""

    def __init__(self, lookup: SyncLookup) -> None:
        self.lookup = lookup

    def respond(self, query: Query, conn: ConnectionId) -> bytes:
        """The reply line to `query` about `conn`, CR LF included. Never raises."""
        try:
            result = self.lookup(conn)
            return reply_line(query, reply_from(result))
        except Exception as err:
            return failure_line(query, err)
