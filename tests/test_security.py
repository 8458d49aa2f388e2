"""Attacks on procident, played for real: each test is one hole a hostile local user, a
remote client, a forward target or a reload could use, and fails on the code that had it.

The numbers in the section titles are the items of the security review (SECURITY.md
names the test for each promise).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import requires_root
from harness import USER_UID, ask_owned, need, owned_connection, proc_status

from procident import process

pytestmark = requires_root

PROCIDENT = [sys.executable, "-m", "procident"]
NOBODY = 65534


def run(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROCIDENT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def as_user(uid: int, action) -> None:
    """Run `action()` in a child process that is `uid` (no groups), as the attacker."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(uid)
            action()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacker's step failed"


def secret_file(workdir: Path) -> Path:
    """A root-only file an attacker would like truncated, made readable, or overwritten."""
    secret = workdir / "shadow"
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    return secret


def assert_untouched(secret: Path) -> None:
    info = secret.stat()
    assert secret.read_text() == "root:$6$secret-hash:19000:0:99999:7:::\n"
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line a refusal prints (no traceback; serve may have logged its
    start before), without its "Error: "."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0][len("Error: ") :]


# -- 1. the pid file -----------------------------------------------------------


def test_pid_file_in_a_directory_the_service_user_owns_is_refused(workdir: Path) -> None:
    """The service user (nobody) owns the pid file's directory and plants links to a
    root-only file at every name root could write there (the final name and the temporary
    name of each pid that may come next): serve refuses the directory in one line, exit 1,
    before writing anything, and the root-only file keeps its content and mode."""
    secret = secret_file(workdir)
    run_dir = workdir / "run"
    run_dir.mkdir(mode=0o755)
    os.chown(run_dir, NOBODY, NOBODY)
    pid_file = run_dir / "procident.pid"
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())

    def plant() -> None:
        pid_file.symlink_to(secret)
        for pid in range(last + 1, last + 400):
            (run_dir / f"procident.pid.{pid}.tmp").symlink_to(secret)
            (run_dir / f".procident.pid.{pid}.tmp").symlink_to(secret)

    as_user(NOBODY, plant)
    planted = sorted(os.listdir(run_dir))
    result = run("serve", "--listen", "127.0.0.1:0", "--pid-file", str(pid_file), timeout=15)
    reason = one_line_error(result)
    assert reason == (
        f"--pid-file {pid_file}: {run_dir} is owned by uid {NOBODY}: the pid file's "
        "directory must be owned by root"
    )
    assert_untouched(secret)
    assert sorted(os.listdir(run_dir)) == planted  # nothing created, nothing replaced


def test_pid_file_directory_writable_by_others_or_a_link_is_refused(workdir: Path) -> None:
    """A root-owned directory that a group or everyone may write, or a path through a
    symbolic link, is refused the same way."""
    for mode in (0o775, 0o1777):
        shared = workdir / f"shared-{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        result = run("serve", "--listen", "127.0.0.1:0", "--pid-file", f"{shared}/p.pid")
        assert f"{shared} is writable by group or others (mode {mode:04o})" in one_line_error(
            result
        )
        assert os.listdir(shared) == []
    real = workdir / "real"
    real.mkdir(mode=0o755)
    (workdir / "link").symlink_to(real)
    result = run("serve", "--listen", "127.0.0.1:0", "--pid-file", f"{workdir}/link/p.pid")
    assert f"{workdir}/link is not a directory (a symbolic link?)" in one_line_error(result)
    assert os.listdir(real) == []


def test_pid_file_links_are_replaced_never_followed(workdir: Path) -> None:
    """In a safe directory, links at the pid file's name and at this process's temporary
    name are replaced by a regular 0644 file holding the pid; their target is untouched."""
    secret = secret_file(workdir)
    pid_file = workdir / "procident.pid"
    pid_file.symlink_to(secret)
    for name in (f"procident.pid.{os.getpid()}.tmp", f".procident.pid.{os.getpid()}.tmp"):
        (workdir / name).symlink_to(secret)
    process.write_pid_file(str(pid_file))
    assert_untouched(secret)
    info = pid_file.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o644
    assert pid_file.read_text() == f"{os.getpid()}\n"
    with pytest.raises(process.PidFileError, match="owned by uid 3001"):
        os.chown(workdir, USER_UID, USER_UID)
        try:
            process.write_pid_file(str(pid_file))
        finally:
            os.chown(workdir, 0, 0)


