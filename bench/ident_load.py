#!/usr/bin/env python3
"""Load benchmark: procident (each backend) against oidentd and a constant-reply server.

For each N (default 100, 1000, 10000) it builds N established loopback
connections owned by four real accounts (daemon, bin, sys, nobody: each opens
its share in a child that setuid()s first; a holder child keeps the accepted
ends), then, for each server, sends Q queries from C concurrent clients, one
query per connection, in two workloads:

  live    every query names one of the N connections (the owner is known,
          so every reply is checked);
  absent  every query names a port pair that does not exist (a scanner).

It prints throughput, p50 and p99 latency, the server's CPU time per query
(children included, for oidentd's per-connection processes), its peak RSS and
the count of wrong answers; then the ratios the targets speak of, and the
RSS of each daemon holding 2,000 idle connections.

The servers: procident with the netlink and the procfs backend (started as
root, dropping to nobody, logging a line per answer to a file, as by default:
--log-level), a constant-reply server on procident's own selectors loop (the
ceiling of the loop and of this load generator together), two servers without
procident's code: "minimal python" (a selectors loop sending one fixed reply) and
"floor python" (that loop, plus a real sock_diag lookup, the owner's name and a
log line per query: the least any Python ident server that answers truly can
cost), and oidentd when installed (apt-get install oidentd).
Servers run on CPU 0, the load generator on CPU 1. Run as root:

    python3 bench/ident_load.py [--sizes 100,1000,10000] [--queries 10000] [--concurrency 50]

The measurement runs in --repeat rounds; each round builds every N in turn and
runs every server once against it, after a warm-up, so that a slow spell of
this shared machine spoils one sample, not one server or one N. Each server's
best run per N is kept. Every run is bounded by --queries and --seconds; all
addresses are loopback.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

OWNERS = [("daemon", 1), ("bin", 2), ("sys", 3), ("nobody", 65534)]
SERVER_CPU, LOADGEN_CPU = 0, 1
LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT pile-up across runs
IDLE_CONNECTIONS = 2000
SETTLE = 10.0  # seconds between building the connections and measuring: creating
# thousands of connections leaves seconds of kernel work behind it (measured: live
# queries at N=10000 ran at half speed for the first ~2.5 s, then at full speed)
WARM_UP = 300  # queries sent to each server before it is measured
# The owners' connections use ports from here on, below the kernel's ephemeral
# range (32768-60999 by default): if they took N ephemeral ports, every connect()
# of the load generator would search past them, and the cost of that search would
# grow with N for every server alike, lookups or not.
OWNER_PORTS = 2000
LOG_LEVEL = "info"  # procident's default: one line per answer (--log-level)


# -- the connections asked about ------------------------------------------------


def build_connections(n: int) -> tuple[list[tuple[int, int, str]], list[int]]:
    """N connections to one service port, owned round-robin by OWNERS.
    Returns [(client port, service port, owner name)] and the child pids."""
    service = socket.socket()
    service.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    service.bind(("127.0.0.1", 0))
    service.listen(4096)
    service_port = service.getsockname()[1]
    pids = []
    holder = os.fork()
    if holder == 0:  # keeps the accepted ends open until killed
        try:
            held = [service.accept()[0] for _ in range(n)]
            signal.pause()
        finally:
            os._exit(0 if held else 1)
    pids.append(holder)
    service.close()
    connections: list[tuple[int, int, str]] = []
    shares = [n // len(OWNERS) + (i < n % len(OWNERS)) for i in range(len(OWNERS))]
    for index, ((name, uid), share) in enumerate(zip(OWNERS, shares, strict=True)):
        first_port = OWNER_PORTS + index * (max(shares) + 1000)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # an owner: become uid, connect, report ports, wait to be killed
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(uid)
                # Nothing may be imported from here on (Python's files may be unreadable
                # for uid): plain connect() to an address, never getaddrinfo().
                held = []
                port = first_port
                for _ in range(share):
                    sock = socket.socket()
                    while True:  # a port below the ephemeral range (see OWNER_PORTS)
                        port += 1
                        try:
                            sock.bind(("127.0.0.1", port))
                            break
                        except OSError:
                            continue
                    sock.connect(("127.0.0.1", service_port))
                    held.append(sock)
                    os.write(write_end, b"%d\n" % sock.getsockname()[1])
                os.close(write_end)
                signal.pause()
            finally:
                os._exit(0)
        os.close(write_end)
        pids.append(pid)
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
        os.close(read_end)
        connections += [(int(port), service_port, name) for port in data.split()]
    assert len(connections) == n, f"built {len(connections)} of {n} connections"
    return connections, pids


# -- servers --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    checks_answers: bool = True

    def stop(self) -> None:
        """Stop the server and every process it forked (oidentd's per-connection
        children would otherwise go on working into the next measurement)."""
        group = self.process.pid  # its own process group (start_new_session)
        os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        deadline = time.monotonic() + 30
        while group_members(group) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            time.sleep(0.1)
        if self.process.poll() is None:
            self.process.wait()


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                members.append(int(entry))
    return members


def on_server_cpu() -> None:
    os.sched_setaffinity(0, {SERVER_CPU})


def start_server(
    name: str, args: list[str], port: int, checks_answers: bool = True, log: str = os.devnull
) -> Server:
    """Start a server on SERVER_CPU; its standard error (procident's log) goes to `log`."""
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            preexec_fn=on_server_cpu,
            start_new_session=True,
        )
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return Server(name, process, port, checks_answers)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                with open(log, errors="replace") as said:
                    error = said.read()[-2000:]
                raise SystemExit(f"{name} did not start: {error}") from None
            time.sleep(0.05)


