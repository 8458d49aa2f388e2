#!/usr/bin/env python3
"""Cost of one lookup, per backend, against real kernel tables of N connections.

Builds N established loopback connections (this process holds the client ends,
a child the accepted ends), then times backend.find() for up to SAMPLES
connections that exist and as many port pairs that do not (what a scanner
sends), for each backend, and prints microseconds per lookup.
"procfs full parse" is the cost of parsing every line, for comparison with the
text search the procfs backend does. Run as root (it raises its file limit):

    python3 bench/lookup_cost.py [N ...]

Figures depend on the machine; compare the ratios within one run.
"""

from __future__ import annotations

import ipaddress
import os
import random
import resource
import socket
import sys
import time
from collections.abc import Callable

from procident.lookup import ConnectionId, Endpoint, endpoint_from_sockaddr, normalize_address
from procident.lookup.netlink import NetlinkBackend
from procident.lookup.procfs import ProcfsBackend, parse_table

SAMPLES = 300
MAX_SECONDS = 20.0  # per measurement, so a slow backend cannot stall the run


def build(n: int) -> tuple[list[socket.socket], list[ConnectionId], Callable[[], None]]:
    """N loopback connections: this process holds the client ends, a child the accepted
    ends (each process then needs about N file descriptors, not 2N). Returns the client
    sockets, their ConnectionIds and a function that ends the child."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: accept and hold until told
        os.close(hold_w)
        held = [listener.accept()[0] for _ in range(n)]
        os.read(hold_r, 1)
        os._exit(0 if held else 1)
    os.close(hold_r)
    address = listener.getsockname()
    listener.close()
    clients, conns = [], []
    for _ in range(n):
        client = socket.create_connection(address)
        clients.append(client)
        conns.append(
            ConnectionId(
                endpoint_from_sockaddr(client.getsockname()),
                endpoint_from_sockaddr(client.getpeername()),
            )
        )

    def end() -> None:
        os.close(hold_w)
        os.waitpid(pid, 0)

    return clients, conns, end


def per_lookup(find: Callable[[ConnectionId], object], conns: list[ConnectionId]) -> float:
    """Microseconds per call of find() over `conns` (bounded by MAX_SECONDS)."""
    start = time.perf_counter()
    done = 0
    for conn in conns:
        find(conn)
        done += 1
        if time.perf_counter() - start > MAX_SECONDS:
            break
    return (time.perf_counter() - start) / done * 1e6


def full_parse(conn: ConnectionId) -> object:
    """The naive /proc lookup: parse every line of both tables, compare all four values."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path, "rb") as table:
            for entry in parse_table(table.read().decode("ascii")):
                here = Endpoint(normalize_address(entry.local.address), entry.local.port)
                there = Endpoint(normalize_address(entry.remote.address), entry.remote.port)
                if ConnectionId(here, there) == conn:
                    return entry
    return None


def main(sizes: list[int]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(sizes) + 1024), hard))
    backends = {
        "netlink": NetlinkBackend().find,
        "procfs": ProcfsBackend().find,
        "procfs full parse": full_parse,
    }
    print(f"{'N':>6}  {'backend':<18} {'found us':>10} {'absent us':>10}")
    rows: dict[tuple[int, str], tuple[float, float]] = {}
    for n in sizes:
        sockets, conns, end = build(n)
        found = random.Random(n).sample(conns, min(SAMPLES, n))
        nowhere = ipaddress.IPv4Address("127.0.0.9")
        absent = [ConnectionId(c.local, Endpoint(nowhere, c.remote.port)) for c in found]
        for name, find in backends.items():
            assert all(find(c) is not None for c in found[:10]), name
            assert all(find(c) is None for c in absent[:10]), name
            rows[n, name] = (per_lookup(find, found), per_lookup(find, absent))
            print(f"{n:>6}  {name:<18} {rows[n, name][0]:>10.1f} {rows[n, name][1]:>10.1f}")
        for sock in sockets:
            sock.close()
        end()
    small, large = min(sizes), max(sizes)
    print(f"\ncost at N={large} relative to N={small} (1.0 = flat in the table size):")
    for name in backends:
        print(
            f"  {name:<18} found {rows[large, name][0] / rows[small, name][0]:6.1f}x"
            f"   absent {rows[large, name][1] / rows[small, name][1]:6.1f}x"
        )


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [100, 1000, 10000])
