"""Who owns a connection: the shared types (procident.lookup.types), and the choice of
backend (netlink sock_diag, else /proc)."""

from __future__ import annotations

import ipaddress
import logging

from procident.lookup import netlink, procfs
from procident.lookup.types import (
    Backend,
    ConnectionId,
    Endpoint,
    Found,
    IPAddress,
    LookupFailed,
    SocketEntry,
    TcpState,
    endpoint_from_sockaddr,
    lines_with,
    normalize_address,
)

__all__ = [
    "Backend",
    "ConnectionId",
    "Endpoint",
    "Found",
    "IPAddress",
    "LookupFailed",
    "SocketEntry",
    "TcpState",
    "endpoint_from_sockaddr",
    "lines_with",
    "normalize_address",
    "select_backend",
]

log = logging.getLogger(__name__)


def select_backend(name: str) -> Backend:
    """The backend for lookup.backend: "netlink", "procfs", or "auto" (netlink when the
    kernel answers sock_diag requests, else procfs). LookupFailed if netlink was asked
    for by name and does not work."""
    if name == "procfs":
        return procfs.ProcfsBackend()
    try:
        backend = netlink.NetlinkBackend()
    except OSError as err:
        return _without_netlink(name, err)
    try:
        # A lookup of a connection that cannot exist: the kernel must answer "none".
        nowhere = Endpoint(ipaddress.IPv4Address("127.0.0.1"), 0)
        backend.find(ConnectionId(nowhere, nowhere))
    except LookupFailed as err:
        backend.close()
        return _without_netlink(name, err)
    return backend


def _without_netlink(name: str, err: Exception) -> Backend:
    if name == "netlink":
        raise LookupFailed(f"lookup.backend: netlink does not work here: {err}")
    log.info("netlink sock_diag does not work here (%s); reading /proc instead", err)
    return procfs.ProcfsBackend()