# -- 10. the token key file ----------------------------------------------------


def _key_commands(key: Path, workdir: Path) -> dict[str, list[str]]:
    config = workdir / "tokens.toml"
    config.write_text(f'[tokens]\nkey_file = "{key}"\n[[rules]]\naction = "token"\n')
    config.chmod(0o644)
    return {
        "token-key": ["token-key", "-c", str(config)],
        "decode-token": ["decode-token", "-c", str(config), "AAAA"],
        "serve": ["serve", "-c", str(config), "--listen", "127.0.0.1:0"],
    }


def test_key_file_of_another_user_is_neither_read_nor_appended(workdir: Path) -> None:
    """A key file that another user owns (and so chose the keys of) is refused by
    token-key, decode-token and serve alike, and nothing is appended to it."""
    key = workdir / "token.key"
    assert run("token-key", str(key)).returncode == 0
    os.chown(key, USER_UID, USER_UID)
    before = key.read_bytes()
    for command in _key_commands(key, workdir).values():
        reason = one_line_error(run(*command, timeout=15))
        assert f"{key}: is owned by uid {USER_UID}; it must be owned by root" in reason
    assert key.read_bytes() == before


def test_a_key_made_in_the_daemons_state_directory_is_the_daemons(
    start_daemon, accounts, workdir: Path
) -> None:
    """procident.service starts the daemon as its account, whose StateDirectory= is
    /var/lib/procident: `token-key` run by root there gives the new key file to that
    account (0600), so the daemon can read it, and adds the next key to it; the daemon
    started as the account makes tokens with the newest key, and root decodes them."""
    from harness import SYSTEM_PYTHON

    setpriv = need("setpriv")
    state = workdir / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    key = state / "token.key"
    config = workdir / "tokens.toml"
    config.write_text(
        f'[server]\nuser = "nobody"\n[tokens]\nkey_file = "{key}"\n'
        '[[rules]]\nusers = ["pidtest"]\naction = "token"\n'
    )
    config.chmod(0o644)
    for added in (1, 2):
        made = run("token-key", "-c", str(config))
        assert (
            made.stdout == f"{key}: added key {added}; restart procident to make tokens with it\n"
        )
    info = key.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, NOBODY, 0o600)
    daemon = start_daemon(
        config.read_text(),
        python=SYSTEM_PYTHON,
        prefix=(setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
        preexec_fn=accounts,
    )
    reply, head = ask_owned(daemon)
    assert reply.startswith(head + b"USERID:OTHER:"), reply
    token = reply.decode().rstrip("\r\n").rpartition(":")[2]
    decoded = run("decode-token", "-c", str(config), token)
    assert decoded.returncode == 0, decoded.stderr
    assert f"uid:        {USER_UID}" in decoded.stdout
    assert "key:        2" in decoded.stdout
    elsewhere = workdir / "root.key"  # a directory that is not the account's: root's
    assert run("token-key", "-c", str(config), str(elsewhere)).returncode == 0
    assert elsewhere.stat().st_uid == 0


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "group-readable"])
def test_key_path_that_is_no_private_file_is_refused_at_once(workdir: Path, kind: str) -> None:
    """A FIFO (which would hang an open for reading), a directory, a link or a file others
    may read at the key path: each command says why in one line and exits 1, at once."""
    key = workdir / "token.key"
    if kind == "fifo":
        os.mkfifo(key, 0o600)
        expected = "is not a regular file"
    elif kind == "directory":
        key.mkdir(mode=0o700)
        expected = "is not a regular file"
    elif kind == "symlink":
        real = workdir / "real.key"
        assert run("token-key", str(real)).returncode == 0
        key.symlink_to(real)
        expected = "is a symbolic link"
    else:
        assert run("token-key", str(key)).returncode == 0
        key.chmod(0o640)
        expected = "must not be readable or writable by group or others"
    for command in _key_commands(key, workdir).values():
        # The old code blocked forever opening a FIFO: the timeout fails the test.
        reason = one_line_error(run(*command, timeout=15))
        assert f"{key}: {expected}" in reason, reason


