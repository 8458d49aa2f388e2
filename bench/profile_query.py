#!/usr/bin/env python3
"""Where one query's time goes: cProfile of the real server loop answering real queries.

An in-process Server (netlink backend, log at info into memory) answers N
connect-query-close cycles from a client in the same process, about a
connection owned by this process. Prints the time per cycle without the
profiler, then procident's functions by cumulative time under it (the
profiler roughly doubles every figure; compare them with each other).

    python3 bench/profile_query.py [N]
"""

from __future__ import annotations

import cProfile
import io
import ipaddress
import logging
import pstats
import select
import socket
import sys
import time
from dataclasses import replace

from procident.config import Config, LimitsConfig
from procident.lookup import Endpoint
from procident.lookup.netlink import NetlinkBackend
from procident.responder import Responder
from procident.server import Server, open_listeners


def main(n: int) -> None:
    log = logging.getLogger("procident")
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler(io.StringIO()))  # format every line, keep none
    config = replace(Config(), limits=LimitsConfig(per_client_connections=100, per_client_rate=0))
    listen = (Endpoint(ipaddress.IPv4Address("127.0.0.1"), 0),)
    server = Server(config, Responder(NetlinkBackend(), config), open_listeners(listen))
    address = server.listeners[0].getsockname()
    service = socket.socket()
    service.bind(("127.0.0.1", 0))
    service.listen()
    owned = socket.create_connection(service.getsockname())
    service.accept()
    query = b"%d,%d\r\n" % (owned.getsockname()[1], service.getsockname()[1])

    def cycles() -> None:
        for _ in range(n):
            with socket.create_connection(address) as client:
                client.send(query)
                while not select.select([client], [], [], 0)[0]:
                    server.step(0.01)  # accept, read, look up, answer: one turn or two
                assert client.recv(600).startswith(query.rstrip())
            server.step(0)  # see the close

    start = time.perf_counter()
    cycles()
    wall = time.perf_counter() - start
    print(f"{n} connect-query-close cycles: {wall / n * 1e6:.0f} us each, client included")
    profile = cProfile.Profile()
    profile.enable()
    cycles()
    profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(r"procident[/\\]", 24)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
