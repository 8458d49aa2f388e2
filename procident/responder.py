"""The one place where lookup, policy and error handling meet: Query -> Answer.

Any surprise below this point is caught here, logged with its traceback, and
answered UNKNOWN-ERROR; a failing lookup never stops the daemon.
"""

from __future__ import annotations

import logging
import pwd
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from procident import policy
from procident.config import ReplyConfig
from procident.lookup import Backend, ConnectionId, Found, LookupFailed
from procident.protocol import Query, Reply, format_reply

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Answer:
    """What was decided for one query, and why."""

    line: bytes  # the reply line as sent, CR LF included
    reply: Reply
    rule: str
    found: Found | None = None
    owner: policy.Owner | None = None


def passwd_name(uid: int) -> str | None:
    """The login name of `uid`, or None when passwd has no entry for it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


NAME_TTL = 60.0  # seconds a uid's name (or its absence) is reused
NAME_CACHE_SIZE = 4096  # uids remembered at most


class UserNames:
    """uid -> login name, remembered for NAME_TTL seconds.

    An NSS lookup scans /etc/passwd (or asks a directory service) on every
    call; on a host with many accounts that would be most of a query's cost.
    A renamed or deleted account is therefore named the old way for up to
    NAME_TTL seconds. Bounded: the oldest entry makes room for a new one.
    """

    def __init__(
        self,
        lookup: Callable[[int], str | None] = passwd_name,
        ttl: float = NAME_TTL,
        size: int = NAME_CACHE_SIZE,
    ) -> None:
        self.lookup = lookup
        self.ttl = ttl
        self.size = size
        self._names: dict[int, tuple[str | None, float]] = {}  # uid -> (name, expiry)

    def name(self, uid: int, now: float) -> str | None:
        """The login name of `uid` as of `now`, or None when passwd has no entry."""
        cached = self._names.get(uid)
        if cached is not None and now < cached[1]:
            return cached[0]
        name = self.lookup(uid)
        self._names.pop(uid, None)  # re-inserted last: the dict stays in expiry order
        if len(self._names) >= self.size:
            del self._names[next(iter(self._names))]
        self._names[uid] = (name, now + self.ttl)
        return name


class Responder:
    """Answers queries from a lookup backend and the [reply] settings."""

    def __init__(
        self,
        backend: Backend,
        config: ReplyConfig,
        user_name: Callable[[int], str | None] = passwd_name,
    ) -> None:
        self.backend = backend
        self.config = config
        self.names = UserNames(user_name)

    def batch(self) -> AbstractContextManager[None]:
        """A block whose lookups may share one read of the kernel's tables (a loop turn)."""
        return self.backend.batch()

    def respond(self, query: Query, conn: ConnectionId, now: float) -> Answer:
        """Decide and format the reply to `query` about `conn`, at monotonic time `now`."""
        found: Found | None = None
        owner: policy.Owner | None = None
        try:
            found = self.backend.find(conn)
            if found is not None and found.entry.owned:
                uid = found.entry.uid
                owner = policy.Owner(uid, self.names.name(uid, now))
            decision = policy.decide(found, owner, self.config)
            reply = policy.mask(decision.reply, self.config)
            line = format_reply(query.server_port, query.client_port, reply)
            return Answer(line, reply, decision.rule, found, owner)
        except LookupFailed as err:
            log.error("lookup of %s failed: %s", _describe(conn), err)
            rule = "lookup-failed"
        except Exception:
            log.exception("unexpected error answering %s", _describe(conn))
            rule = "internal-error"
        reply = policy.UNKNOWN_ERROR
        return Answer(
            format_reply(query.server_port, query.client_port, reply), reply, rule, found, owner
        )


def _describe(conn: ConnectionId) -> str:
    return f"{conn.local} <-> {conn.remote}"