# -- users' files, as a daemon reads them: one attacker account, `pidtest` ------

BOUNCER_RULE = '[[rules]]\nusers = ["pidtest"]\naction = "real"\nuser_may = {may}\n'


def user_file(home: Path, name: str, text: str | bytes) -> Path:
    """Write one of pidtest's files, as pidtest owns it."""
    path = home / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chown(path, USER_UID, USER_UID)
    return path


def run_as_host(accounts, *args: str) -> subprocess.CompletedProcess[bytes]:
    """procident ARGS where the passwd file has pidtest; output as bytes, unescaped."""
    return subprocess.run([*PROCIDENT, *args], capture_output=True, preexec_fn=accounts, timeout=30)


# -- 2. a user's file that cannot be used stalls no one ------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("reply = " + "[" * 3000 + "]" * 3000 + '\naction = "reply"\n', "nested too deeply"),
        ('action = "reply"\nreply = "x"\nn = ' + "9" * 5000 + "\n", "Exceeds the limit"),
    ],
    ids=["nested-3000", "integer-5000-digits"],
)
def test_unusable_procident_toml_is_no_file(
    start_daemon, accounts, home: Path, text: str, reason: str
) -> None:
    """A ~/.procident.toml nested 3,000 deep or holding a 5,000-digit integer is "no file":
    every query about its owner is answered by the rules without it (the owner's name),
    never UNKNOWN-ERROR; the log has one short line about it, and no traceback."""
    user_file(home, ".procident.toml", text)
    daemon = start_daemon(BOUNCER_RULE.format(may='["spoof"]'), preexec_fn=accounts)
    for _ in range(20):
        reply, head = ask_owned(daemon)
        assert reply == head + b"USERID:UNIX:pidtest\r\n"
    log = daemon.log()
    lines = [line for line in log.splitlines() if "~/.procident.toml" in line]
    assert len(lines) == 1 and reason in lines[0] and len(lines[0]) < 400, lines
    assert "Traceback" not in log and "UNKNOWN-ERROR" not in log
    result = run_as_host(accounts, "check-config", "--user", "pidtest", str(daemon.config_path))
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr and reason.encode() in result.stderr


# -- 3. what others wrote is escaped where it is printed or logged --------------

FORGED = "2026-01-01 00:00:00,000 INFO answer client=192.0.2.1 query=1,1 owner=root(uid=0)"


def test_a_key_in_a_users_file_cannot_forge_log_lines_or_drive_a_terminal(
    start_daemon, accounts, home: Path
) -> None:
    """An unknown key holding a newline, a forged answer line and terminal escapes: the
    daemon's log keeps it on one line with the controls escaped; check-config --user and
    lookup print no control character to the admin's terminal."""
    key = "\\u001b[2J\\u001b]0;pwn\\u0007\\u2028x\\n" + FORGED
    user_file(home, ".procident.toml", f'action = "reply"\nreply = "nick"\n"{key}" = 1\n')
    daemon = start_daemon(BOUNCER_RULE.format(may='["spoof"]'), preexec_fn=accounts)
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"
    daemon.wait_log(r"uid 3001: ~/\.procident\.toml: .*\\u2028x\\x0a2026-01-01")
    raw = daemon.log_path.read_bytes()
    assert not any(line.startswith(FORGED.encode()) for line in raw.splitlines())
    assert b"\x1b" not in raw and b"\x07" not in raw and "\u2028".encode() not in raw
    assert b"\\x1b[2J" in raw
    config = str(daemon.config_path)
    with owned_connection(USER_UID, ("127.0.0.1", 0), "127.0.0.1") as conn:
        local, remote = f"127.0.0.1:{conn.local[1]}", f"127.0.0.1:{conn.remote[1]}"
        looked = run_as_host(accounts, "lookup", "-c", config, local, remote)
    checked = run_as_host(accounts, "check-config", "--user", "pidtest", config)
    for result in (looked, checked):
        out = result.stdout + result.stderr
        assert b"\\x1b[2J" in out, out
        assert b"\x1b" not in out and b"\x07" not in out and "\u2028".encode() not in out
        assert not any(line.startswith(FORGED.encode()) for line in out.splitlines())


