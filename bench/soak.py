#!/usr/bin/env python3
"""Soak: mixed good and hostile traffic against one procident for a set time, while
SIGHUP reloads alternate a good and a bad configuration.

Every few seconds it records the daemon's RSS and open files; at the end it prints
them over time, the queries answered, the wrong answers (there must be none), and
whether RSS and open files stayed flat. Exit status 1 when an answer was wrong, the
daemon died, or its open files or memory grew. Run as root:

    python3 bench/soak.py [--seconds 600] [--connections 200]

The traffic, round after round: live queries about connections owned by four
accounts (each answer checked against its owner), absent port pairs, a malformed
line, an overlong line, a batch of pipelined queries read slowly, a client that
resets in the middle of its replies, and an idle client left to the idle timeout.
All addresses are loopback; every loop is bounded by --seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ident_load import (  # noqa: E402
    LINGER_RESET,
    build_connections,
    free_port,
    start_server,
    status_kib,
)

GOOD = (
    '[lookup]\nbackend = "netlink"\n[limits]\nidle_timeout = {idle}\n'
    "per_client_rate = 0\nmax_connections = 512\nper_client_connections = 512\n"
)
BAD = GOOD + "[limits]\nnot_a_key = 1\n"  # refused: the daemon keeps the old config
SAMPLE_EVERY = 5.0
RELOAD_EVERY = 3.0


def ask(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--connections", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the connections are owned by other accounts")
    workdir = tempfile.mkdtemp(prefix="procident-soak-")
    os.chmod(workdir, 0o755)
    config = os.path.join(workdir, "procident.toml")

    def write_config(text: str) -> None:
        with open(config, "w") as file:
            file.write(text)
        os.chmod(config, 0o644)

    write_config(GOOD.format(idle=2))
    connections, pids = build_connections(args.connections)
    port = free_port()
    server = start_server(
        "procident",
        [
            sys.executable,
            "-m",
            "procident",
            "serve",
            "--config",
            config,
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
        ],
        port,
    )
    pid = server.process.pid
    rng = random.Random(1413)
    counts = {"queries": 0, "wrong": 0, "hostile": 0, "reloads": 0}
    samples: list[tuple[float, int, int]] = []
    started = time.monotonic()
    next_sample = next_reload = started
    good = False
    idlers: list[socket.socket] = []
    try:
        while time.monotonic() - started < args.seconds:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - started, status_kib(pid, "VmRSS"), open_fds(pid)))
                next_sample = now + SAMPLE_EVERY
            if now >= next_reload:
                good = not good
                write_config(GOOD.format(idle=rng.choice((2, 3))) if good else BAD)
                os.kill(pid, signal.SIGHUP)
                counts["reloads"] += 1
                next_reload = now + RELOAD_EVERY
            if server.process.poll() is not None:
                raise SystemExit("the daemon died")
            # live queries, checked
            for client_port, service_port, owner in rng.sample(connections, 20):
                reply = ask(port, b"%d,%d\r\n" % (client_port, service_port))
                counts["queries"] += 1
                expected = b"%d,%d:USERID:UNIX:%s\r\n" % (client_port, service_port, owner.encode())
                if reply != expected:
                    counts["wrong"] += 1
                    print(f"wrong: {reply!r}, expected {expected!r}", flush=True)
            # absent and malformed
            counts["queries"] += 1
            absent = ask(port, b"%d,1\r\n" % rng.randint(1024, 65535))
            if not absent.endswith(b":ERROR:NO-USER\r\n"):
                counts["wrong"] += 1
            if ask(port, b"hello\r\n") != b"0,0:ERROR:INVALID-PORT\r\n":
                counts["wrong"] += 1
            if ask(port, b"9" * 2000) != b"":
                counts["wrong"] += 1
            # pipelined, read slowly
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"1,1\r\n" * 15)
                time.sleep(0.05)
                sock.shutdown(socket.SHUT_WR)
                out = b""
                while chunk := sock.recv(16):
                    out += chunk
                counts["queries"] += 15
                if out != b"1,1:ERROR:NO-USER\r\n" * 15:
                    counts["wrong"] += 1
            # reset in the middle of replies, and an idle client left behind
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"1,1\r\n" * 10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.close()
            idle = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            idlers.append(idle)  # the daemon closes it at the idle timeout
            if len(idlers) > 50:
                idlers.pop(0).close()
            counts["hostile"] += 5
    finally:
        samples.append((time.monotonic() - started, status_kib(pid, "VmRSS"), open_fds(pid)))
        for idle in idlers:
            idle.close()
        server.stop()
        for child in pids:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
    report(counts, samples)


def report(counts: dict[str, int], samples: list[tuple[float, int, int]]) -> None:
    print(f"{'seconds':>8} {'RSS MB':>8} {'open files':>11}")
    for seconds, rss, fds in samples:
        print(f"{seconds:8.0f} {rss / 1024:8.1f} {fds:11d}")
    print(
        f"queries answered {counts['queries']}, wrong {counts['wrong']}, hostile clients "
        f"{counts['hostile']}, reloads {counts['reloads']} (every other one refused)"
    )
    # Flat: after the first quarter (warm-up), RSS within 10% and open files within 20
    # of where they were then.
    settled = samples[max(1, len(samples) // 4) :] or samples
    first_rss, first_fds = settled[0][1], settled[0][2]
    rss_growth = max(s[1] for s in settled) / first_rss
    fds_growth = max(s[2] for s in settled) - first_fds
    flat = rss_growth <= 1.10 and fds_growth <= 20
    print(
        f"after warm-up: RSS at most {rss_growth:.2f}x its level then, open files at most "
        f"{fds_growth:+d}: {'flat' if flat else 'GROWING'}"
    )
    if counts["wrong"] or not flat:
        sys.exit(1)


if __name__ == "__main__":
    main()
