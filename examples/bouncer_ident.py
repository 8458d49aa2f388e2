#!/usr/bin/env python3
"""A bouncer's own ident server: it knows which of its users owns each connection.

A bouncer (or bridge, or gateway) that opens connections to IRC servers for
its users records each one; when a server asks who owns it, it answers with
that user's chosen ident. Here the table comes from the command line:

    python3 examples/bouncer_ident.py PORT LOCAL_PORT:REMOTE_PORT:USER ... [--hide USER]

and the server runs until interrupted. It prints "listening on HOST:PORT"
once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import procident
import procident.aio

# (our port, the IRC server's port) -> the user whose connection it is.
Connections = dict[tuple[int, int], str]


def make_lookup(connections: Connections, hidden: set[str]) -> procident.SyncLookup:
    def lookup(conn: procident.ConnectionId) -> procident.LookupResult:
        user = connections.get((conn.local.port, conn.remote.port))
        if user is None:
            return None  # not one of ours: NO-USER
        if user in hidden:
            raise procident.HiddenUser()
        return user  # sent as USERID:OTHER:user

    return lookup


async def main(port: int, connections: Connections, hidden: set[str]) -> None:
    server = await procident.aio.start_ident_server(
        make_lookup(connections, hidden), "127.0.0.1", port
    )
    host, bound = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{bound}", flush=True)
    await server.server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="port to listen on (0: any free port)")
    parser.add_argument("connections", nargs="*", metavar="LOCAL_PORT:REMOTE_PORT:USER")
    parser.add_argument("--hide", action="append", default=[], metavar="USER")
    args = parser.parse_args()
    table: Connections = {}
    for item in args.connections:
        local, remote, user = item.split(":", 2)
        table[int(local), int(remote)] = user
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.port, table, set(args.hide)))
