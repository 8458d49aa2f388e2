"""Connection matching, shared by the admin's rules (policy) and users' choices
(userfiles): one meaning of clients, local_addresses, server_ports and client_ports."""

from __future__ import annotations

from typing import Protocol

from procident.lookup import ConnectionId
from procident.tomlcheck import IPNetwork, PortRange


class ConnectionMatch(Protocol):
    """The connection fields a rule and a user's choice match on (empty: any)."""

    @property
    def clients(self) -> tuple[IPNetwork, ...]: ...
    @property
    def local_addresses(self) -> tuple[IPNetwork, ...]: ...
    @property
    def server_ports(self) -> tuple[PortRange, ...]: ...
    @property
    def client_ports(self) -> tuple[PortRange, ...]: ...


def connection_mismatch(match: ConnectionMatch, conn: ConnectionId) -> str:
    """The first of `match`'s connection fields that `conn` fails (local = this host's
    end), or "" when it fits them all."""
    if match.clients and not any(conn.remote.address in net for net in match.clients):
        return "clients"
    if match.local_addresses and not any(
        conn.local.address in net for net in match.local_addresses
    ):
        return "local_addresses"
    if match.server_ports and not any(
        low <= conn.local.port <= high for low, high in match.server_ports
    ):
        return "server_ports"
    if match.client_ports and not any(
        low <= conn.remote.port <= high for low, high in match.client_ports
    ):
        return "client_ports"
    return ""