def procident_server(backend: str, workdir: str) -> Server:
    port = free_port()
    config = os.path.join(workdir, f"{backend}.toml")
    with open(config, "w") as file:
        file.write(
            f'[lookup]\nbackend = "{backend}"\n'
            # The load comes from one address: no per-client rate limit (oidentd has none).
            "[limits]\nmax_connections = 4096\nper_client_connections = 4096\n"
            "per_client_rate = 0\n"
        )
    os.chmod(config, 0o644)  # readable after the drop to nobody
    # The default log level (info: one line per answer), written to a file, as a
    # service's log is.
    args = [sys.executable, "-m", "procident", "serve", "--config", config]
    args += ["--listen", f"127.0.0.1:{port}", "--log-level", LOG_LEVEL]
    log = os.path.join(workdir, f"{backend}.log")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(log)
    return start_server(f"procident {backend}", args, port, log=log)


def constant_server() -> Server:
    port = free_port()
    args = [sys.executable, os.path.abspath(__file__), "--constant-server", str(port)]
    return start_server("constant reply", args, port, checks_answers=False)


def minimal_server() -> Server:
    port = free_port()
    args = [sys.executable, os.path.abspath(__file__), "--minimal-server", str(port)]
    return start_server("minimal python", args, port, checks_answers=False)


def floor_server(workdir: str) -> Server:
    port = free_port()
    args = [sys.executable, os.path.abspath(__file__), "--floor-server", str(port)]
    args.append(os.path.join(workdir, "floor.log"))
    return start_server("floor python", args, port)


def oidentd_server() -> Server | None:
    if shutil.which("oidentd") is None:
        return None
    port = free_port()
    args = ["oidentd", "-i", "-S", "-q", "-a", "127.0.0.1", "-p", str(port)]
    args += ["-l", "4096", "-u", "nobody", "-g", "nogroup"]
    return start_server("oidentd", args, port)


def run_minimal_server(port: int) -> None:
    """The least a Python ident server can do, without procident's code: a selectors
    loop that reads a line and sends one fixed reply (the floor of Python itself)."""
    serve_lines(port, lambda line, client: line + b":USERID:OTHER:constant\r\n")


def serve_lines(
    port: int,
    answer: Callable[[bytes, str], bytes],
    after_turn: Callable[[], None] = lambda: None,
) -> None:
    """The bench's own servers' loop, without procident's code: accept, read a line,
    send answer(the line without spaces, the client's address), close."""
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    loop = selectors.DefaultSelector()
    loop.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, tuple[bytes, str]] = {}
    while True:
        for key, _ in loop.select():
            sock = cast(socket.socket, key.fileobj)
            if sock is listener:
                with contextlib.suppress(BlockingIOError):
                    while True:
                        client, (address, _) = listener.accept()
                        client.setblocking(False)
                        loop.register(client, selectors.EVENT_READ)
                        buffers[client] = (b"", address)
                continue
            try:
                data = sock.recv(1024)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            before, address = buffers[sock]
            held = before + data
            if data and b"\n" not in held:
                buffers[sock] = (held[:1024], address)
                continue
            if data:
                line = held.split(b"\n", 1)[0].strip().replace(b" ", b"")
                with contextlib.suppress(OSError):
                    sock.send(answer(line, address))
            loop.unregister(sock)
            del buffers[sock]
            sock.close()
        after_turn()


