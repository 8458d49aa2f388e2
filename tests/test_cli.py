"""The procident command: every subcommand, its output, its errors and exit statuses."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import requires_root
from harness import IO_TIMEOUT, owned_connection, proc_status, wait_for

from procident import __version__
from procident.cli import main

SAMPLE = Path(__file__).parent.parent / "etc" / "procident.toml"
PROCIDENT = [sys.executable, "-m", "procident"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROCIDENT, *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


def test_version() -> None:
    """--version prints the version."""
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"procident, version {__version__}\n"


def test_version_verbose() -> None:
    """--version --verbose (either order) says what works on this host."""
    for args in (["--version", "--verbose"], ["-v", "-V"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0] == f"procident, version {__version__}"
        assert "lookup netlink:  works here" in lines  # this kernel has sock_diag
        assert "lookup procfs:   works here" in lines
        assert "lookup auto:     netlink" in lines
        assert any(line.startswith("audit tokens:    available (cryptography ") for line in lines)


def test_bare_command_shows_help() -> None:
    """procident alone prints the commands and exits 2."""
    result = CliRunner().invoke(main, [])
    assert result.exit_code == 2 and "serve" in result.output


def test_check_config_accepts_sample() -> None:
    """check-config accepts the sample file."""
    result = CliRunner().invoke(main, ["check-config", str(SAMPLE)])
    assert result.exit_code == 0 and result.output == f"{SAMPLE}: OK\n"


def test_check_config_error_is_one_sentence(tmp_path: Path) -> None:
    """A bad file: exit 1 and one line naming the file, the key and the reason."""
    path = tmp_path / "bad.toml"
    path.write_text("[limits]\nidle_timeout = 0\n")
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert (
        result.stderr
        == f"Error: {path}: limits.idle_timeout: must be a whole number from 1 to 3600, not 0\n"
    )


def test_check_config_missing_file(tmp_path: Path) -> None:
    """A missing file is an error, not a traceback."""
    result = run("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1 and "cannot read: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


@requires_root
@pytest.mark.parametrize(
    ("backend", "source"), [("procfs", "/proc/net/tcp"), ("netlink", "netlink sock_diag")]
)
def test_lookup_explains_a_live_connection(tmp_path: Path, backend: str, source: str) -> None:
    """lookup shows the kernel entry (and the backend that found it), the owner, the rule and
    the exact reply."""
    config = tmp_path / "c.toml"
    config.write_text(f'[lookup]\nbackend = "{backend}"\n')
    with owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
        local, remote = f"127.0.0.1:{conn.local[1]}", f"127.0.0.1:{conn.remote[1]}"
        result = CliRunner().invoke(main, ["lookup", "-c", str(config), local, remote])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"connection: {local} (this host) <-> {remote} (querier)"
    assert re.fullmatch(rf"kernel:     {source}: ESTABLISHED, uid 1, inode \d+", lines[1])
    assert lines[2:] == [
        "owner:      daemon(uid=1)",
        "policy:     rules[0]: no match (owner)",
        "policy:     no rule matches; the owner's name",
        "rule:       default",
        f"reply:      {conn.local[1]},{conn.remote[1]}:USERID:UNIX:daemon",
    ]


@requires_root
def test_lookup_explains_inbound_and_missing() -> None:
    """lookup says why: an inbound connection is hidden, a missing one has no kernel entry."""
    with owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
        service, client = f"127.0.0.1:{conn.remote[1]}", f"127.0.0.1:{conn.local[1]}"
        inbound = CliRunner().invoke(main, ["lookup", service, client])
        elsewhere = CliRunner().invoke(main, ["lookup", client, f"127.0.0.9:{conn.remote[1]}"])
    assert (
        f"inbound:    port {conn.remote[1]} has a listening socket on this host" in inbound.output
    )
    assert (
        "owner:      root(uid=0)" in inbound.output
        and "rule:       reply.inbound" in inbound.output
    )
    assert inbound.output.endswith(":ERROR:HIDDEN-USER\n")
    assert "kernel:     no socket with these four values" in elsewhere.output
    assert elsewhere.output.endswith(":ERROR:NO-USER\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["127.0.0.1:1", "[::1]:2"], "both be IPv4 or both IPv6"),
        (["127.0.0.1:0", "127.0.0.1:2"], "ports must be from 1 to 65535"),
        (["localhost:1", "127.0.0.1:2"], "is not an IP address"),
    ],
)
def test_lookup_bad_arguments(args: list[str], message: str) -> None:
    """Bad addresses are usage errors (exit 2) that say what is wrong."""
    result = CliRunner().invoke(main, ["lookup", *args])
    assert result.exit_code == 2 and message in result.output


@requires_root
def test_query_prints_parsed_answer(start_daemon) -> None:
    """query asks a real daemon and prints the parsed USERID answer (exit 0)."""
    daemon = start_daemon()
    with owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
        port = str(daemon.addresses["127.0.0.1"][1])
        result = CliRunner().invoke(
            main, ["query", "127.0.0.1", str(conn.local[1]), str(conn.remote[1]), "-p", port]
        )
    assert result.exit_code == 0, result.output
    assert result.output == "type:    USERID\nos:      UNIX\nuser id: daemon\n"


@requires_root
def test_query_error_reply_over_ipv6(start_daemon) -> None:
    """An ERROR answer is printed with exit status 1; IPv6 hosts may be bracketed."""
    daemon = start_daemon()
    port = str(daemon.addresses["::1"][1])
    result = CliRunner().invoke(main, ["query", "[::1]", "1", "1", "--port", port])
    assert result.exit_code == 1 and result.output == "type:    ERROR\nerror:   NO-USER\n"


def fake_server(reply: bytes | None) -> tuple[socket.socket, threading.Thread]:
    """A one-shot TCP server on loopback that reads a line and sends `reply` (None: nothing)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(100)
            if reply is not None:
                conn.sendall(reply)
            else:
                conn.recv(100)  # until the client gives up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"garbage\r\n", "sent a malformed reply"),
        (b"9,9:ERROR:NO-USER\r\n", "answered about 9,9, not 1,2"),
        (b"1,2:USERID:UNIX:alice", "connection closed before a complete reply"),
        (None, "timed out"),
    ],
)
def test_query_without_valid_answer_exits_3(reply: bytes | None, message: str) -> None:
    """A malformed, mismatched, cut-off or missing reply is reported, with exit status 3."""
    server, thread = fake_server(reply)
    port = str(server.getsockname()[1])
    with server:
        result = run("query", "127.0.0.1", "1", "2", "-p", port, "-t", "1")
        thread.join(IO_TIMEOUT)
    assert result.returncode == 3 and message in result.stderr and "Traceback" not in result.stderr