def test_query_prints_a_remote_servers_reply_escaped() -> None:
    """procident query shows what a remote ident server sent with its control characters
    escaped: a hostile server cannot retitle or clear the admin's terminal."""
    from test_forward import App

    app = App(lambda line: line.strip() + b":USERID:UNIX:x\x1b]0;owned\x07\x1b[2J\xc2\x9b\r\n")
    try:
        result = subprocess.run(
            [*PROCIDENT, "query", "-p", str(app.port), "127.0.0.1", "40000", "113"],
            capture_output=True,
            timeout=30,
        )
    finally:
        app.close()
    assert result.returncode == 0, result.stderr
    assert b"\x1b" not in result.stdout and b"\x07" not in result.stdout
    assert b"\xc2\x9b" not in result.stdout
    assert b"user id: x\\x1b]0;owned\\x07\\x1b[2J\\x9b\n" in result.stdout


@pytest.mark.parametrize(
    "bad",
    [b"\x1b[31mred", b"a\x0bb", b"a\x0cb", b"a\xc2\x85b", "a\u2028b".encode(), b"a\x7fb"],
    ids=["ESC", "VT", "FF", "NEL", "U+2028", "DEL"],
)
def test_control_characters_from_a_forward_target_never_reach_the_wire(
    start_daemon, accounts, home: Path, bad: bytes
) -> None:
    """The user's own ident server (a forward target) answers an id with a control
    character: it is refused by the one validator, and the owner is named instead."""
    from test_forward import App

    app = App(lambda line: line.strip().replace(b" ", b"") + b":USERID:UNIX:" + bad + b"\r\n")
    try:
        user_file(
            home, ".procident.toml", f'action = "forward"\nforward = "127.0.0.1:{app.port}"\n'
        )
        daemon = start_daemon(BOUNCER_RULE.format(may='["forward", "spoof"]'), preexec_fn=accounts)
        reply, head = ask_owned(daemon)
    finally:
        app.close()
    assert reply == head + b"USERID:UNIX:pidtest\r\n"
    daemon.wait_log(r"refused: the user id contains the control character")


def test_control_characters_in_a_users_oidentd_file_never_reach_the_wire(
    start_daemon, accounts, home: Path
) -> None:
    """reply "a\\x1bb" (a C escape) in ~/.oidentd.conf makes the file unusable."""
    user_file(home, ".oidentd.conf", 'global { reply "a\\x1b[2Jb" }\n')
    daemon = start_daemon(BOUNCER_RULE.format(may='["spoof"]'), preexec_fn=accounts)
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"
    daemon.wait_log(r"uid 3001: ~/\.oidentd\.conf: line 1: .* control character ESC")


# -- 5. a forward cannot hide a user who may not hide ---------------------------


@pytest.mark.parametrize("error", ["HIDDEN-USER", "NO-USER", "INVALID-PORT", "UNKNOWN-ERROR"])
@pytest.mark.parametrize("may_hide", [False, True])
def test_a_users_forward_cannot_hide_them_without_hide(
    start_daemon, accounts, home: Path, error: str, may_hide: bool
) -> None:
    """With user_may = ["forward"] only, the user's ident server answering an error
    (which conceals the owner as hiding does) is unusable: the owner is named. With
    "hide" too, the error stands."""
    from test_forward import App

    app = App(lambda line: line.strip().replace(b" ", b"") + b":ERROR:" + error.encode() + b"\r\n")
    may = '["forward", "hide"]' if may_hide else '["forward"]'
    try:
        user_file(
            home, ".procident.toml", f'action = "forward"\nforward = "127.0.0.1:{app.port}"\n'
        )
        daemon = start_daemon(BOUNCER_RULE.format(may=may), preexec_fn=accounts)
        reply, head = ask_owned(daemon)
    finally:
        app.close()
    expected = f"ERROR:{error}" if may_hide else "USERID:UNIX:pidtest"
    assert reply == head + expected.encode() + b"\r\n"


