"""The configuration's frozen dataclasses, one per TOML section, and their defaults.

The defaults are the embedded default configuration; etc/procident.toml documents
exactly them (a test holds the two together). procident.config reads a file into
these; every other module only reads them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from procident.lookup import Endpoint
from procident.tomlcheck import IPNetwork, PortRange

DEFAULT_USER = "procident"
FALLBACK_USER = "nobody"  # for DEFAULT_USER on a host that has no such account yet


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: where to listen and whom to run as."""

    listen: tuple[Endpoint, ...] = (
        Endpoint(ipaddress.IPv4Address("0.0.0.0"), 113),
        Endpoint(ipaddress.IPv6Address("::"), 113),
    )
    user: str = DEFAULT_USER  # FALLBACK_USER where there is no such account
    group: str = ""  # empty: the user's primary group
    keep_root: bool = False


@dataclass(frozen=True, slots=True)
class NetworkLimits:
    """One [[limits.networks]] entry: other per-client limits for the clients in `clients`
    (the IRC servers a bouncer host serves, say). None: as [limits] says."""

    name: str
    clients: tuple[IPNetwork, ...]
    per_client_connections: int | None = None
    per_client_rate: float | None = None
    per_client_burst: int | None = None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[limits]: what one client, and all of them, may hold."""

    idle_timeout: int = 60
    # Enough for a reconnection wave: an IRC server asking about 500 bouncer users at once.
    max_connections: int = 1024
    # Connections one client may hold beyond this are answered too, but only if they ask
    # at once, and once (session.FIRST_QUERY_GRACE): idle ones past it are closed.
    per_client_connections: int = 8
    max_queries_per_connection: int = 20
    per_client_rate: float = 10.0  # queries per second, sustained; 0: no limit
    per_client_burst: int = 1000  # a wave of 500 queries at once, twice
    over_limit: str = "error"  # or "close"
    clients_tracked: int = 65536  # the rate limiter's table holds at most this many clients
    networks: tuple[NetworkLimits, ...] = ()  # first match wins


@dataclass(frozen=True, slots=True)
class ReplyConfig:
    """[reply]: what the answers look like."""

    os: str = "UNIX"
    other_os: str = "OTHER"
    charset: str = ""  # empty: none sent
    unknown_uid: str = "numeric"  # or "no-user"
    inbound: str = "hide"  # or "no-user", "answer"
    mask_errors: bool = False
    min_response_time: float = 0.0  # seconds every well-formed query waits at least
    reply_all: str = ""  # one id for every well-formed query, no lookup; empty: off
    fallback: str = ""  # id for connections not found or lookups that fail; empty: off


@dataclass(frozen=True, slots=True)
class Rule:
    """One [[rules]] entry: what it matches, and what to answer.

    An empty match field matches anything. users, uids and groups together name
    the owners the rule is for (any of them); every other field given must
    match too.
    """

    name: str
    action: str
    users: frozenset[str] = frozenset()
    uids: tuple[PortRange, ...] = ()  # uid ranges
    groups: frozenset[str] = frozenset()
    clients: tuple[IPNetwork, ...] = ()
    local_addresses: tuple[IPNetwork, ...] = ()
    server_ports: tuple[PortRange, ...] = ()
    client_ports: tuple[PortRange, ...] = ()
    inbound: bool = False  # the rule is for inbound connections (and only for them)
    reply: tuple[str, ...] = ()  # action "reply": one of these, at random
    os: str = ""  # empty: [reply] os for login names, other_os for the rest
    charset: str = ""
    forward: Endpoint | None = None
    user_may: frozenset[str] = frozenset()  # what the owner's own file may choose
    # Its clients keep ids longer than IRC's 10 characters (mail servers, audit logs):
    # check-config does not warn about its long tokens or reply ids.
    long_ids: bool = False


DEFAULT_RULES = (Rule(name="rules[0]", action="hide", users=frozenset({"root"})),)


@dataclass(frozen=True, slots=True)
class UsersConfig:
    """[users]: what the owners of connections may say about their replies."""

    noident: bool = False  # a ~/.noident file hides its owner
    opt_in: bool = False  # answer only for owners who have a ~/.ident file
    oidentd_files: bool = True  # read ~/.oidentd.conf where a rule lets users choose
    max_file_size: int = 16384
    cache_seconds: int = 0  # 0: read at every query (what bouncers write changes each time)
    # Started unprivileged (procident.service), the root helper systemd runs on this socket
    helper_socket: str = "/run/procident/helper.sock"


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """[access]: which clients may ask at all."""

    allow: tuple[IPNetwork, ...] = ()  # empty: every client not denied
    deny: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class TokensConfig:
    """[tokens]: the key of actions "token" and "audit-id", and how audit ids are made."""

    key_file: str = "/var/lib/procident/token.key"
    audit_period: str = "week"  # an audit id stays the same for this long (or "forever")
    audit_scope: str = "network"  # one id per querier network; "all": the same for all
    audit_ipv4_prefix: int = 24  # the querier's network, for audit_scope "network"
    audit_ipv6_prefix: int = 48
    audit_uids: tuple[int, int] = (0, 65535)  # tried by decode-token, beside the accounts


@dataclass(frozen=True, slots=True)
class ForwardConfig:
    """[forward]: asking a local application's ident server (action "forward")."""

    # Under Ergo's 1.5 s for the whole ident exchange (InspIRCd's is 5 s): a forward
    # that does not answer in time leaves room for the fallback answer to arrive.
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class NatMapEntry:
    """One [[nat.map]] entry: the answer for inner hosts in `hosts`."""

    name: str
    hosts: tuple[IPNetwork, ...]
    action: str = "reply"  # or "hide", "no-user", "deny"
    reply: tuple[str, ...] = ()  # action "reply": one of these, at random
    os: str = ""  # empty: [reply] other_os
    charset: str = ""  # empty: [reply] charset


@dataclass(frozen=True, slots=True)
class NatConfig:
    """[nat]: answering for connections this host translates for hosts behind it, and
    queries forwarded by the gateway in front of this host."""

    enabled: bool = False  # look translated connections up in the connection-tracking table
    order: str = "forward"  # or "map": which of the two is tried first
    forward: bool = True  # ask the inner host's ident daemon
    port: int = 113  # the inner hosts' ident port
    map: tuple[NatMapEntry, ...] = ()
    gateways: tuple[IPNetwork, ...] = ()  # whose forwarded queries this host answers


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: counters for monitoring, in the Prometheus text format."""

    listen: str = ""  # ADDRESS:PORT serving GET /metrics; empty: off
    textfile: str = ""  # a file rewritten atomically every `interval`; empty: off
    interval: int = 15


@dataclass(frozen=True, slots=True)
class LookupConfig:
    """[lookup]: how the kernel is asked."""

    backend: str = "auto"  # or "netlink", "procfs"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: where log lines go."""

    level: str = "info"
    target: str = "stderr"  # or "syslog"
    syslog_socket: str = "/dev/log"
    syslog_facility: str = "daemon"
    format: str = "text"  # or "json": one object per line
    user_names: bool = True  # false: answer lines name owners by uid only, and omit ids


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    reply: ReplyConfig = field(default_factory=ReplyConfig)
    lookup: LookupConfig = field(default_factory=LookupConfig)
    log: LogConfig = field(default_factory=LogConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    nat: NatConfig = field(default_factory=NatConfig)
    rules: tuple[Rule, ...] = DEFAULT_RULES