def run_floor_server(port: int, log_path: str) -> None:
    """The least a Python ident server that answers with the real owner and logs can do,
    without procident's code: serve_lines's loop, plus for each query the port pair
    parsed, one sock_diag exact lookup (a request and its answer; a listener in the
    answer means no such connection), the owner's name (getpwuid, cached) and one log
    line, written to a file and flushed once per turn. No policy, no inbound check
    (is the local port a listening service's?), no limits, no timeouts, no escaping: a
    floor, not a daemon."""
    import pwd

    here = socket.inet_aton("127.0.0.1")
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4)  # NETLINK_SOCK_DIAG
    names: dict[int, str] = {}
    seq = 0
    log = open(log_path, "a")  # noqa: SIM115 (open while the server runs)

    def answer(line: bytes, client: str) -> bytes:
        nonlocal seq
        try:
            local_port, remote_port = (int(part) for part in line.split(b",", 1))
        except ValueError:
            return line + b":ERROR:INVALID-PORT\r\n"
        seq += 1
        diag.send(  # nlmsghdr (SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST), inet_diag_req_v2
            struct.pack("=IHHII", 16 + 56, 20, 1, seq, 0)
            + struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
            + struct.pack("!HH16s16s", local_port, remote_port, here, socket.inet_aton(client))
            + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
        )
        data = diag.recv(65536)
        pair = b"%d,%d" % (local_port, remote_port)
        # An error (no such socket), or a listener: the kernel answers with the listener
        # on the local port when there is no such connection.
        if struct.unpack_from("=H", data, 4)[0] != 20 or data[16 + 1] == 10:  # TCP_LISTEN
            reply = b"ERROR:NO-USER"
        else:
            uid = struct.unpack_from("=I", data, 16 + 64)[0]  # inet_diag_msg's idiag_uid
            name = names.get(uid)
            if name is None:
                name = names[uid] = pwd.getpwuid(uid).pw_name
            reply = b"USERID:UNIX:" + name.encode()
        log.write(
            f"{time.time():.3f} INFO answer client={client} query={pair.decode()} "
            f"reply={reply.decode()}\n"
        )
        return pair + b":" + reply + b"\r\n"

    serve_lines(port, answer, log.flush)


def run_constant_server(port: int) -> None:
    """procident's own selectors loop, answering every query with one fixed reply."""
    from procident.config import Config, LimitsConfig
    from procident.lookup import Endpoint
    from procident.protocol import UserIdReply, format_reply
    from procident.responder import Answer
    from procident.server import Server as Loop
    from procident.server import open_listeners

    class ConstantResponder:
        config = Config().reply

        def batch(self):  # type: ignore[no-untyped-def]
            import contextlib

            return contextlib.nullcontext()

        def from_gateway(self, conn):  # type: ignore[no-untyped-def]
            return False  # (no [nat] gateways: no query waits for the end of a turn)

        def prepare(self, conns):  # type: ignore[no-untyped-def]
            pass

        def respond(self, query, conn, now):  # type: ignore[no-untyped-def]
            reply = UserIdReply("constant", "OTHER")
            return Answer(
                format_reply(query.server_port, query.client_port, reply), reply, "constant"
            )

    config = Config(limits=LimitsConfig(max_connections=4096, per_client_connections=4096))
    listeners = open_listeners((Endpoint(ipaddress.IPv4Address("127.0.0.1"), port),))
    Loop(config, ConstantResponder(), listeners).run()  # type: ignore[arg-type]


# -- measuring ------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process and of its waited-for children, in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14))


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    children[int(stat.read().rsplit(")", 1)[1].split()[1])].append(int(entry))
            except OSError:
                pass
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes sharing them, so
    the sum over many forked processes is not inflated by their common pages."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Result:
    answered: int
    seconds: float
    latencies: list[float]
    wrong: int
    failed: int
    cpu_ticks: int
    peak_kib: int = 0  # the server's peak RSS after this run
    checked: bool = True  # whether the answers were checked

    @property
    def throughput(self) -> float:
        return self.answered / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else 0.0


