"""End-to-end helpers: a real daemon process, real loopback sockets, real uids.

The daemon runs as a child process started as root, which binds and then drops
to `nobody`, exactly as in production. Connections whose owners are looked up
are made by forked children that setuid() to the uid under test first; they
import nothing after that (Python's own files may not be readable by that uid).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from netns import setns

REPO = Path(__file__).resolve().parent.parent
# Debian's python3, readable by every user: a test that starts Python as another user
# runs it (the PATH's python3 may live where only root can read), with procident on
# PYTHONPATH and Debian's python3-click (installed by .ci/run).
SYSTEM_PYTHON = "/usr/bin/python3"

STARTUP_TIMEOUT = 15.0
USER_UID = 3001  # the test account `pidtest` of conftest's `accounts` fixture
IO_TIMEOUT = 5.0
SERVING = re.compile(r"serving on ([^\"\n]*)", re.M)  # text or JSON log lines


def wait_for(predicate, timeout: float, interval: float = 0.02):
    """Poll `predicate` until it returns something true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


class Daemon:
    """A procident serve process with its log file and listening addresses."""

    def __init__(
        self,
        workdir: Path,
        config: str,
        listen: tuple[str, ...],
        extra_args=(),
        preexec_fn=None,
        pass_fds=(),
        prefix=(),
        python=sys.executable,
    ):
        self.workdir = workdir
        self.config_path = workdir / "procident.toml"
        self.config_path.write_text(config)
        self.config_path.chmod(0o644)
        self.log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        # `prefix`: a command that starts the daemon (setpriv); `python`: SYSTEM_PYTHON
        # where the daemon starts as another user, which cannot read the PATH's python3.
        args = [*prefix, python, "-m", "procident", "serve", "--config", str(self.config_path)]
        env = dict(os.environ, PYTHONPATH=str(REPO)) if python != sys.executable else None
        for address in listen:
            args += ["--listen", address]
        args += ["--log-level", "debug", *extra_args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=preexec_fn,
                pass_fds=pass_fds,
                env=env,
            )
        self.addresses: dict[str, tuple[str, int]] = {}
        match = wait_for(self._serving, STARTUP_TIMEOUT)
        for text in match.group(1).split(", "):
            host, _, port = text.rpartition(":")
            self.addresses[host.strip("[]")] = (host.strip("[]"), int(port))

    def _serving(self):
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
        return SERVING.search(self.log())

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = IO_TIMEOUT) -> re.Match[str]:
        return wait_for(lambda: re.search(pattern, self.log(), re.M), timeout)

    def reload(self, config: str) -> None:
        self.config_path.write_text(config)
        self.process.send_signal(signal.SIGHUP)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(IO_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def connect(self, listen: str = "127.0.0.1", source: str | None = None) -> socket.socket:
        """A client connection to the daemon's listener at `listen`, from `source`."""
        host, port = self.addresses[listen]
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.settimeout(IO_TIMEOUT)
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, port))
        return sock

    def ask(self, data: bytes, listen: str = "127.0.0.1", source: str | None = None) -> bytes:
        """Send `data`, half-close, and return everything the daemon sent until it closed."""
        with self.connect(listen, source) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    """Read until the peer closes (or resets) the connection."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_line(sock: socket.socket) -> bytes:
    """Read one reply line, CR LF included (byte by byte: nothing after it is consumed)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"connection closed after {line!r}")
        line += byte
    return line


@dataclass
class OwnedConnection:
    """A TCP connection whose client end belongs to `uid` (in a child process)."""

    local: tuple[str, int]  # the owned end, on "this host" (the daemon's side)
    remote: tuple[str, int]  # the service end (the querier's side)
    accepted: socket.socket

    @property
    def query(self) -> bytes:
        return b"%d,%d\r\n" % (self.local[1], self.remote[1])


@contextlib.contextmanager
def owned_connection(
    uid: int,
    service: tuple[str, int],
    source: str,
    family: int = socket.AF_INET,
    close_first: bool = False,
    netns: str = "",
) -> Iterator[OwnedConnection]:
    """Connect from `source` to `service` in a child that is `uid`; the parent accepts.

    close_first: the child closes its end at once, leaving the kernel's orphan.
    netns: the child connects from this network namespace (a path under /run/netns);
    the listener is made in the caller's.
    """
    host = service[0]
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(service)
    listener.listen(1)
    listener.settimeout(IO_TIMEOUT)
    port_r, port_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become uid, connect, report the port, wait
        status = 1
        try:
            os.close(port_r)
            os.close(hold_w)
            if netns:
                setns(netns)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(uid)
            sock = socket.socket(family)
            sock.bind((source, 0))
            target = listener.getsockname()[0]
            if family == socket.AF_INET6 and ":" not in target:
                target = "::ffff:" + target  # a dual-stack socket reaching an IPv4 service
            sock.connect((target, listener.getsockname()[1]))
            port = sock.getsockname()[1]
            if close_first:
                sock.close()  # before the parent hears the port, so it never asks too soon
            os.write(port_w, b"%d" % port)
            os.read(hold_r, 1)  # until the parent closes hold_w
            status = 0
        finally:
            os._exit(status)
    os.close(port_w)
    os.close(hold_r)
    try:
        port = int(os.read(port_r, 16) or b"0")
        assert port, "the child could not connect"
        accepted, peer = listener.accept()
        with accepted:
            yield OwnedConnection((source, port), listener.getsockname()[:2], accepted)
    finally:
        os.close(port_r)
        os.close(hold_w)
        os.waitpid(pid, 0)
        listener.close()


def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def receive_queue(local_port: int, remote_port: int) -> int | None:
    """Bytes waiting unread in the receive queue of the IPv4 socket local_port <-> remote_port."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1][-4:], 16) == local_port and int(fields[2][-4:], 16) == remote_port:
            return int(fields[4].split(":")[1], 16)
    return None


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of a process, in clock ticks (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the line


def ask_owned(daemon, uid: int = USER_UID, service=("127.0.0.1", 0)) -> tuple[bytes, bytes]:
    """Ask `daemon` about a fresh connection owned by `uid` (the test account by default):
    (the reply, the port pair it must start with)."""
    with owned_connection(uid, service, "127.0.0.1") as conn:
        reply = daemon.ask(conn.query)
    return reply, b"%d,%d:" % (conn.local[1], conn.remote[1])


def need(tool: str) -> str:
    """The path of `tool`; a skip when it is missing, a failure under CI (.ci/run should
    have installed it)."""
    import shutil

    import pytest

    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; .ci/run should install it")
        pytest.skip(f"{tool} is not installed")
    return path
