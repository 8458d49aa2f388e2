"""Running under service managers for real: inetd mode (socat, systemd-socket-activate,
tcpserver's environment), socket activation (LISTEN_FDS) and sd_notify."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import requires_root
from harness import IO_TIMEOUT, need, owned_connection, proc_status, read_all, wait_for

pytestmark = requires_root
PROCIDENT = [sys.executable, "-m", "procident"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask(port: int, data: bytes, timeout: float = IO_TIMEOUT) -> bytes:
    """Connect (retrying while the listener comes up), send, half-close, read all."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


@pytest.fixture
def config(workdir: Path) -> Path:
    path = workdir / "procident.toml"
    path.write_text("")
    path.chmod(0o644)
    return path


@pytest.fixture
def spawn(workdir: Path):
    """Start processes with their output in a log file; each is stopped by its pid."""
    started: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], **kwargs) -> tuple[subprocess.Popen[bytes], Path]:
        log = workdir / f"log-{len(started)}"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **kwargs
            )
        started.append(process)
        return process, log

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(IO_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- inetd mode ---------------------------------------------------------------------


def test_inetd_under_socat(spawn, config: Path) -> None:
    """socat runs one procident per connection on a socketpair; the addresses come from
    its SOCAT_* variables, and the owner from the kernel."""
    socat = need("socat")
    port = free_port()
    command = " ".join(
        [*PROCIDENT, "serve", "--inetd", "--log-target", "stderr", "-c", str(config)]
    )
    _, log = spawn([socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{command}"])
    with owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
        reply = ask(port, conn.query + b"0,1\r\n")
    head = b"%d,%d:" % (conn.local[1], conn.remote[1])
    assert reply == head + b"USERID:UNIX:daemon\r\n0,1:ERROR:INVALID-PORT\r\n"
    wait_for(lambda: "rule=default" in log.read_text(), IO_TIMEOUT)
    assert "dropped privileges to user nobody" in log.read_text()


def test_inetd_on_an_accepted_socket(spawn, config: Path) -> None:
    """With the connection itself on standard input (inetd, systemd Accept=yes), the
    addresses come from the socket; the per-connection rules hold."""
    activate = need("systemd-socket-activate")
    port = free_port()
    config.write_text("[limits]\nmax_queries_per_connection = 2\n")
    spawn(
        [
            activate,
            "--accept",
            "--inetd",
            "-l",
            f"127.0.0.1:{port}",
            *PROCIDENT,
            "serve",
            "--inetd",
            "--log-target",
            "stderr",
            "-c",
            str(config),
        ]
    )
    with owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
        reply = ask(port, conn.query + b"1,1\r\n2,2\r\n3,3\r\n")
    head = b"%d,%d:" % (conn.local[1], conn.remote[1])
    assert reply == head + b"USERID:UNIX:daemon\r\n1,1:ERROR:NO-USER\r\n2,2:ERROR:UNKNOWN-ERROR\r\n"


def test_inetd_with_tcpserver_environment(config: Path) -> None:
    """Over pipes, as tcpserver and s6-tcpserver run it, the addresses come from
    TCPREMOTEIP and the rest; the idle timeout ends it."""
    config.write_text("[limits]\nidle_timeout = 1\n")
    with owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
        env = dict(
            os.environ,
            TCPREMOTEIP="127.0.0.1",
            TCPREMOTEPORT="40000",
            TCPLOCALIP="127.0.0.1",
            TCPLOCALPORT="113",
        )
        started = time.monotonic()
        process = subprocess.Popen(
            [
                *PROCIDENT,
                "serve",
                "--inetd",
                "--log-target",
                "stderr",
                "--log-level",
                "debug",
                "-c",
                str(config),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(conn.query)
        process.stdin.flush()
        line = process.stdout.readline()  # the stdin pipe stays open: idle from here
        process.wait(IO_TIMEOUT)
        out, err = process.communicate(timeout=IO_TIMEOUT)
    assert line == b"%d,%d:USERID:UNIX:daemon\r\n" % (conn.local[1], conn.remote[1])
    assert process.returncode == 0 and out == b""
    assert b"idle for 1s" in err and time.monotonic() - started < IO_TIMEOUT


def test_inetd_without_syslog_still_answers(spawn, config: Path, workdir: Path) -> None:
    """inetd mode logs to syslog by default; where there is no /dev/log (a container, a
    tcpserver host) it answers all the same, logging to standard error (here socat's
    log file: not the client's connection) and saying why."""
    socat = need("socat")
    port = free_port()
    config.write_text(f'[log]\nsyslog_socket = "{workdir}/nolog"\n')
    command = " ".join([*PROCIDENT, "serve", "--inetd", "-c", str(config)])
    _, log = spawn([socat, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{command}"])
    with owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
        reply = ask(port, conn.query)
    assert reply == b"%d,%d:USERID:UNIX:daemon\r\n" % (conn.local[1], conn.remote[1])
    wait_for(lambda: "logging to standard error instead" in log.read_text(), IO_TIMEOUT)
    assert f"cannot log to syslog at {workdir}/nolog" in log.read_text()


def test_inetd_never_logs_into_the_clients_connection(config: Path, workdir: Path) -> None:
    """Classic inetd passes the connection as standard input, output and error: with no
    syslog there, nothing is logged at all, and the client gets only its answer."""
    config.write_text(f'[log]\nsyslog_socket = "{workdir}/nolog"\n')
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
        client = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
        served, _ = listener.accept()
        with client, served:
            process = subprocess.Popen(
                [*PROCIDENT, "serve", "--inetd", "--log-level", "debug", "-c", str(config)],
                stdin=served.fileno(),
                stdout=served.fileno(),
                stderr=served.fileno(),
            )
            served.close()
            # The query names the connection as seen from this socket's two ends.
            query = b"%d,%d\r\n" % (conn.local[1], conn.remote[1])
            client.sendall(query)
            client.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := client.recv(4096):
                received += chunk
            assert process.wait(IO_TIMEOUT) == 0
    assert received.endswith(b"\r\n") and received.count(b"\n") == 1, received
    assert received.startswith(query.rstrip()) and b"syslog" not in received


def test_inetd_refuses_without_addresses(config: Path) -> None:
    """Not a TCP connection and no variables saying whose it is: a clear error, exit 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TCP", "SOCAT_"))}
    result = subprocess.run(
        [*PROCIDENT, "serve", "--inetd", "--log-target", "stderr", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 1
    assert "standard input is not a TCP connection" in result.stderr


# -- socket activation and sd_notify ----------------------------------------------------


@pytest.mark.parametrize("kind", ["udp", "tcp-not-listening"])
def test_socket_activation_refuses_a_wrong_socket(config: Path, kind: str) -> None:
    """A passed socket that is not a listening TCP socket: the reason and exit 1, no
    traceback (the shell sets LISTEN_PID to its own pid, which exec keeps)."""
    if kind == "udp":
        passed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        passed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with passed:
        command = " ".join(PROCIDENT) + f" serve --log-target stderr -c {config}"
        result = subprocess.run(
            ["sh", "-c", f"LISTEN_PID=$$ LISTEN_FDS=1 exec {command}"],
            preexec_fn=lambda: os.dup2(passed.fileno(), 3),  # the first passed socket
            pass_fds=(3,),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1, result.stderr
    assert "Error: LISTEN_FDS: passed socket 3 (unnamed) is not a listening TCP socket" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_socket_activation(spawn, config: Path) -> None:
    """Given a listening socket by the service manager (LISTEN_FDS), procident serves on
    it instead of binding, and drops root as usual."""
    activate = need("systemd-socket-activate")
    port = free_port()
    process, log = spawn(
        [
            activate,
            "--fdname=ident",
            "-l",
            f"127.0.0.1:{port}",
            *PROCIDENT,
            "serve",
            "--log-target",
            "stderr",
            "--log-level",
            "debug",
            "-c",
            str(config),
        ]
    )
    assert ask(port, b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n"  # the first one starts it
    wait_for(lambda: f"serving on 127.0.0.1:{port}" in log.read_text(), IO_TIMEOUT)
    text = log.read_text()
    assert "listening sockets passed by the service manager: 1 (ident)" in text
    assert "[::]:113" not in text  # nothing of its own was bound
    assert proc_status(process.pid)["Uid"].split() == ["65534"] * 4
    assert ask(port, b"2,2\r\n") == b"2,2:ERROR:NO-USER\r\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(IO_TIMEOUT) == 0


def test_sd_notify(spawn, config: Path, workdir: Path) -> None:
    """With $NOTIFY_SOCKET: READY=1 once serving, RELOADING=1 (with MONOTONIC_USEC) and
    READY=1 around a reload, STOPPING=1 on the way out."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = workdir / "notify"
    listener.bind(str(path))
    path.chmod(0o777)
    listener.settimeout(IO_TIMEOUT)
    process, log = spawn(
        [
            *PROCIDENT,
            "serve",
            "--log-target",
            "stderr",
            "-c",
            str(config),
            "--listen",
            "127.0.0.1:0",
        ],
        env=dict(os.environ, NOTIFY_SOCKET=str(path)),
    )
    try:
        ready = listener.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=serving on 127.0.0.1:")
        process.send_signal(signal.SIGHUP)
        reloading = listener.recv(4096).decode()
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading)
        assert listener.recv(4096).decode() == "READY=1\nSTATUS=configuration reloaded"
        process.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert process.wait(IO_TIMEOUT) == 0
    finally:
        listener.close()


# -- the systemd units ----------------------------------------------------------------

UNITS = Path(__file__).parent.parent / "etc" / "systemd"


def installed_units(target: Path, names: list[str]) -> list[str]:
    """Copy units to `target` with ExecStart pointing at this installation's procident."""
    procident = shutil.which("procident")
    assert procident, "the procident script is not on PATH"
    for name in names:
        text = (UNITS / name).read_text().replace("/usr/local/bin/procident", procident)
        (target / Path(name).name).write_text(text)
    return [Path(name).name for name in names]


@pytest.mark.parametrize(
    "names",
    [
        ["procident.service", "procident-helper.socket", "procident-helper@.service"],
        ["procident.socket", "procident-activated.service"],
        ["per-connection/procident.socket", "procident@.service"],
    ],
    ids=["service", "socket activation", "per connection"],
)
def test_units_verify(tmp_path: Path, names: list[str]) -> None:
    """systemd-analyze verify accepts each way of running procident."""
    analyze = need("systemd-analyze")
    units = installed_units(tmp_path, names)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *units], cwd=tmp_path, capture_output=True, text=True
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# Each service and the exposure the README gives it.
RATINGS = [
    ("procident.service", 1.7),
    ("procident-helper@.service", 1.2),
    ("procident-activated.service", 1.3),
    ("procident@.service", 1.3),
]


@pytest.mark.parametrize(("name", "worst"), RATINGS)
def test_units_security_rating(tmp_path: Path, name: str, worst: float) -> None:
    """systemd-analyze security rates each service's exposure no worse than the README
    says, and 2.0 at most (lower is better; 10 is an unhardened service)."""
    analyze = need("systemd-analyze")
    (unit,) = installed_units(tmp_path, [name])
    result = subprocess.run(
        [analyze, "security", "--offline=yes", unit], cwd=tmp_path, capture_output=True, text=True
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= worst <= 2.0


def test_every_service_shipped_is_rated() -> None:
    assert {name for name, _ in RATINGS} == {unit.name for unit in UNITS.glob("*.service")}