# -- 6. spoof_all = false is not fooled by look-alikes ---------------------------


def test_look_alikes_of_another_account_need_spoof_all(start_daemon, accounts, home: Path) -> None:
    """ "daemon" is another account: every form an ident client reads as "daemon" (white
    space around it, a prefix up to a colon, another case) is refused under spoof alone,
    and the owner is named; an id that names no account is sent."""
    daemon = start_daemon(
        BOUNCER_RULE.format(may='["spoof"]') + "[users]\ncache_seconds = 0\n",
        preexec_fn=accounts,
    )
    for spoof in (" daemon", "\\tdaemon", "x:daemon", "UNIX:daemon", "daemon ", "DAEMON", "Daemon"):
        user_file(home, ".oidentd.conf", f'global {{ reply "{spoof}" }}\n')
        reply, head = ask_owned(daemon)
        assert reply == head + b"USERID:UNIX:pidtest\r\n", spoof
    user_file(home, ".oidentd.conf", 'global { reply "nick" }\n')
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:OTHER:nick\r\n"


# -- 7. a reload cannot crash the daemon ------------------------------------------


def test_reload_with_an_unusable_file_keeps_serving(start_daemon) -> None:
    """A configuration with a 5,000-digit integer, or nested 1,100 deep, sent with SIGHUP:
    the reload is refused naming the file, and the old configuration keeps serving."""
    daemon = start_daemon('[[rules]]\nuids = [1]\naction = "reply"\nreply = "before"\n')
    for bad, reason in (
        ("[limits]\nidle_timeout = " + "9" * 5000 + "\n", "not usable: Exceeds the limit"),
        ("x = " + "[" * 1100 + "]" * 1100 + "\n", "not usable: nested too deeply"),
    ):
        daemon.reload(bad)
        daemon.wait_log(
            rf"reload failed, keeping the current configuration: {daemon.config_path}: {reason}"
        )
        assert daemon.process.poll() is None
        with owned_connection(1, ("127.0.0.1", 0), "127.0.0.1") as conn:
            assert daemon.ask(conn.query).endswith(b":USERID:OTHER:before\r\n")
    assert "Traceback" not in daemon.log()


# -- 4. no parser of others' input takes more than linear time -------------------

sys.path.insert(0, str(Path(__file__).parent.parent / "fuzz"))
import worst_cases  # noqa: E402

WORST = [(parser, case) for parser, cases in worst_cases.CASES.items() for case in cases]


def _per_call(parser: str, data: bytes, scratch: str) -> float:
    """Seconds one parse takes: the best of three rounds, each of enough calls to last at
    least 5 ms (so a fast parser is not timed at the clock's resolution)."""
    calls, elapsed = 1, 0.0
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            worst_cases.parse(parser, data, scratch)
        elapsed = time.perf_counter() - started
        if elapsed >= 0.005:
            break
        calls *= 2
    best = elapsed / calls
    for _ in range(2):
        started = time.perf_counter()
        for _ in range(calls):
            worst_cases.parse(parser, data, scratch)
        best = min(best, (time.perf_counter() - started) / calls)
    return best


@pytest.mark.parametrize(("parser", "case"), WORST, ids=[f"{p}-{c}" for p, c in WORST])
def test_parsers_take_time_in_proportion_to_their_input(parser, case, tmp_path) -> None:
    """Each worst case at 4 KiB and at 32 KiB, measured in the same run: eight times the
    input must cost well under 24 times the time (linear gives about 8; the quadratic
    oidentd comment regex gave 64, Python's TOML reader on dotted keys more). A ratio of
    two figures of one run, not a timing: bench/parser_worst.py prints the times."""
    make = worst_cases.CASES[parser][case]
    small = _per_call(parser, make(4096), str(tmp_path))
    large = _per_call(parser, make(32768), str(tmp_path))
    assert large < 24 * small, f"{parser} {case}: {small * 1e3:.3f} ms, then {large * 1e3:.3f} ms"


