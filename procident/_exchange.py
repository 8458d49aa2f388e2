"""One connection's queries, in order, under the per-connection rules. Pure.

Shared by the asyncio adapter (procident.aio) and inetd mode (procident.inetd),
which differ only in how they wait, read and write. The daemon's selectors
server applies the same rules in its own terms (server.Session), and
tests/test_embed.py runs one table of inputs against all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from procident.config import LimitsConfig
from procident.policy import UNKNOWN_ERROR
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

CLOSE = None  # end the connection (after sending what came before)
MALFORMED_REPLY = format_reply(0, 0, ErrorReply(ErrorType.INVALID_PORT))

Step = bytes | Query | None
"""A reply line ready to send, a query whose reply needs a lookup, or CLOSE."""


class Exchange:
    """The queries of one connection: bytes in, steps out (see Step).

    Past max_queries_per_connection the connection ends; with over_limit =
    "error", a query already sent beyond it is answered UNKNOWN-ERROR first.
    `allow` is asked once per query; False means over the per-client rate.
    """

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self.reader = QueryReader()
        self.queries = 0
        self.refused = False

    def feed(self, data: bytes, allow: Callable[[], bool] = lambda: True) -> list[Step]:
        """The steps for the next bytes of the stream; CLOSE is always the last step."""
        steps: list[Step] = []
        for event in self.reader.feed(data):
            if isinstance(event, Overlong):
                return [*steps, CLOSE]
            if isinstance(event, Malformed):
                return [*steps, MALFORMED_REPLY, CLOSE]
            if self.refused:
                # A query already sent past the cap hears so, then the connection ends.
                return [
                    *steps,
                    format_reply(event.server_port, event.client_port, UNKNOWN_ERROR),
                    CLOSE,
                ]
            self.queries += 1
            if not allow():
                if self.limits.over_limit == "close":
                    return [*steps, CLOSE]
                steps.append(format_reply(event.server_port, event.client_port, UNKNOWN_ERROR))
            elif isinstance(event, InvalidPort):
                error = ErrorReply(ErrorType.INVALID_PORT)
                steps.append(format_reply(event.server_port, event.client_port, error))
            else:
                steps.append(event)
            if self.queries >= self.limits.max_queries_per_connection:
                if self.limits.over_limit == "close":
                    return [*steps, CLOSE]
                self.refused = True
        if self.refused:
            steps.append(CLOSE)  # no query waits to hear it is one too many
        return steps
