#!/usr/bin/env python3
"""An ident server whose lookup must ask something else first: a coroutine.

Here the "something else" is a slow directory, simulated with a delay; a
real program might ask its session store or another service. procident awaits
the lookup for at most --timeout seconds and answers UNKNOWN-ERROR after that.

    python3 examples/async_lookup.py PORT LOCAL_PORT:REMOTE_PORT:USER ... [--delay S] [--timeout S]

It prints "listening on HOST:PORT" once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import procident
import procident.aio


class Directory:
    """Who owns which connection, known only after a round trip of `delay` seconds."""

    def __init__(self, owners: dict[tuple[int, int], str], delay: float) -> None:
        self.owners = owners
        self.delay = delay

    async def owner(self, local_port: int, remote_port: int) -> str | None:
        await asyncio.sleep(self.delay)
        return self.owners.get((local_port, remote_port))


async def main(port: int, directory: Directory, timeout: float) -> None:
    async def lookup(conn: procident.ConnectionId) -> procident.LookupResult:
        user = await directory.owner(conn.local.port, conn.remote.port)
        if user is None:
            raise procident.NoUser()
        return procident.UserIdReply(user, "UNIX")  # a login name of this host

    server = await procident.aio.start_ident_server(
        lookup, "127.0.0.1", port, lookup_timeout=timeout
    )
    host, bound = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{bound}", flush=True)
    await server.server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="port to listen on (0: any free port)")
    parser.add_argument("connections", nargs="*", metavar="LOCAL_PORT:REMOTE_PORT:USER")
    parser.add_argument("--delay", type=float, default=0.01, help="the directory's delay")
    parser.add_argument("--timeout", type=float, default=5.0, help="the lookup timeout")
    args = parser.parse_args()
    owners: dict[tuple[int, int], str] = {}
    for item in args.connections:
        local, remote, user = item.split(":", 2)
        owners[int(local), int(remote)] = user
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.port, Directory(owners, args.delay), args.timeout))
