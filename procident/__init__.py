"""procident: an RFC 1413 ident daemon for Linux, and a library to answer ident yourself.

The public API is exactly the names in __all__ below, and procident.aio's
(the asyncio server). They keep their meaning within a major version.
Everything else is private: names with a leading underscore, the private
module procident._embed (whose public names are re-exported here), and the
daemon's own modules (procident.server, .cli, .policy, .config, .responder,
.homes, .tokens, .userfiles, .forward, .process), which keep the names of the
daemon's design and may change in any release.

- The sans-IO protocol: QueryReader (bytes in, events out: Query,
  InvalidPort, Malformed, Overlong), parse_query, format_reply (which refuses
  what the RFC forbids, raising ReplyError), parse_reply for clients.
- Replies: UserIdReply, ErrorReply, ErrorType (the RFC's error tokens).
- The kernel's answer: Endpoint, ConnectionId, and the lookup backends
  (NetlinkBackend, ProcfsBackend, select_backend) that find a connection's
  SocketEntry (Found), raising LookupFailed when they cannot look.
- Answering from your own lookup: a callable taking a ConnectionId and
  returning a user id, a UserIdReply, an RFC error or None, or raising
  NoUser, HiddenUser, UnknownError or InvalidPortError; LookupResponder for
  a synchronous one, procident.aio.serve_ident for an asyncio server, with
  the daemon's [limits] as a LimitsConfig.
"""

from procident._embed import (
    AsyncLookup,
    HiddenUser,
    IdentError,
    InvalidPortError,
    Lookup,
    LookupResponder,
    LookupResult,
    NoUser,
    SyncLookup,
    UnknownError,
)
from procident.config import LimitsConfig
from procident.lookup import (
    Backend,
    ConnectionId,
    Endpoint,
    Found,
    LookupFailed,
    SocketEntry,
    TcpState,
    select_backend,
)
from procident.lookup.netlink import NetlinkBackend
from procident.lookup.procfs import ProcfsBackend
from procident.protocol import (
    ErrorReply,
    ErrorType,
    Event,
    InvalidPort,
    Malformed,
    Overlong,
    ParsedReply,
    Query,
    QueryReader,
    Reply,
    ReplyError,
    UserIdReply,
    format_reply,
    parse_query,
    parse_reply,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncLookup",
    "Backend",
    "ConnectionId",
    "Endpoint",
    "ErrorReply",
    "ErrorType",
    "Event",
    "Found",
    "HiddenUser",
    "IdentError",
    "InvalidPort",
    "InvalidPortError",
    "LimitsConfig",
    "Lookup",
    "LookupFailed",
    "LookupResponder",
    "LookupResult",
    "Malformed",
    "NetlinkBackend",
    "NoUser",
    "Overlong",
    "ParsedReply",
    "ProcfsBackend",
    "Query",
    "QueryReader",
    "Reply",
    "ReplyError",
    "SocketEntry",
    "SyncLookup",
    "TcpState",
    "UnknownError",
    "UserIdReply",
    "__version__",
    "format_reply",
    "parse_query",
    "parse_reply",
    "select_backend",
]