# -- 9. idle connections cannot blind monitoring --------------------------------


def test_idle_connections_cannot_hold_every_metrics_slot(start_daemon) -> None:
    """Twenty connections to the metrics listener that never ask, from the scraper's own
    address and from others: a scrape from that address is still answered, and the idle
    ones are closed within the short request timeout."""
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start_daemon(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    idle = []
    try:
        for index in range(20):
            sock = socket.socket()
            sock.bind((f"127.0.0.{2 + index % 4}" if index % 2 else "127.0.0.1", 0))
            sock.connect(("127.0.0.1", port))
            idle.append(sock)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            assert page.status == 200 and b"procident_replies_total" in page.read()
        for sock in idle:  # each is closed by the daemon: end of file, or a reset
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
    finally:
        for sock in idle:
            sock.close()


# -- 8. the loop never waits on the helper ----------------------------------------


def test_a_stuck_helper_stalls_no_one(start_daemon, accounts, home: Path) -> None:
    """The helper stopped, as on a hung NFS home directory: a query about pidtest (whose
    file the rules read) waits for it, but a query about root asked after it is answered
    first; pidtest's query is answered by the rules without the file once the helper is
    late, and further queries do not wait for it at all. When the helper resumes, its
    answer is used: pidtest's own choice is sent again."""
    import select
    import signal

    from harness import read_line, wait_for

    user_file(home, ".oidentd.conf", 'global { reply "nick" }\n')
    daemon = start_daemon(
        '[[rules]]\nusers = ["root"]\naction = "hide"\n'
        + BOUNCER_RULE.format(may='["spoof"]')
        + "[users]\ncache_seconds = 0\n",
        preexec_fn=accounts,
    )
    helper = int(daemon.wait_log(r"user files are read by helper process (\d+)")[1])
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:OTHER:nick\r\n"  # the helper works
    os.kill(helper, signal.SIGSTOP)
    try:
        wait_for(lambda: "T" in Path(f"/proc/{helper}/stat").read_text().split()[2], 5)
        with (
            owned_connection(USER_UID, ("127.0.0.1", 0), "127.0.0.1") as mine,
            owned_connection(0, ("127.0.0.1", 0), "127.0.0.1") as roots,
        ):
            first = daemon.connect()
            first.sendall(mine.query)
            second = daemon.connect()
            second.sendall(roots.query)
            order = []
            while len(order) < 2:
                ready, _, _ = select.select(
                    [s for s in (first, second) if s not in order], [], [], 5
                )
                assert ready, "no reply in 5 s"
                order += ready
            assert order == [second, first], "root's query waited behind the helper"
            assert read_line(second).endswith(b":ERROR:HIDDEN-USER\r\n")
            assert read_line(first) == b"%d,%d:USERID:UNIX:pidtest\r\n" % (
                mine.local[1],
                mine.remote[1],
            )
            first.close()
            second.close()
        daemon.wait_log(r"uid 3001: not read in time: the helper did not answer in 1s")
        # While it stays stopped, nobody waits for it: the answer is immediate.
        reply, head = ask_owned(daemon)
        assert reply == head + b"USERID:UNIX:pidtest\r\n"
        daemon.wait_log(r"uid 3001: not read: the helper is not answering")
    finally:
        os.kill(helper, signal.SIGCONT)

    def chosen_again() -> bool:
        reply, head = ask_owned(daemon)
        return reply == head + b"USERID:OTHER:nick\r\n"

    wait_for(chosen_again, 10, interval=0.2)
    assert "Traceback" not in daemon.log()


# -- hardening: what each process keeps -------------------------------------------


def test_the_helper_keeps_only_what_reading_users_files_needs(
    start_daemon, accounts, home: Path, workdir: Path
) -> None:
    """Started outside systemd, with a root-only file and a socket left open by whoever
    started it: the helper keeps root's CAP_SETUID and CAP_SETGID only (effective,
    permitted and bounding), both processes have no-new-privileges, and neither holds
    the inherited descriptors."""
    from harness import proc_status

    secret = secret_file(workdir)
    leaked_file = os.open(secret, os.O_RDWR)
    leaked_sock = socket.socket()
    try:
        daemon = start_daemon(
            "[users]\nnoident = true\n",
            preexec_fn=accounts,
            pass_fds=(leaked_file, leaked_sock.fileno()),
        )
    finally:
        os.close(leaked_file)
        leaked_sock.close()
    helper = int(daemon.wait_log(r"user files are read by helper process (\d+)")[1])
    daemon.wait_log(r"dropped privileges to user ")
    status = proc_status(helper)
    both = 1 << 6 | 1 << 7  # CAP_SETGID, CAP_SETUID
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[field], 16) == both, (field, status[field])
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1" and proc_status(daemon.pid)["NoNewPrivs"] == "1"
    for pid in (daemon.pid, helper):
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert str(secret) not in links, (pid, links)
    # ... and it still reads users' files as them.
    user_file(home, ".noident", "")
    reply, head = ask_owned(daemon)
    assert reply == head + b"ERROR:HIDDEN-USER\r\n"