def load(
    server: Server, queries: list[tuple[bytes, str | None]], concurrency: int, seconds: float
) -> Result:
    """Send each query on its own connection, `concurrency` at a time; check each reply
    (expected user name, or None for NO-USER)."""
    from procident.protocol import ErrorReply, ErrorType, UserIdReply, parse_reply

    selector = selectors.DefaultSelector()
    pending = collections.deque(queries)
    in_flight = answered = wrong = failed = 0
    latencies: list[float] = []
    ticks_before = cpu_ticks(server.process.pid)
    start = time.perf_counter()

    def finish(sock: socket.socket) -> None:
        nonlocal in_flight
        selector.unregister(sock)
        sock.close()
        in_flight -= 1

    while (pending or in_flight) and time.perf_counter() - start < seconds:
        while pending and in_flight < concurrency:
            query, expected = pending.popleft()
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.connect_ex(("127.0.0.1", server.port))
            selector.register(
                sock, selectors.EVENT_WRITE, [query, expected, time.perf_counter(), b""]
            )
            in_flight += 1
        for key, mask in selector.select(1.0):
            sock, state = cast(socket.socket, key.fileobj), key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    sock.send(state[0])
                    selector.modify(sock, selectors.EVENT_READ, state)
                    continue
                data = sock.recv(1024)
            except OSError:
                failed += 1
                finish(sock)
                continue
            state[3] += data
            if not data or b"\n" in state[3]:
                if b"\n" not in state[3]:
                    failed += 1
                else:
                    latencies.append(time.perf_counter() - state[2])
                    answered += 1
                    if server.checks_answers:
                        reply: object
                        try:
                            reply = parse_reply(state[3].split(b"\n")[0].rstrip(b"\r")).reply
                        except ValueError:
                            reply = None
                        if state[1] is None:
                            wrong += reply != ErrorReply(ErrorType.NO_USER)
                        else:
                            wrong += not (
                                isinstance(reply, UserIdReply) and reply.user_id.strip() == state[1]
                            )
                finish(sock)
    elapsed = time.perf_counter() - start
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return Result(
        answered, elapsed, latencies, wrong, failed, cpu_ticks(server.process.pid) - ticks_before
    )


def idle_memory(server: Server, count: int) -> tuple[int, int, int]:
    """(processes, RSS of the main process, PSS of the whole process tree), in KiB, while
    `count` idle clients are connected."""
    clients = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        clients.append(sock)
    time.sleep(2)
    pids = tree_pids(server.process.pid)
    measured = (len(pids), status_kib(server.process.pid, "VmRSS"), sum(map(pss_kib, pids)))
    for sock in clients:
        sock.close()
    # Let a forking server reap its children before it is stopped: orphans would be
    # left to pid 1, which does not reap them in every container.
    deadline = time.monotonic() + 30
    while len(tree_pids(server.process.pid)) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    return measured


