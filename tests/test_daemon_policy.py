"""Policy end to end: the real daemon (root, dropping to nobody), real sockets, real uids.

The daemon runs in a mount namespace of its own, where /etc/passwd and /etc/group
are copies with one more account, `pidtest` (uid 3001), whose home directory
lies in the test's scratch directory: so ~/.noident and ~/.oidentd.conf are
read for real, by the root helper, as that account, without touching the host's
accounts.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import requires_root
from harness import USER_UID, ask_owned, owned_connection, proc_status, wait_for

from procident.cli import main

pytestmark = requires_root

SERVICE4 = ("127.0.0.1", 0)
# A bouncer's account: its own files choose the ident (user_may).
BOUNCER_RULE = '[[rules]]\nusers = ["pidtest"]\naction = "real"\nuser_may = ["spoof"]\n'


def test_hide(start_daemon, accounts) -> None:
    """A rule hides its users; the log still names the real owner and the rule."""
    daemon = start_daemon(
        '[[rules]]\nname = "hide-test"\nusers = ["pidtest"]\naction = "hide"\n',
        preexec_fn=accounts,
    )
    reply, head = ask_owned(daemon)
    assert reply == head + b"ERROR:HIDDEN-USER\r\n"
    daemon.wait_log(r"owner=pidtest\(uid=3001\) reply=ERROR:HIDDEN-USER rule=hide-test")


def test_fake_reply(start_daemon, accounts) -> None:
    """A fixed reply goes out as OTHER; another user is still named."""
    daemon = start_daemon(
        '[[rules]]\ngroups = ["pidguests"]\naction = "reply"\nreply = "wonderland"\n',
        preexec_fn=accounts,
    )
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:OTHER:wonderland\r\n"
    reply, head = ask_owned(daemon, uid=1)
    assert reply == head + b"USERID:UNIX:daemon\r\n"


def test_random(start_daemon, accounts) -> None:
    """random gives a fresh id per reply."""
    daemon = start_daemon(
        '[[rules]]\nuids = ["3000-3999"]\naction = "random"\n', preexec_fn=accounts
    )
    ids = set()
    for _ in range(3):
        reply, head = ask_owned(daemon)
        match = re.fullmatch(re.escape(head) + rb"USERID:OTHER:([a-z][a-z0-9]{7})\r\n", reply)
        assert match, reply
        ids.add(match[1])
    assert len(ids) == 3


def test_noident_opt_out(start_daemon, accounts, home: Path) -> None:
    """~/.noident hides its owner, read by the root helper after the daemon dropped to
    nobody; removing it names the owner again (cache_seconds = 0)."""
    daemon = start_daemon("[users]\nnoident = true\ncache_seconds = 0\n", preexec_fn=accounts)
    helper = int(daemon.wait_log(r"user files are read by helper process (\d+)")[1])
    daemon.wait_log(r"dropped privileges to user nobody")
    assert proc_status(daemon.pid)["Uid"].split() == ["65534"] * 4
    assert proc_status(helper)["Uid"].split() == ["0"] * 4  # only the helper keeps root
    # ... and holds none of the daemon's sockets: stdin/out/err and its own socketpair.
    links = [os.readlink(f"/proc/{helper}/fd/{fd}") for fd in os.listdir(f"/proc/{helper}/fd")]
    assert sum(link.startswith("socket:") for link in links) == 1 and len(links) == 4
    (home / ".noident").touch()
    os.chown(home / ".noident", USER_UID, USER_UID)
    reply, head = ask_owned(daemon)
    assert reply == head + b"ERROR:HIDDEN-USER\r\n"
    daemon.wait_log(r"owner=pidtest\(uid=3001\) reply=ERROR:HIDDEN-USER rule=~/.noident")
    (home / ".noident").unlink()
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"
    assert daemon.stop() == 0
    # The daemon closed the helper's socket and reaped it on the way out.
    assert not os.path.exists(f"/proc/{helper}")


def test_planted_link_is_not_followed(start_daemon, accounts, home: Path) -> None:
    """A ~/.oidentd.conf that is a link is ignored, and the log says why."""
    target = home / "elsewhere.conf"
    target.write_text('global { reply "linked" }\n')
    os.chown(target, USER_UID, USER_UID)
    (home / ".oidentd.conf").symlink_to(target)
    os.lchown(home / ".oidentd.conf", USER_UID, USER_UID)
    daemon = start_daemon(
        BOUNCER_RULE,
        preexec_fn=accounts,
    )
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"
    daemon.wait_log(r"uid 3001: ~/\.oidentd\.conf is a symbolic link")


def test_znc_style_user_file(start_daemon, accounts, home: Path) -> None:
    """A bouncer's ~/.oidentd.conf sets its connections' ident where a rule allows spoof;
    a name of another account needs spoof_all."""
    conf = home / ".oidentd.conf"
    conf.write_text('global { reply "zncuser" }\n')
    os.chown(conf, USER_UID, USER_UID)
    daemon = start_daemon(
        BOUNCER_RULE + "[users]\ncache_seconds = 0\n",
        preexec_fn=accounts,
    )
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:OTHER:zncuser\r\n"
    daemon.wait_log(r"reply=USERID:OTHER:zncuser rule=rules\[0\]\+~/\.oidentd\.conf line 1")
    conf.write_text('global { reply "daemon" }\n')  # another account's name
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"


def test_inbound_hidden_unless_a_rule_allows(start_daemon, accounts) -> None:
    """A connection to a local listening service is hidden; a rule with inbound = true may
    answer for it."""
    with owned_connection(USER_UID, SERVICE4, "127.0.0.1") as conn:
        # Asked from the service's side: our local port is the listening one.
        query = b"%d,%d\r\n" % (conn.remote[1], conn.local[1])
        daemon = start_daemon("", preexec_fn=accounts)
        assert daemon.ask(query).endswith(b":ERROR:HIDDEN-USER\r\n")
        daemon.stop()
        daemon = start_daemon(
            '[[rules]]\ninbound = true\naction = "numeric"\n', preexec_fn=accounts
        )
        assert daemon.ask(query).endswith(b":USERID:OTHER:0\r\n")  # the service is root's


def test_rate_limit(start_daemon) -> None:
    """Past the burst, queries get UNKNOWN-ERROR; the log counts them."""
    daemon = start_daemon("[limits]\nper_client_rate = 0.01\nper_client_burst = 2\n")
    assert daemon.ask(b"1,1\r\n2,2\r\n3,3\r\n") == (
        b"1,1:ERROR:NO-USER\r\n2,2:ERROR:NO-USER\r\n3,3:ERROR:UNKNOWN-ERROR\r\n"
    )
    assert daemon.ask(b"4,4\r\n") == b"4,4:ERROR:UNKNOWN-ERROR\r\n"
    daemon.wait_log(r"refused 1 query\(s\) over limits\.per_client_rate")
    assert daemon.ask(b"5,5\r\n", source="127.0.0.9") == b"5,5:ERROR:NO-USER\r\n"


def test_token_decodes(start_daemon, workdir: Path) -> None:
    """An audit token from the daemon decodes, with its key file, to the owner and the
    connection."""
    key_file = workdir / "token.key"
    assert CliRunner().invoke(main, ["token-key", str(key_file)]).exit_code == 0
    daemon = start_daemon(f'[tokens]\nkey_file = "{key_file}"\n[[rules]]\naction = "token"\n')
    with owned_connection(1, SERVICE4, "127.0.0.1") as conn:
        reply = daemon.ask(conn.query)
    token = reply.rstrip(b"\r\n").rsplit(b":", 1)[1].decode()
    result = CliRunner().invoke(main, ["decode-token", "-k", str(key_file), token])
    assert result.exit_code == 0, result.output
    assert "uid:        1 (daemon)" in result.output
    assert f"127.0.0.1:{conn.local[1]} (this host) <-> 127.0.0.1:{conn.remote[1]}" in result.output
    altered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert CliRunner().invoke(main, ["decode-token", "-k", str(key_file), altered]).exit_code == 1


def run_cli(accounts, *args: str) -> subprocess.CompletedProcess[str]:
    """procident ARGS as a separate process that sees the test account."""
    return subprocess.run(
        [sys.executable, "-m", "procident", *args],
        capture_output=True,
        text=True,
        preexec_fn=accounts,
        timeout=30,
    )


def test_check_config_user(accounts, home: Path, workdir: Path) -> None:
    """check-config --user shows each file's state and the choices read; a broken or unsafe
    file is a problem (exit 1), with the reason."""
    config = workdir / "c.toml"
    config.write_text(BOUNCER_RULE)
    conf = home / ".oidentd.conf"
    conf.write_text('global { reply "zncuser" }\nlport 40000:40100 { hide }\n')
    os.chown(conf, USER_UID, USER_UID)
    result = run_cli(accounts, "check-config", "--user", "pidtest", str(config))
    assert result.returncode == 0, result.stderr
    assert f"user pidtest (uid {USER_UID}), home {home}:" in result.stdout
    assert "  ~/.oidentd.conf: 54 bytes" in result.stdout
    assert "  ~/.noident: absent" in result.stdout
    assert "    ~/.oidentd.conf line 2: hide for lport 40000-40100" in result.stdout
    assert "    ~/.oidentd.conf line 1: reply 'zncuser' (any connection)" in result.stdout
    conf.write_text("global { forward 127.0.0.1 1113 }\n")
    (home / ".procident.toml").symlink_to("/etc/passwd")
    result = run_cli(accounts, "check-config", "-u", "pidtest", str(config))
    assert result.returncode == 1
    assert "problem: ~/.procident.toml is a symbolic link" in result.stderr
    assert "problem: ~/.oidentd.conf: line 1: 'forward' is not read here" in result.stderr
    result = run_cli(accounts, "check-config", "-u", "nosuchuser", str(config))
    assert result.returncode == 1 and "no user named 'nosuchuser'" in result.stderr


def test_lookup_shows_the_users_choice(accounts, home: Path, workdir: Path) -> None:
    """lookup names each rule consulted, the user file that chose, and the reply."""
    config = workdir / "c.toml"
    config.write_text(
        '[[rules]]\nusers = ["root"]\naction = "hide"\n'
        '[[rules]]\nname = "bouncer"\nusers = ["pidtest"]\naction = "real"\nuser_may = ["spoof"]\n'
    )
    conf = home / ".oidentd.conf"
    conf.write_text('global { reply "zncuser" }\n')
    os.chown(conf, USER_UID, USER_UID)
    with owned_connection(USER_UID, SERVICE4, "127.0.0.1") as conn:
        local, remote = f"127.0.0.1:{conn.local[1]}", f"127.0.0.1:{conn.remote[1]}"
        result = run_cli(accounts, "lookup", "-c", str(config), local, remote)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[3:] == [
        "policy:     rules[0]: no match (owner)",
        "policy:     bouncer: matches; action real",
        "policy:     ~/.oidentd.conf line 1: the owner chooses reply",
        "rule:       bouncer+~/.oidentd.conf line 1",
        f"reply:      {conn.local[1]},{conn.remote[1]}:USERID:OTHER:zncuser",
    ]


def test_token_commands_refuse_bad_input(workdir: Path) -> None:
    """decode-token without a usable key file, or with a foreign token, exits 1 with why;
    serve refuses to start a token rule without a key file, naming the key."""
    key_file = workdir / "k"
    result = CliRunner().invoke(main, ["decode-token", "-k", str(key_file), "AAAA"])
    assert result.exit_code == 1 and "cannot read: No such file or directory" in result.output
    CliRunner().invoke(main, ["token-key", str(key_file)])
    result = CliRunner().invoke(main, ["decode-token", "-k", str(key_file), "AAAA"])
    assert result.exit_code == 1 and "not a token: wrong length" in result.output
    config = workdir / "c.toml"
    config.write_text(f'[tokens]\nkey_file = "{workdir}/absent"\n[[rules]]\naction = "token"\n')
    result = CliRunner().invoke(main, ["serve", "-c", str(config), "-l", "127.0.0.1:0"])
    assert result.exit_code == 1
    assert "tokens.key_file: " in result.output and "procident token-key" in result.output


def test_token_key_on_a_fresh_host_makes_the_keys_directory(workdir: Path) -> None:
    """On a fresh host /var/lib/procident does not exist: token-key makes it (0700) and
    the key file in it (0600); a missing directory further up is not made."""
    fresh = workdir / "var-lib-procident"
    key_file = fresh / "token.key"
    result = subprocess.run(
        [sys.executable, "-m", "procident", "token-key", str(key_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "added key 1" in result.stdout
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    deeper = workdir / "a" / "b" / "token.key"
    result = subprocess.run(
        [sys.executable, "-m", "procident", "token-key", str(deeper)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "No such file or directory" in result.stderr
    assert not (workdir / "a").exists()


def test_reload_cannot_add_what_needs_root(start_daemon) -> None:
    """A reload that adds a token rule or user files (both need root, gone by then) says
    so; token rules answer UNKNOWN-ERROR and unreadable files hide, until a restart."""
    daemon = start_daemon()
    daemon.reload('[[rules]]\nuids = [1]\naction = "token"\n')
    daemon.wait_log(r"the token key is read only if the configuration at start uses tokens")
    daemon.wait_log(r"configuration reloaded")
    reply, head = ask_owned(daemon, uid=1)
    assert reply == head + b"ERROR:UNKNOWN-ERROR\r\n"
    daemon.reload("[users]\nnoident = true\n")
    daemon.wait_log(r"user files are read only if the configuration at start reads them")
    wait_for(lambda: daemon.log().count("configuration reloaded") == 2, 5)
    reply, head = ask_owned(daemon, uid=2)  # bin: its files cannot be read, so hidden
    assert reply == head + b"ERROR:HIDDEN-USER\r\n"
    daemon.wait_log(r"rule=users\.unreadable")


def test_json_log_and_no_user_names(start_daemon) -> None:
    """--log-format json writes one object per line, an answer's fields as keys; with
    user_names = false the owner is a uid and the reply's id is left out."""
    import json

    daemon = start_daemon("[log]\nuser_names = false\n", extra_args=("--log-format", "json"))
    reply, head = ask_owned(daemon, uid=1)
    assert reply == head + b"USERID:UNIX:daemon\r\n"
    daemon.wait_log(r'"event": "answer"')
    entries = [json.loads(line) for line in daemon.log().splitlines()]
    (answer,) = [entry for entry in entries if entry.get("event") == "answer"]
    ports = head.decode().rstrip(":").split(",")
    assert answer["client"] == "127.0.0.1" and answer["uid"] == 1
    assert [answer["server_port"], answer["client_port"]] == [int(p) for p in ports]
    assert (answer["owner"], answer["reply"], answer["rule"]) == (
        "uid=1",
        "USERID:UNIX:-",
        "default",
    )
    assert "daemon" not in answer["message"] and answer["level"] == "info"
    assert all({"time", "level", "message"} <= set(entry) for entry in entries)


