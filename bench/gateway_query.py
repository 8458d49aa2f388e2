#!/usr/bin/env python3
"""What a query forwarded by a NAT gateway costs beside a normal one, per backend.

On an inner host, a gateway of [nat] gateways asks from its own address about a
connection whose remote end is the gateway's outer peer: no exact lookup can find it,
so the socket tables are searched by local end and remote port (find_any_remote). With
N connections open (--sizes), it times procident's Responder answering Q such queries
and Q normal ones about the same connections, each alone, and in batches of 50 (the
gateway queries of one loop turn share one search: Responder.prepare), for the netlink
and the procfs backend. Then the whole daemon's cost ("loop"): the CPU of an in-process
Server (netlink, answers logged to a file) per query, in turns of one client (alone)
and in --turns turns of 50 clients, each of which connects, asks, reads and closes,
from the gateway's address or the peer's.

    python3 bench/gateway_query.py [--sizes 100,10000] [--queries 2000] [--turns 60]

Loopback only; the connections are closed at the end (reset: no TIME_WAIT left behind).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import resource
import select
import socket
import struct
import tempfile
import time
from dataclasses import replace

from procident.config import Config, LimitsConfig, NatConfig, Rule
from procident.logsetup import TEXT_FORMAT, TextFormatter
from procident.lookup import ConnectionId, Endpoint
from procident.lookup.netlink import NetlinkBackend
from procident.lookup.procfs import ProcfsBackend
from procident.protocol import Query
from procident.responder import Responder
from procident.server import Server, open_listeners

GATEWAY = ipaddress.IPv4Address("127.0.0.9")  # asks for its outer peer 127.0.0.2
HERE = ipaddress.IPv4Address("127.0.0.1")
INNER = ipaddress.IPv4Address("127.0.0.2")  # the inner host's end of its connections
BATCH = 50
# The load comes from one address: the per-client limits lifted, as in ident_load.py.
UNLIMITED = LimitsConfig(per_client_connections=1000, per_client_burst=100_000, per_client_rate=0)
LINGER_RESET = struct.pack("ii", 1, 0)  # clients close with RST: no TIME_WAIT left behind


def connections(n: int) -> tuple[list[tuple[int, int]], list[socket.socket]]:
    """N connections from 127.0.0.2 to a service on 127.0.0.1: (service port, peer port)."""
    service = socket.create_server((str(HERE), 0), backlog=4096)
    held: list[socket.socket] = [service]
    pairs = []
    for _ in range(n):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        client.bind(("127.0.0.2", 0))
        client.connect(service.getsockname())
        accepted, _ = service.accept()
        held += [client, accepted]
        pairs.append((service.getsockname()[1], client.getsockname()[1]))
    return pairs, held


def timed(responder: Responder, asks: list[tuple[Query, ConnectionId]], batch: int) -> float:
    """Microseconds per answer, `batch` queries per responder.batch() block, gathered
    first as the daemon gathers a turn's (Responder.prepare)."""
    started = time.perf_counter()
    for at in range(0, len(asks), batch):
        with responder.batch():
            if batch > 1:
                responder.prepare([conn for _, conn in asks[at : at + batch]])
            for query, conn in asks[at : at + batch]:
                answer = responder.respond(query, conn, 0.0)
                assert answer.line is not None and b"USERID" in answer.line, answer.line
    return (time.perf_counter() - started) / len(asks) * 1e6


def in_loop(
    config: Config,
    chosen: list[tuple[int, int]],
    querier: str,
    rounds: int,
    log_to: str,
    per_turn: int = BATCH,
) -> float:
    """Microseconds of CPU per query in procident's own loop (an in-process Server, the
    netlink backend, the answer lines logged to a file by procident's text handler, as
    the daemon does): `rounds` turns of `per_turn` clients from `querier`, each asking
    about one connection of `chosen` and closing once answered. Only Server.step is
    timed; every reply is checked."""
    log = logging.getLogger("procident")
    stream = open(log_to, "a")  # noqa: SIM115 (closed below: a handler's close does not)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    backend = NetlinkBackend()
    server = Server(config, Responder(backend, config), open_listeners((Endpoint(INNER, 0),)))
    address = server.listeners[0].getsockname()
    spent = 0.0
    try:
        for turn in range(rounds):
            clients = []
            asked = [chosen[(turn * per_turn + i) % len(chosen)] for i in range(per_turn)]
            for service, peer in asked:
                client = socket.socket()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                client.bind((querier, 0))
                client.connect(address)
                client.send(b"%d,%d\r\n" % (peer, service))
                clients.append(client)
            poll = select.poll()  # (not select(): N connections take descriptors > 1024)
            for client in clients:
                poll.register(client, select.POLLIN)
            answered: set[int] = set()
            for _ in range(1000):  # bounded: a turn or two answer them all
                started = time.process_time()
                server.step(0.05)
                spent += time.process_time() - started
                answered.update(fd for fd, _ in poll.poll(0))
                if len(answered) == len(clients):
                    break
            for client, (service, peer) in zip(clients, asked, strict=True):
                client.settimeout(5.0)  # (bounded, should an answer never come)
                reply = client.recv(600)
                assert reply.startswith(b"%d,%d:USERID:" % (peer, service)), reply
                client.close()
            for _ in range(1000):
                if not server.connections:
                    break
                started = time.process_time()
                server.step(0.05)
                spent += time.process_time() - started
    finally:
        server.close()
        backend.close()
        log.removeHandler(handler)
        handler.close()
        stream.close()
    return spent / (rounds * per_turn) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,10000")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=60, help="turns of 50 in the loop")
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
            # The whole daemon's cost: accepting, reading, answering, logging, closing.
            loop_config = replace(config, limits=UNLIMITED)
            with tempfile.TemporaryDirectory() as workdir:
                log_to = os.path.join(workdir, "answers.log")
                for per_turn in (1, BATCH):
                    # As many queries either way: alone, BATCH times the turns.
                    turns = args.turns * BATCH // per_turn
                    a = in_loop(loop_config, chosen, str(HERE), turns, log_to, per_turn)
                    b = in_loop(loop_config, chosen, str(GATEWAY), turns, log_to, per_turn)
                    shown = "alone" if per_turn == 1 else f"{per_turn}/turn"
                    print(
                        f"{n:>6} {'loop':<8} {a:>10.1f} {b:>11.1f} {b / a:>6.1f}  {shown:<8}",
                        flush=True,
                    )
        finally:
            for sock in held:
                sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    main()
