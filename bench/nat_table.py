#!/usr/bin/env python3
"""What a NAT query costs as the gateway's connection-tracking table grows.

Builds outer host -- gateway -- inner host in network namespaces with real
masquerading (tests/netns.py), runs procident on the gateway with [nat] enabled and
a map (so the figures are the table search, not an inner daemon's answer), keeps one
inner connection open, then for each table size fills the table with connections
from the inner host (opened and closed: conntrack keeps them for 120 s in TIME_WAIT)
and measures, in one run:

- read:   reading /proc/net/nf_conntrack once, whole (the kernel's formatting);
- search: procident's search of it (conntrack.ConntrackTable.find), same table;
- query:  ident queries from the outer host about the open connection (a new
  connection each, one at a time), and about a port pair the table does not hold;
- flood:  the same absent queries from C clients at once (a scanner's load): the
  queries of one loop turn share one read of the table, so the rate stays above
  one query per read.

    python3 bench/nat_table.py                       # as root; about a minute
    python3 bench/nat_table.py --sizes 0,20000 --queries 100
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from netns import Chain, inside  # type: ignore[import-not-found]  # noqa: E402

from procident.lookup import Endpoint  # noqa: E402
from procident.lookup.conntrack import ConntrackTable  # noqa: E402

FILL_PORTS = range(7000, 7100)  # outer ports: masquerading gives 1000 outer ports per one


def start_gateway(chain: Chain, workdir: str) -> subprocess.Popen[bytes]:
    config = Path(workdir) / "gateway.toml"
    config.write_text(
        '[nat]\nenabled = true\norder = "map"\nforward = false\n'
        '[[nat.map]]\nhosts = ["10.0.0.0/8"]\nreply = "guest"\n'
        "[limits]\nper_client_rate = 0\nper_client_connections = 256\n"
    )
    log = open(Path(workdir) / "gateway.log", "wb")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(
        ["ip", "netns", "exec", chain.gateways[0].name, sys.executable, "-m", "procident",
         "serve", "--config", str(config), "--listen", "0.0.0.0:113", "--log-level", "warning"],
        stdout=log, stderr=log, cwd=ROOT,
    )  # fmt: skip
    gateway = chain.gateways[0].up[4]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            ask(chain, gateway, b"1,1\r\n")
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(
        f"the gateway's procident did not start: {(Path(workdir) / 'gateway.log').read_text()}"
    )


def ask(chain: Chain, gateway: str, query: bytes) -> bytes:
    with inside(chain.outer.name):
        sock = socket.socket()
    with sock:
        sock.settimeout(10)
        sock.connect((gateway, 113))
        sock.sendall(query)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
        return data


def flood_rate(chain: Chain, gateway: str, query: bytes, count: int, clients: int) -> float:
    """Queries per second with `clients` asking at once, `count` queries in all."""
    expected = query.rstrip(b"\r\n") + b":ERROR:NO-USER\r\n"
    wrong: list[bytes] = []

    def client() -> None:
        for _ in range(count // clients):
            reply = ask(chain, gateway, query)
            if reply != expected:
                wrong.append(reply)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    assert not wrong, wrong[:3]
    return clients * (count // clients) / elapsed


def fill(chain: Chain, listeners: list[socket.socket], count: int) -> None:
    """`count` connections from the inner host to the outer one, each closed at once."""
    target = chain.outer.down[4]
    for n in range(count):
        listener = listeners[n % len(listeners)]
        with inside(chain.inner.name):
            client = socket.socket()
        client.connect((target, listener.getsockname()[1]))
        accepted, _ = listener.accept()
        client.close()
        accepted.close()


def table_lines(chain: Chain) -> int:
    output = subprocess.run(
        ["ip", "netns", "exec", chain.gateways[0].name, "conntrack", "-C"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(output.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,10000,40000", help="connections added, cumulative")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients of the flood")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it builds network namespaces")
    sizes = [int(size) for size in args.sizes.split(",")]
    chain = Chain(1)
    process = None
    try:
        with tempfile.TemporaryDirectory() as workdir:
            process = start_gateway(chain, workdir)
            with inside(chain.outer.name):
                service = socket.create_server((chain.outer.down[4], 6667))
                fillers = [
                    socket.create_server((chain.outer.down[4], port), backlog=64)
                    for port in FILL_PORTS
                ]
            with inside(chain.inner.name):
                probe = socket.create_connection((chain.outer.down[4], 6667))
            accepted, peer = service.accept()
            gateway = chain.gateways[0].up[4]
            with inside(chain.gateways[0].name):
                table = ConntrackTable()  # as the daemon does: opened in its namespace
            outer_end = Endpoint(ipaddress.ip_address(gateway), peer[1])
            server = ipaddress.ip_address(chain.outer.down[4])
            live = b"%d,6667\r\n" % peer[1]
            absent = b"%d,6667\r\n" % (1 if peer[1] != 1 else 2)
            expected = b"%d,6667:USERID:OTHER:guest\r\n" % peer[1]
            print(f"{args.queries} queries each, one at a time; Python {sys.version.split()[0]}")
            print(f"{'entries':>8} {'read ms':>8} {'search ms':>9} {'live p50':>9} "
                  f"{'live p99':>9} {'absent p50':>10} {'q/s':>6} {'flood q/s':>9}")  # fmt: skip
            added = 0
            for size in sizes:
                fill(chain, fillers, size - added)
                added = size
                entries = table_lines(chain)
                reads, searches = [], []
                for _ in range(5):
                    started = time.perf_counter()
                    total = sum(len(chunk) for chunk in table._chunks())
                    reads.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    found = table.find(outer_end, 6667, server)
                    searches.append(time.perf_counter() - started)
                    assert found, "the probe connection is not in the table"
                times: dict[bytes, list[float]] = {live: [], absent: []}
                started_all = time.perf_counter()
                for _ in range(args.queries):
                    for query in (live, absent):
                        started = time.perf_counter()
                        reply = ask(chain, gateway, query)
                        times[query].append(time.perf_counter() - started)
                        if query is live:
                            assert reply == expected, reply
                rate = 2 * args.queries / (time.perf_counter() - started_all)
                flood = flood_rate(chain, gateway, absent, args.queries, args.clients)
                live_ms = sorted(t * 1000 for t in times[live])
                print(
                    f"{entries:>8} {min(reads) * 1000:>8.2f} {min(searches) * 1000:>9.2f} "
                    f"{statistics.median(live_ms):>9.2f} "
                    f"{live_ms[int(len(live_ms) * 0.99) - 1]:>9.2f} "
                    f"{statistics.median(times[absent]) * 1000:>10.2f} {rate:>6.0f} {flood:>9.0f}"
                    f"   ({total / 1e6:.1f} MB of text)"
                )
            probe.close()
            accepted.close()
            table.close()
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
        chain.remove()


if __name__ == "__main__":
    main()
