"""Shared test helpers."""

from __future__ import annotations

from procident.lookup import ConnectionId, Found, SocketEntry


class DictBackend:
    """A lookup backend that is a dict from ConnectionId to socket entry (not a mock)."""

    name = "dict"

    def __init__(self, table: dict[ConnectionId, SocketEntry], listening: frozenset[int] = frozenset()):
        self.table = table
        self.listening = listening  # local ports that have a listening socket

    def find(self, conn: ConnectionId) -> Found | None:
        entry = self.table.get(conn)
        return None if entry is None else Found(entry, entry.local.port in self.listening)