def test_the_default_account_is_a_dedicated_one(start_daemon, workdir: Path) -> None:
    """With the account `procident` on the host, the default configuration runs as it;
    without, as nobody, with a warning that says how to create it."""
    import ctypes
    import ctypes.util

    from conftest import CLONE_NEWNS, MS_BIND, MS_PRIVATE, MS_REC, _call
    from harness import proc_status

    passwd = workdir / "passwd-procident"
    passwd.write_text(
        Path("/etc/passwd").read_text() + "procident:x:3002:3002::/nonexistent:/usr/sbin/nologin\n"
    )
    passwd.chmod(0o644)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def with_account() -> None:
        _call(libc, libc.unshare(CLONE_NEWNS))
        _call(libc, libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
        _call(libc, libc.mount(bytes(passwd), b"/etc/passwd", None, MS_BIND, None))

    daemon = start_daemon(preexec_fn=with_account)
    daemon.wait_log(r"dropped privileges to user procident \(uid 3002\), gid 3002")
    assert proc_status(daemon.pid)["Uid"].split() == ["3002"] * 4
    assert "there is no account" not in daemon.log()
    plain = start_daemon()
    plain.wait_log(r"there is no account 'procident': running as 'nobody'.*useradd --system")
    plain.wait_log(r"dropped privileges to user nobody")


def test_started_unprivileged_with_capabilities_it_keeps_none(start_daemon) -> None:
    """As procident.service starts it: an unprivileged user holding CAP_NET_BIND_SERVICE
    and CAP_NET_ADMIN from systemd (AmbientCapabilities=). It binds port 113 with them,
    then keeps none: a client that took the daemon over could not reconfigure the
    host's network, nor bind another privileged port."""
    from harness import SYSTEM_PYTHON, proc_status, read_line

    setpriv = need("setpriv")
    caps = "+net_bind_service,+net_admin"
    address = f"127.{os.getpid() % 200 + 20}.{os.getpid() // 200 % 250 + 1}.113"
    daemon = start_daemon(
        listen=(f"{address}:113",),
        python=SYSTEM_PYTHON,
        prefix=(setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        + (f"--inh-caps={caps}", f"--ambient-caps={caps}"),
    )
    daemon.wait_log(r"running as uid 65534, gid 65534 \(not started as root\); its capab")
    status = proc_status(daemon.pid)
    for field in ("CapPrm", "CapEff", "CapAmb", "CapInh"):
        assert int(status[field], 16) == 0, (field, status[field])
    assert status["NoNewPrivs"] == "1"
    with socket.create_connection((address, 113), timeout=5) as client:
        client.sendall(b"1, 1\r\n")
        assert read_line(client) == b"1,1:ERROR:NO-USER\r\n"


# -- started unprivileged: root only in procident-helper.socket's helper -----------


@contextlib.contextmanager
def helper_socket(path: Path, owner: int, mode: int = 0o600):
    """A listening socket as procident-helper.socket makes it (SocketUser=, SocketMode=);
    `accept()` takes one connection and starts `procident helper` on it as root, as
    procident-helper@.service does (Accept=yes, StandardInput=socket)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    os.chown(path, owner, owner)
    path.chmod(mode)
    listener.listen()
    listener.settimeout(10)
    started: list[subprocess.Popen[bytes]] = []
    log = path.with_suffix(".log")

    def accept(preexec_fn=None) -> subprocess.Popen[bytes]:
        conn, _ = listener.accept()
        with conn, open(log, "ab") as out:
            started.append(
                subprocess.Popen(
                    [*PROCIDENT, "helper"],
                    stdin=conn,
                    stdout=out,
                    stderr=out,
                    preexec_fn=preexec_fn,
                )
            )
        return started[-1]

    try:
        yield accept, log
    finally:
        listener.close()
        path.unlink()
        for helper in started:
            if helper.poll() is None:
                helper.kill()
            helper.wait()


def test_a_daemon_started_unprivileged_reads_users_files_through_the_helper_socket(
    start_daemon, accounts, home: Path, workdir: Path
) -> None:
    """procident.service starts the daemon as its account, which cannot enter a home
    directory of mode 0700: the file there is read by the root helper on
    users.helper_socket, and the user's choice is answered. Without the socket, the
    daemon says it reads the files itself, and the choice is not seen."""
    from harness import SYSTEM_PYTHON

    setpriv = need("setpriv")
    user_file(home, ".oidentd.conf", 'global { reply "nick" }\n')
    home.chmod(0o700)
    path = workdir / "helper.sock"
    config = BOUNCER_RULE.format(may='["spoof"]') + f'[users]\nhelper_socket = "{path}"\n'
    unprivileged = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    with helper_socket(path, NOBODY) as (accept, log):
        daemon = start_daemon(
            config, python=SYSTEM_PYTHON, prefix=unprivileged, preexec_fn=accounts
        )
        daemon.wait_log(f"user files are read by the helper at {path}")
        helper = accept(preexec_fn=accounts)
        reply, head = ask_owned(daemon)
        assert reply == head + b"USERID:OTHER:nick\r\n"
        assert proc_status(helper.pid)["Uid"].split()[1] == "0"  # euid root between reads
        daemon.stop()
        assert helper.wait(10) == 0, log.read_text()  # it ends when the daemon hangs up
    alone = start_daemon(config, python=SYSTEM_PYTHON, prefix=unprivileged, preexec_fn=accounts)
    alone.wait_log(r"no helper at users.helper_socket .*; user files are read as uid 65534")
    reply, head = ask_owned(alone)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"
    # A socket left behind by a stopped procident-helper.socket: said, and still served.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()
    os.chown(path, NOBODY, NOBODY)
    left = start_daemon(config, python=SYSTEM_PYTHON, prefix=unprivileged, preexec_fn=accounts)
    left.wait_log(r"cannot reach the user-file helper at .*: Connection refused; user files")
    reply, head = ask_owned(left)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"


def test_the_helper_answers_no_one_but_root_and_the_sockets_owner(workdir: Path) -> None:
    """A local user who reaches the helper's socket (a mode left open by mistake) gets no
    file read: the helper checks who connected (SO_PEERCRED) and ends at once."""
    import threading

    path = workdir / "helper.sock"
    with helper_socket(path, NOBODY, mode=0o666) as (accept, log):
        helpers: list[subprocess.Popen[bytes]] = []
        accepting = threading.Thread(target=lambda: helpers.append(accept()))
        accepting.start()

        def ask() -> None:  # as the attacker: root's files, please
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.connect(str(path))
                sock.sendall(struct.pack("!QII", 1, 0, 4096))
                sock.settimeout(10)
                try:
                    answer = sock.recv(65536)
                except ConnectionResetError:  # closed with the request unread
                    answer = b""
                assert answer == b"", "the helper answered"

        as_user(USER_UID, ask)
        accepting.join(10)
        assert helpers and helpers[0].wait(10) == 1
    said = log.read_text()
    assert f"refused a connection from uid {USER_UID} (pid " in said
    assert "only root and uid 65534" in said