def test_query_connection_refused() -> None:
    """Nobody listening: exit status 3 and the reason."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = str(probe.getsockname()[1])
    probe.close()
    result = run("query", "127.0.0.1", "1", "2", "-p", port)
    assert result.returncode == 3 and "Connection refused" in result.stderr


def test_serve_bad_config_exits_1(tmp_path: Path) -> None:
    """serve with a bad file exits 1 with one sentence, no traceback."""
    path = tmp_path / "bad.toml"
    path.write_text('[reply]\nos = "two words"\n')
    result = run("serve", "--config", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: {path}: reply.os: the OS token 'two words'")
    assert "Traceback" not in result.stderr


def test_serve_bad_listen_option() -> None:
    """A malformed --listen is a usage error naming the option."""
    result = run("serve", "--listen", "::1:113")
    assert result.returncode == 2 and "'--listen'" in result.stderr and "[::1]:113" in result.stderr


def test_serve_address_in_use() -> None:
    """A port that is taken: exit 1, naming the address and the reason."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    address = f"127.0.0.1:{taken.getsockname()[1]}"
    with taken:
        result = run("serve", "--listen", address)
    assert result.returncode == 1
    assert f"Error: cannot listen on {address}: Address already in use" in result.stderr


@requires_root
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('[server]\nuser = "root"\n', "server.user 'root' and its group must not be uid or gid 0"),
        (
            '[server]\nuser = "no-such-user-here"\n',
            "server.user: no user named 'no-such-user-here'",
        ),
        (
            '[server]\ngroup = "no-such-group-here"\n',
            "server.group: no group named 'no-such-group-here'",
        ),
    ],
)
def test_serve_refuses_to_keep_root_or_unknown_accounts(
    tmp_path: Path, config: str, message: str
) -> None:
    """Started as root, serve will not run as root by accident, nor as an account that does not exist."""
    path = tmp_path / "c.toml"
    path.write_text(config)
    result = run("serve", "--config", str(path), "--listen", "127.0.0.1:0")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


