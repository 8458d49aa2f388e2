"""Who may connect and ask, and how often: access lists, connection caps, the query
rate. Pure (time is passed in); every driver (the selectors daemon, the asyncio
adapter) admits through one Admission.

A client is an IPv4 address or an IPv6 /64. Connections are capped in all
(max_connections): with over_limit = "error", a connection over it is still taken, to
answer its first query UNKNOWN-ERROR, but only MAX_OVERFLOW such connections at once,
and they count against no cap. A client's connections beyond per_client_connections are
taken "once" (within max_connections): answered if they ask at once, then closed; so a
reconnection wave is answered whole, and a client holding idle connections keeps only
per_client_connections of them. [[limits.networks]] give some clients other per-client
limits. Refusals are counted per limit, and said in the log at most once per
REFUSAL_LOG_INTERVAL with the count since the last line.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import NamedTuple

from procident.config import AccessConfig, LimitsConfig
from procident.lookup import IPAddress
from procident.tomlcheck import IPNetwork

MAX_OVERFLOW = 64  # connections over a cap kept open at once to be answered UNKNOWN-ERROR
REFUSAL_LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """The per-client limits of one client: [limits], or its [[limits.networks]] entry."""

    connections: int
    rate: float
    burst: int


class Ticket(NamedTuple):  # a NamedTuple: made for every connection, it must be cheap
    """An admitted connection: its client, the cap it was admitted over ("" when within
    every cap; its session's first query then hears UNKNOWN-ERROR), whether it is over
    the client's per_client_connections (`once`), and the client's limits."""

    key: int
    refused: str = ""
    once: bool = False
    limits: ClientLimits | None = None  # None: [limits] as they were at admission


class Admission:
    """The connections open per client and in all, the query rate per client, and the
    refusals, for one server. `release` every ticket `admit` gave, once."""

    def __init__(self, limits: LimitsConfig, access: AccessConfig | None = None) -> None:
        self.limits = limits
        self.access = access or AccessConfig()
        self.limiter = RateLimiter.for_limits(limits)
        self._networks = _client_limits(limits)
        self.per_client: dict[int, int] = {}
        self.within = 0  # connections admitted within the caps
        # The last ticket given was the first over its client's per_client_connections:
        # the moment for the driver to look for connections that client has closed.
        self.first_over = False
        self.overflow = 0  # connections admitted over a cap, only to be refused
        self.refusals: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def update(self, limits: LimitsConfig, access: AccessConfig) -> None:
        """A reload: new caps apply to the next connection; the rate buckets carry over
        unless the rate settings changed."""
        if _rate_settings(limits) != _rate_settings(self.limits):
            self.limiter = RateLimiter.for_limits(limits)
        self.limits = limits
        self.access = access
        self._networks = _client_limits(limits)

    def admit(self, address: IPAddress) -> Ticket | str:
        """A ticket for a new connection from `address`, or the name of the limit that
        refuses it outright ("access", "max_connections")."""
        access = self.access
        if (access.allow or access.deny) and not allowed(address, access):
            return "access"
        limits = self.limits
        key = client_key(address)
        if self.within >= limits.max_connections:
            if limits.over_limit == "close" or self.overflow >= MAX_OVERFLOW:
                return "max_connections"
            self.overflow += 1
            return Ticket(key, "max_connections")
        mine = self._mine(address) if self._networks else None
        cap = limits.per_client_connections if mine is None else mine.connections
        held = self.per_client.get(key, 0)
        self.within += 1
        self.per_client[key] = held + 1
        self.first_over = held == cap
        return Ticket(key, "", held >= cap, mine)

    def release(self, ticket: Ticket) -> None:
        """The connection of `ticket` is closed."""
        if ticket.refused:
            self.overflow -= 1
            return
        self.within -= 1
        count = self.per_client[ticket.key] - 1
        if count:
            self.per_client[ticket.key] = count
        else:
            del self.per_client[ticket.key]

    def _mine(self, address: IPAddress) -> ClientLimits | None:
        """The limits of the first [[limits.networks]] entry `address` is in, if any."""
        for networks, mine in self._networks:
            if any(address in network for network in networks):
                return mine
        return None

    def rate_for(self, ticket: Ticket) -> Callable[[float], bool] | None:
        """The session's per-query rate check for `ticket`'s client: None when its rate is
        unlimited (nothing to ask per query)."""
        rate = self.limiter.rate if ticket.limits is None else ticket.limits.rate
        return None if rate <= 0 else functools.partial(self.allow, ticket)

    def allow(self, ticket: Ticket, now: float) -> bool:
        """One query of the client of `ticket` at `now`: False when over its rate."""
        limiter = self.limiter
        mine = ticket.limits
        if mine is None:
            return limiter.rate <= 0 or limiter.allow(ticket.key, now)
        return mine.rate <= 0 or limiter.allow(ticket.key, now, mine.rate, mine.burst)

    def refused(self, limit: str, now: float) -> int:
        """Count one refusal by `limit`; the count to log now (and since the last line), or
        0 when its line waits (at most one per REFUSAL_LOG_INTERVAL)."""
        self.refusals[limit] = self.refusals.get(limit, 0) + 1
        if now - self._logged_at.get(limit, float("-inf")) < REFUSAL_LOG_INTERVAL:
            return 0
        count, self.refusals[limit] = self.refusals[limit], 0
        self._logged_at[limit] = now
        return count


def refusal_words(limit: str) -> str:
    """How a refusal line says what was refused, after the count."""
    if limit == "access":
        return "connection(s) from clients the [access] lists refuse"
    if limit == "per_client_rate":
        return "query(s) over limits.per_client_rate"
    return f"connection(s) over limits.{limit}"


def _rate_settings(limits: LimitsConfig) -> tuple[object, ...]:
    return limits.per_client_rate, limits.per_client_burst, limits.clients_tracked, limits.networks


def _client_limits(limits: LimitsConfig) -> tuple[tuple[tuple[IPNetwork, ...], ClientLimits], ...]:
    """[[limits.networks]], each with its limits complete (what it leaves out, from
    [limits])."""
    return tuple(
        (
            net.clients,
            ClientLimits(
                limits.per_client_connections
                if net.per_client_connections is None
                else net.per_client_connections,
                limits.per_client_rate if net.per_client_rate is None else net.per_client_rate,
                limits.per_client_burst if net.per_client_burst is None else net.per_client_burst,
            ),
        )
        for net in limits.networks
    )


def client_key(address: IPAddress) -> int:
    """What counts as one client for the per-client caps and rate: an IPv4 address, or an
    IPv6 /64 (one host commonly holds a whole /64, so counting addresses would cap
    nothing). An int (IPv4 addresses as they are, /64 prefixes negative), so the tables
    hash it cheaply on every connection."""
    if isinstance(address, IPv6Address):  # not .version: a Python property, per connection
        return -1 - (int(address) >> 64)
    return int(address)


def allowed(address: IPAddress, access: AccessConfig) -> bool:
    """Whether [access] lets a client at `address` ask: not denied, and allowed when
    an allow list is given (deny wins over allow)."""
    if any(address in network for network in access.deny):
        return False
    return not access.allow or any(address in network for network in access.allow)


class RateLimiter:
    """A token bucket per client: `rate` queries per second, bursts of up to `burst`.

    The table is bounded: beyond `size` clients, the one heard from least
    recently is forgotten (and starts again with a full bucket), so a flood
    from many addresses cannot grow memory.
    """

    def __init__(self, rate: float, burst: int, size: int) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    @classmethod
    def for_limits(cls, limits: LimitsConfig) -> RateLimiter:
        """The limiter that [limits] per_client_rate, per_client_burst and clients_tracked
        describe."""
        return cls(limits.per_client_rate, limits.per_client_burst, limits.clients_tracked)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(
        self, client: Hashable, now: float, rate: float | None = None, burst: int | None = None
    ) -> bool:
        """Take one token from `client`'s bucket at time `now`; False if it is empty. `rate`
        and `burst`: this client's, where they differ from the limiter's."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            return True
        full = float(self.burst if burst is None else burst)
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            tokens = full
            if len(self._buckets) >= self.size:
                self._buckets.popitem(last=False)
        else:
            tokens, then = bucket
            tokens = min(full, tokens + max(0.0, now - then) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)
        return allowed