def test_min_response_time_hides_latency(start_daemon) -> None:
    """With reply.min_response_time, hidden, absent and found owners all wait it: every
    reply of 25 per kind comes no sooner than the minimum (that each is sent at exactly
    that time, whatever its lookup took, is pinned on the session's own clock:
    tests/test_session.py::test_hidden_absent_and_found_leave_at_the_same_time)."""
    import time as clock

    delay = 0.05
    daemon = start_daemon(
        f"[reply]\nmin_response_time = {delay}\n"
        '[[rules]]\nuids = [1]\naction = "hide"\n[limits]\nper_client_rate = 0\n'
        "max_queries_per_connection = 100\n"
    )
    times: dict[str, list[float]] = {"hidden": [], "absent": [], "found": []}
    with (
        owned_connection(1, SERVICE4, "127.0.0.1") as hidden,
        owned_connection(2, SERVICE4, "127.0.0.1") as found,
        daemon.connect() as sock,
    ):
        queries = {"hidden": hidden.query, "absent": b"1,1\r\n", "found": found.query}
        for _ in range(25):
            for kind, query in queries.items():
                started = clock.perf_counter()
                sock.sendall(query)
                reply = sock.recv(1000)
                times[kind].append(clock.perf_counter() - started)
                expected = {"hidden": b"HIDDEN-USER", "absent": b"NO-USER", "found": b"bin"}
                assert reply.endswith(expected[kind] + b"\r\n"), reply
    assert all(t >= delay for samples in times.values() for t in samples)