@requires_root
def test_serve_keep_root_when_told(start_daemon) -> None:
    """server.keep_root = true keeps root, and says so."""
    daemon = start_daemon("[server]\nkeep_root = true\n")
    assert proc_status(daemon.pid)["Uid"].split()[0] == "0"
    daemon.wait_log("running as root, because server.keep_root is true")


@requires_root
def test_serve_without_config_uses_builtin_defaults(workdir: Path) -> None:
    """With no --config and no /etc/procident.toml, serve runs on the built-in defaults."""
    if os.path.exists("/etc/procident.toml"):
        pytest.skip("/etc/procident.toml exists on this host")
    log_path = workdir / "defaults.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*PROCIDENT, "serve", "--listen", "127.0.0.1:0"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: "serving on" in log_path.read_text(), IO_TIMEOUT)
        text = log_path.read_text()
        assert "configuration: built-in defaults" in text
        assert "dropped privileges to user nobody" in text
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(IO_TIMEOUT) == 0


@requires_root
def test_serve_daemon_mode_with_pid_file_and_syslog(workdir: Path) -> None:
    """--daemon returns once the detached daemon serves; the pid file names it; logs go to syslog."""
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog_path = workdir / "log"
    syslog.bind(str(syslog_path))
    syslog_path.chmod(0o666)
    syslog.settimeout(IO_TIMEOUT)
    config = workdir / "c.toml"
    config.write_text(f'[log]\nsyslog_socket = "{syslog_path}"\nsyslog_facility = "local3"\n')
    config.chmod(0o644)
    pid_file = workdir / "procident.pid"
    result = run(
        "serve",
        "--daemon",
        "--pid-file",
        str(pid_file),
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
    )
    assert result.returncode == 0, result.stderr
    pid = int(pid_file.read_text())
    try:
        assert os.getsid(pid) != os.getsid(0)  # detached: a session of its own
        messages = []
        while not any("serving on" in m for m in messages):
            messages.append(syslog.recv(4096).decode().rstrip("\0"))
        # <PRI> is facility*8 + severity: local3 (19) and info (6)
        serving = next(m for m in messages if "serving on" in m)
        assert re.match(rf"<158>procident\[{pid}\]: serving on 127\.0\.0\.1:\d+", serving)
        port = int(serving.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(b"1,1\r\n")
            assert sock.recv(100) == b"1,1:ERROR:NO-USER\r\n"
        answer = syslog.recv(4096).decode().rstrip("\0")
        assert (
            "answer client=127.0.0.1 query=1,1 owner=- reply=ERROR:NO-USER rule=no-connection"
            in answer
        )
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), IO_TIMEOUT)
        syslog.close()


def test_serve_syslog_unavailable_still_answers(start_daemon, workdir: Path) -> None:
    """A syslog socket that is not there does not stop the answers: the log goes to
    standard error instead, and says why once."""
    daemon = start_daemon(f'[log]\ntarget = "syslog"\nsyslog_socket = "{workdir}/nolog"\n')
    assert daemon.ask(b"1,1\r\n") == b"1,1:ERROR:NO-USER\r\n"
    daemon.wait_log(
        rf"cannot log to syslog at {workdir}/nolog: No such file or directory; "
        "logging to standard error instead"
    )
    daemon.wait_log(r"answer client=127.0.0.1 query=1,1 ")  # the log goes on, there
