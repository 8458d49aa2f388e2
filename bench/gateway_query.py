#!/usr/bin/env python3
"""What a query forwarded by a NAT gateway costs beside a normal one, per backend.

On an inner host, a gateway of [nat] gateways asks from its own address about a
connection whose remote end is the gateway's outer peer: no exact lookup can find it,
so the socket tables are searched by local end and remote port (find_any_remote). With
N connections open (--sizes), it times procident's Responder answering Q such queries
and Q normal ones about the same connections, each alone, and in batches of 50 (the
queries of one loop turn share the search), for the netlink and the procfs backend.

    python3 bench/gateway_query.py [--sizes 100,10000] [--queries 2000]

Loopback only; the connections are closed at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import resource
import socket
import time
from dataclasses import replace

from procident.config import Config, NatConfig, Rule
from procident.lookup import ConnectionId, Endpoint
from procident.lookup.netlink import NetlinkBackend
from procident.lookup.procfs import ProcfsBackend
from procident.protocol import Query
from procident.responder import Responder

GATEWAY = ipaddress.IPv4Address("127.0.0.9")  # asks for its outer peer 127.0.0.2
HERE = ipaddress.IPv4Address("127.0.0.1")
BATCH = 50


def connections(n: int) -> tuple[list[tuple[int, int]], list[socket.socket]]:
    """N connections from 127.0.0.2 to a service on 127.0.0.1: (service port, peer port)."""
    service = socket.create_server((str(HERE), 0), backlog=4096)
    held: list[socket.socket] = [service]
    pairs = []
    for _ in range(n):
        client = socket.socket()
        client.bind(("127.0.0.2", 0))
        client.connect(service.getsockname())
        accepted, _ = service.accept()
        held += [client, accepted]
        pairs.append((service.getsockname()[1], client.getsockname()[1]))
    return pairs, held


def timed(responder: Responder, asks: list[tuple[Query, ConnectionId]], batch: int) -> float:
    """Microseconds per answer, `batch` queries per responder.batch() block."""
    started = time.perf_counter()
    for at in range(0, len(asks), batch):
        with responder.batch():
            for query, conn in asks[at : at + batch]:
                answer = responder.respond(query, conn, 0.0)
                assert answer.line is not None and b"USERID" in answer.line, answer.line
    return (time.perf_counter() - started) / len(asks) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,10000")
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = replace(
        Config(),
        nat=NatConfig(gateways=(ipaddress.ip_network("127.0.0.9/32"),)),
        rules=(Rule(name="numeric", action="numeric"),),  # every owner named, root too
    )
    print(
        f"{'N':>6} {'backend':<8} {'normal us':>10} {'gateway us':>11} {'ratio':>6}  {'batched':<8}"
    )
    for n in (int(size) for size in args.sizes.split(",")):
        if 2 * n + 64 > hard:
            print(f"{n:>6} skipped: {2 * n + 64} open files needed, the hard limit is {hard}")
            continue
        pairs, held = connections(n)
        try:
            chosen = [pairs[i * 7919 % n] for i in range(args.queries)]
            # The inner host's outbound connection: its end on 127.0.0.2, the outer peer's
            # on 127.0.0.1; the gateway asks about it from its own address.
            peer_address = ipaddress.IPv4Address("127.0.0.2")
            normal = [
                (
                    Query(peer, service),
                    ConnectionId(Endpoint(peer_address, peer), Endpoint(HERE, service)),
                )
                for service, peer in chosen
            ]
            forwarded = [
                (
                    Query(peer, service),
                    ConnectionId(Endpoint(peer_address, peer), Endpoint(GATEWAY, service)),
                )
                for service, peer in chosen
            ]
            for name, make in (("netlink", NetlinkBackend), ("procfs", ProcfsBackend)):
                backend = make()
                responder = Responder(backend, config, any_remote=None)
                # procfs reads whole tables for each gateway query: fewer of them.
                count = args.queries if name == "netlink" else min(args.queries, 200)
                for batch in (1, BATCH):
                    a = timed(responder, normal[:count], batch)
                    b = timed(responder, forwarded[:count], batch)
                    shown = "alone" if batch == 1 else f"{batch}/turn"
                    print(
                        f"{n:>6} {name:<8} {a:>10.1f} {b:>11.1f} {b / a:>6.1f}  {shown:<8}",
                        flush=True,
                    )
                if isinstance(backend, NetlinkBackend):
                    backend.close()
        finally:
            for sock in held:
                sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    main()