def test_a_file_rewritten_for_each_connection_gives_each_its_own_ident(
    start_daemon, accounts, home: Path
) -> None:
    """A bouncer (ZNC's identfile, The Lounge, Quassel, eggdrop) rewrites ~/.oidentd.conf
    with the next user's ident just before each connection: with the defaults, each
    query right after a rewrite gets the ident written for it, never the one before
    (with the old 10 s cache the second and third got the first's)."""
    daemon = start_daemon(
        BOUNCER_RULE,
        preexec_fn=accounts,
    )
    conf = home / ".oidentd.conf"
    for user in ("zncalice", "zncbob", "znccarol", "zncbob"):
        # ZNC writes the whole file anew (same size for bob and carol: only the bytes tell)
        conf.write_text(f'global {{ reply "{user}" }}\n')
        os.chown(conf, USER_UID, USER_UID)
        reply, head = ask_owned(daemon)
        assert reply == head + f"USERID:OTHER:{user}\r\n".encode(), user
    conf.unlink()
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"  # no file: the rule's own answer


def test_the_log_tells_no_file_from_no_block(start_daemon, accounts, home: Path) -> None:
    """Where a rule lets the owner choose, the answer line says why the rule's own answer
    was sent: no user file at all, or a file with no block for this connection."""
    daemon = start_daemon(
        BOUNCER_RULE,
        preexec_fn=accounts,
    )
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"
    daemon.wait_log(r"reply=USERID:UNIX:pidtest rule=rules\[0\]\+no user file$")
    conf = home / ".oidentd.conf"
    conf.write_text('lport 1:2 { reply "elsewhere" }\n')
    os.chown(conf, USER_UID, USER_UID)
    reply, head = ask_owned(daemon)
    assert reply == head + b"USERID:UNIX:pidtest\r\n"
    daemon.wait_log(
        r"reply=USERID:UNIX:pidtest rule=rules\[0\]\+~/\.oidentd\.conf: no block for this "
        r"connection \(waited 0\.2s\)$"
    )