# -- the run --------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="time limit of one run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds over all servers; each one's best is kept"
    )
    parser.add_argument(
        "--servers",
        default="netlink,procfs,constant,minimal,floor,oidentd",
        help="which servers to measure (comma-separated)",
    )
    parser.add_argument(
        "--log-level", default="info", help="procident's (default info: a line per answer)"
    )
    parser.add_argument("--constant-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--minimal-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", nargs=2, metavar=("PORT", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.constant_server:
        run_constant_server(args.constant_server)
        return
    if args.minimal_server:
        run_minimal_server(args.minimal_server)
        return
    if args.floor_server:
        run_floor_server(int(args.floor_server[0]), args.floor_server[1])
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: the connections are owned by other accounts")
    global LOG_LEVEL
    LOG_LEVEL = args.log_level
    for signum in (signal.SIGTERM, signal.SIGINT):  # so the cleanup below always runs
        signal.signal(signum, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    sizes = [int(size) for size in args.sizes.split(",")]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {LOADGEN_CPU})
    workdir = tempfile.mkdtemp(prefix="procident-bench-")
    os.chmod(workdir, 0o755)
    ticks = os.sysconf("SC_CLK_TCK")
    rng = random.Random(1413)
    results: dict[tuple[int, str, str], Result] = {}
    print(
        f"Q={args.queries} queries per run, C={args.concurrency} concurrent clients, "
        f"one query per connection; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    header = f"{'N':>6} {'server':<17} {'workload':<7} {'q/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'cpu us/q':>9} {'peak MB':>8} {'wrong':>6} {'failed':>6}"
    print(header)
    try:
        # Rounds: each builds every N in turn and runs every server once against it, so
        # a few slow seconds on this shared machine spoil one sample of each server at
        # one N, not all of one server's, nor all of one N's (which would skew the
        # comparison between sizes). Each server's best sample per N is kept.
        for _ in range(args.repeat):
            for n in sizes:
                measure_size(n, args, workdir, rng, results)
        for (n, name, workload), result in results.items():
            wrong = str(result.wrong) if result.checked else "-"
            print(
                f"{n:>6} {name:<17} {workload:<7} {result.throughput:>8.0f} "
                f"{result.percentile(0.5):>7.2f} {result.percentile(0.99):>7.2f} "
                f"{result.cpu_ticks / ticks / max(result.answered, 1) * 1e6:>9.0f} "
                f"{result.peak_kib / 1024:>8.1f} {wrong:>6} {result.failed:>6}",
                flush=True,
            )
        report(results, sizes)
        print(f"\nmemory with {IDLE_CONNECTIONS} idle connections open:")
        for starter in (lambda: procident_server("netlink", workdir), oidentd_server):
            server = starter()
            if server is not None:
                try:
                    processes, rss, pss = idle_memory(server, IDLE_CONNECTIONS)
                    print(
                        f"  {server.name:<17} {processes:>5} processes, main process RSS {rss / 1024:6.1f} MB, whole tree PSS {pss / 1024:7.1f} MB"
                    )
                finally:
                    server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure_size(
    n: int,
    args: argparse.Namespace,
    workdir: str,
    rng: random.Random,
    results: dict[tuple[int, str, str], Result],
) -> None:
    """Build N owned connections, run every server once against them (live, then absent
    queries, after a warm-up), keep each one's best result so far, then tear them down."""
    connections, pids = build_connections(n)
    try:
        time.sleep(SETTLE)  # let the kernel finish with N fresh connections
        live: list[tuple[bytes, str | None]] = [
            (b"%d,%d\r\n" % (c, s), name)
            for c, s, name in (rng.choice(connections) for _ in range(args.queries))
        ]
        absent: list[tuple[bytes, str | None]] = [
            (b"%d,%d\r\n" % (rng.randint(1024, 65535), rng.randint(1, 1023)), None)
            for _ in range(args.queries)
        ]
        every = {
            "netlink": lambda: procident_server("netlink", workdir),
            "procfs": lambda: procident_server("procfs", workdir),
            "constant": constant_server,
            "minimal": minimal_server,
            "floor": lambda: floor_server(workdir),
            "oidentd": oidentd_server,
        }
        starters = [every[name] for name in args.servers.split(",")]
        for starter in starters:
            server = starter()
            if server is None:
                continue
            try:
                load(server, live[:WARM_UP], args.concurrency, args.seconds)  # discarded
                for workload, queries in (("live", live), ("absent", absent)):
                    result = load(server, queries, args.concurrency, args.seconds)
                    result.peak_kib = status_kib(server.process.pid, "VmHWM")
                    result.checked = server.checks_answers
                    best = results.get((n, server.name, workload))
                    if best is None or result.throughput > best.throughput:
                        results[n, server.name, workload] = result
            finally:
                server.stop()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def report(results: dict[tuple[int, str, str], Result], sizes: list[int]) -> None:
    """The ratios the targets speak of, each between two measurements of this run."""
    small, large = min(sizes), max(sizes)
    middle = 1000 if 1000 in sizes else large
    netlink, procfs, constant, minimal, floor, oidentd = (
        "procident netlink", "procident procfs", "constant reply", "minimal python",
        "floor python", "oidentd",
    )  # fmt: skip
    comparisons = [
        ((large, netlink, "live"), (large, oidentd, "live")),
        ((large, netlink, "absent"), (large, oidentd, "absent")),
        ((large, netlink, "live"), (small, netlink, "live")),
        ((large, netlink, "live"), (large, minimal, "live")),
        ((large, netlink, "live"), (large, constant, "live")),
        ((large, netlink, "live"), (large, floor, "live")),
        ((middle, procfs, "live"), (middle, oidentd, "live")),
    ]
    print("\nratios of throughput, each within this run:")
    for a, b in comparisons:
        what = f"{a[1]} at N={a[0]} / {b[1]} at N={b[0]}, {a[2]}"
        if a in results and b in results:
            print(f"  {results[a].throughput / results[b].throughput:7.3f}x  {what}")
        else:
            print(f"      n/a  {what}")
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = [
        f"{name} {result.cpu_ticks / ticks / max(result.answered, 1) * 1e6:.0f}"
        for name in (netlink, constant, floor, minimal, oidentd)
        if (result := results.get((large, name, "live"))) is not None
    ]
    print(f"  CPU per query, N={large}, live, in us: {', '.join(cpu)}")
    a, b = (large, netlink, "live"), (large, oidentd, "live")
    if a in results and b in results:
        print(
            f"  p99 latency, N={large}, live: {netlink} {results[a].percentile(0.99):.2f} ms, "
            f"{oidentd} {results[b].percentile(0.99):.2f} ms"
        )


if __name__ == "__main__":
    main()
