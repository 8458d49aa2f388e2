"""Audit ids (action "audit-id"): at most 10 characters an IRC server keeps and ngIRCd
accepts, stable per account, querier network and period, and turned back into the
account by `procident decode-token` with the key file alone (issue 18)."""

from __future__ import annotations

import datetime
import ipaddress
import random
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import requires_root
from harness import USER_UID, ask_owned

from procident.auditid import ID_PATTERN, ID_SPACE, AuditIds, Scheme, period_of
from procident.cli import main
from procident.policy import random_id
from procident.tokens import add_key, load_keys

IRC_SERVER = ipaddress.ip_address("203.0.113.7")
ELSEWHERE = ipaddress.ip_address("198.51.100.9")
MONDAY = datetime.datetime(2026, 11, 30, 12, tzinfo=datetime.timezone.utc).timestamp()
DAY = 86400


def _keys(tmp_path: Path, count: int = 1) -> tuple[Path, dict[int, bytes]]:
    path = tmp_path / "token.key"
    for _ in range(count):
        add_key(str(path))
    return path, load_keys(str(path))


def test_ids_are_ten_letters_and_digits_starting_with_a_letter(tmp_path: Path) -> None:
    """ngIRCd accepts only [A-Za-z0-9]; Solanum, charybdis and UnrealIRCd keep 10."""
    _, keys = _keys(tmp_path)
    rng = random.Random(18)
    for period in ("day", "week", "month", "forever"):
        ids = AuditIds(keys, Scheme(period=period))
        for _ in range(2000):
            uid = rng.choice(
                [0, 1, 1000, 65534, 65535, 1 << 31, (1 << 32) - 1, rng.randrange(1 << 32)]
            )
            when = rng.uniform(0, 4e9)
            querier = ipaddress.ip_address(rng.getrandbits(32 if rng.random() < 0.5 else 128))
            made = ids.make(uid, when, querier)
            assert ID_PATTERN.fullmatch(made), made
            assert len(made) == 10 and made.isalnum() and made[0].isalpha() and made.islower()


def test_random_ids_fit_the_same_limits() -> None:
    rng = random.Random(8)
    for _ in range(5000):
        made = random_id(rng)
        assert len(made) <= 10 and made.isalnum() and made[0].isalpha(), made


def test_stable_for_an_account_network_and_period_and_different_across_networks(
    tmp_path: Path,
) -> None:
    """The same id for one account asked by one network all week (so the network can
    ban it); another id from another network (no linking across networks), unless the
    scope is "all"; another id for another account, and next week."""
    _, keys = _keys(tmp_path)
    ids = AuditIds(keys, Scheme(period="week", ipv4_prefix=24))
    same_network = ipaddress.ip_address("203.0.113.200")
    week = [
        ids.make(USER_UID, MONDAY + hour * 3600, same_network) for hour in range(-12, 24 * 7 - 12)
    ]
    assert set(week) == {ids.make(USER_UID, MONDAY, IRC_SERVER)}
    assert ids.make(USER_UID, MONDAY + 7 * DAY, IRC_SERVER) != week[0]
    assert ids.make(USER_UID + 1, MONDAY, IRC_SERVER) != week[0]
    others = {ids.make(uid, MONDAY, ELSEWHERE) for uid in range(1000)}
    mine = {ids.make(uid, MONDAY, IRC_SERVER) for uid in range(1000)}
    assert len(others) == len(mine) == 1000 and not others & mine
    mapped = ipaddress.ip_address(f"::ffff:{IRC_SERVER}")
    assert ids.make(USER_UID, MONDAY, mapped) == week[0]  # a dual-stack socket's querier
    everyone = AuditIds(keys, Scheme(period="week", scope="all"))
    assert everyone.make(USER_UID, MONDAY, IRC_SERVER) == everyone.make(USER_UID, MONDAY, ELSEWHERE)
    daily = AuditIds(keys, Scheme(period="day"))
    assert daily.make(USER_UID, MONDAY, IRC_SERVER) != daily.make(
        USER_UID, MONDAY + DAY, IRC_SERVER
    )
    forever = AuditIds(keys, Scheme(period="forever"))
    assert forever.make(USER_UID, 0, IRC_SERVER) == forever.make(USER_UID, 4e9, IRC_SERVER)


def test_every_account_of_a_host_with_65536_uids_decodes_to_itself(tmp_path: Path) -> None:
    """Each uid's id names that uid and the period it was made in (with another that has
    the same id listed beside it when two ever collide); an id made with another key, or
    for another network, matches no one."""
    _, keys = _keys(tmp_path)
    ids = AuditIds(keys, Scheme(period="day"))
    when = MONDAY + 3 * DAY
    day = datetime.date(2026, 12, 3)
    made = {uid: ids.make(uid, when, IRC_SERVER) for uid in range(65536)}
    found = ids.find(made.values(), range(65536), day, IRC_SERVER)
    period = period_of("day", day)
    for uid, audit_id in made.items():
        assert uid in {m.uid for m in found[audit_id]}, uid
        assert {(m.period, m.key_id) for m in found[audit_id]} == {(period, 1)}
    shared = sum(len(matches) > 1 for matches in found.values())
    assert shared <= 1  # expected 65536**2 / 2 / ID_SPACE = 8e-7 pairs
    # The day before and after are tried too (an abuse report's date in another zone).
    assert {
        m.uid
        for m in ids.find([made[7]], range(65536), day + datetime.timedelta(1), IRC_SERVER)[made[7]]
    } == {7}
    (tmp_path / "other").mkdir()
    other_key = AuditIds(_keys(tmp_path / "other")[1], Scheme(period="day"))
    assert not other_key.find([made[7]], range(65536), day, IRC_SERVER)[made[7]]
    assert not ids.find([made[7]], range(65536), day, ELSEWHERE)[made[7]]
    assert ID_SPACE > 2**51


def test_older_keys_still_decode_after_rotation(tmp_path: Path) -> None:
    path, keys = _keys(tmp_path)
    old = AuditIds(keys, Scheme()).make(USER_UID, MONDAY, IRC_SERVER)
    add_key(str(path))
    rotated = AuditIds(load_keys(str(path)), Scheme())
    new = rotated.make(USER_UID, MONDAY, IRC_SERVER)
    assert new != old
    found = rotated.find([old, new], range(4000), datetime.date(2026, 12, 1), IRC_SERVER)
    assert [(m.uid, m.key_id) for m in found[old]] == [(USER_UID, 1)]
    assert [(m.uid, m.key_id) for m in found[new]] == [(USER_UID, 2)]


# -- decode-token, as the admin runs it ------------------------------------------------


def _config(tmp_path: Path, extra: str = "") -> tuple[Path, Path]:
    key, _ = _keys(tmp_path)
    config = tmp_path / "procident.toml"
    config.write_text(
        f'[tokens]\nkey_file = "{key}"\naudit_uids = [3000, 3100]\n{extra}'
        '[[rules]]\naction = "audit-id"\n'
    )
    return config, key


def _decode(config: Path, *args: str):
    return CliRunner().invoke(main, ["decode-token", "-c", str(config), *args])


def test_decode_token_names_the_account_and_period(tmp_path: Path) -> None:
    config, key = _config(tmp_path)
    made = AuditIds(load_keys(str(key)), Scheme()).make(USER_UID, MONDAY + DAY, IRC_SERVER)
    result = _decode(config, made, "--querier", str(IRC_SERVER), "--date", "2026-12-01")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"uid:        {USER_UID} (no passwd entry)",
        "period:     the week from Monday 2026-11-30 (UTC)",
        "querier:    the querier network 203.0.113.0/24",
        "key:        1",
    ]
    # A date and time, with the zone the network reported it in.
    late = _decode(config, made, "-q", str(IRC_SERVER), "-d", "2026-12-06T23:30:00-05:00")
    assert late.exit_code == 0 and f"uid:        {USER_UID}" in late.output


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--date", "2026-12-01"], "give --querier ADDRESS"),
        (["--querier", "203.0.113.7"], "give --date YYYY-MM-DD"),
        (["-q", "irc.example", "-d", "2026-12-01"], "--querier: not an IP address: irc.example"),
        (["-q", "203.0.113.7", "-d", "yesterday"], "--date: not YYYY-MM-DD: yesterday"),
        (["-q", "198.51.100.9", "-d", "2026-12-01"], "no account matches"),
        (["-q", "203.0.113.7", "-d", "2026-10-01"], "no account matches"),
    ],
)
def test_decode_token_says_what_it_needs_and_when_no_account_matches(
    tmp_path: Path, args: list[str], reason: str
) -> None:
    config, key = _config(tmp_path)
    made = AuditIds(load_keys(str(key)), Scheme()).make(USER_UID, MONDAY, IRC_SERVER)
    result = _decode(config, made, *args)
    assert result.exit_code == 1
    assert reason in result.output, result.output


def test_an_id_no_key_made_matches_no_account(tmp_path: Path) -> None:
    config, _ = _config(tmp_path)
    result = _decode(config, "abcdefghij", "-q", str(IRC_SERVER), "-d", "2026-12-01")
    assert result.exit_code == 1
    assert (
        "no account matches abcdefghij: no uid of the accounts or of [tokens] audit_uids (3000 to 3100)"
        in result.output
    )


def test_two_accounts_with_one_id_are_both_named(tmp_path: Path, monkeypatch) -> None:
    """Never a wrong name: where two uids share an id (forced here by an encoding that
    keeps one character), decode-token names both, says it cannot tell, and exits 1."""
    import procident.auditid as auditid

    config, key = _config(tmp_path)
    monkeypatch.setattr(auditid, "encode", lambda mac: "a" + "0" * 9)
    made = AuditIds(load_keys(str(key)), Scheme()).make(USER_UID, MONDAY, IRC_SERVER)
    result = _decode(config, made, "-q", str(IRC_SERVER), "-d", "2026-12-01")
    assert result.exit_code == 1
    assert re.match(
        r"\d+ matches for a000000000 \(account and period\); the id cannot say which:\n",
        result.output,
    )
    assert f"uid:        {USER_UID} " in result.output


def test_forever_and_all_need_no_date_nor_querier(tmp_path: Path) -> None:
    config, key = _config(tmp_path, 'audit_period = "forever"\naudit_scope = "all"\n')
    made = AuditIds(load_keys(str(key)), Scheme("forever", "all")).make(
        USER_UID, MONDAY, IRC_SERVER
    )
    result = _decode(config, made)
    assert result.exit_code == 0, result.output
    assert "period:     any time (the period is forever)" in result.output
    assert 'querier:    every querier (audit_scope = "all")' in result.output


# -- the daemon ---------------------------------------------------------------------


@requires_root
def test_the_daemon_answers_an_audit_id_the_admin_decodes(
    start_daemon, accounts, workdir: Path
) -> None:
    key = workdir / "token.key"
    add_key(str(key))
    daemon = start_daemon(
        f'[tokens]\nkey_file = "{key}"\n[[rules]]\nusers = ["pidtest"]\naction = "audit-id"\n',
        preexec_fn=accounts,
    )
    reply, head = ask_owned(daemon)
    assert reply.startswith(head + b"USERID:OTHER:"), reply
    audit_id = reply.decode().rstrip("\r\n").rpartition(":")[2]
    assert ID_PATTERN.fullmatch(audit_id)
    again, head = ask_owned(daemon)  # another connection, the same account and network
    assert again == head + reply[len(head) :]
    config = workdir / "decode.toml"
    config.write_text(f'[tokens]\nkey_file = "{key}"\n')
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    result = _decode(config, audit_id, "-q", "127.0.0.1", "-d", today)
    assert result.exit_code == 0, result.output
    assert f"uid:        {USER_UID}" in result.output
    assert f"reply=USERID:OTHER:{audit_id} rule=rules[0]" in daemon.log()


# -- check-config: ids IRC servers cut or refuse ------------------------------------


def _check(tmp_path: Path, text: str):
    path = tmp_path / "check.toml"
    path.write_text(text)
    return CliRunner().invoke(main, ["check-config", str(path)])


@pytest.mark.parametrize(
    "rule, warned",
    [
        (
            'action = "token"',
            'rules[0]: action "token" sends ids of about 106 characters to every client port',
        ),
        (
            'action = "token"\nclient_ports = ["6697"]',
            'rules[0]: action "token" sends ids of about 106 characters to IRC ports',
        ),
        ('action = "token"\nclient_ports = ["6000-6665"]', "to IRC ports"),
        (
            'action = "reply"\nreply = ["bouncer_user"]',
            "rules[0].reply: 'bouncer_user' is not at most 10 letters and digits",
        ),
        ('action = "reply"\nreply = ["averylongname"]', "'averylongname' is not at most 10"),
        ('action = "reply"\nreply = ["9lives"]', "'9lives' is not"),
    ],
)
def test_check_config_warns_of_ids_irc_servers_cut_or_refuse(
    tmp_path: Path, rule: str, warned: str
) -> None:
    result = _check(tmp_path, f"[[rules]]\n{rule}\n")
    assert result.exit_code == 0  # a warning, not an error
    assert warned in result.output, result.output


@pytest.mark.parametrize(
    "text",
    [
        '[[rules]]\naction = "audit-id"\n',
        '[[rules]]\naction = "random"\n',
        '[[rules]]\naction = "reply"\nreply = ["bouncer", "Znc2"]\n',
        '[[rules]]\naction = "token"\nclient_ports = ["25", "587"]\n',  # mail servers
        '[[rules]]\naction = "token"\nlong_ids = true\n',
        '[[rules]]\naction = "reply"\nreply = ["a-long-id-x"]\nlong_ids = true\n',
    ],
)
def test_check_config_is_quiet_about_ids_that_fit_or_go_where_long_ids_are_kept(
    tmp_path: Path, text: str
) -> None:
    result = _check(tmp_path, text)
    assert (result.exit_code, "warning" in result.output) == (0, False), result.output


def test_check_config_warns_of_fixed_ids_of_reply(tmp_path: Path) -> None:
    result = _check(tmp_path, '[reply]\nreply_all = "no_ident_here"\nfallback = "ok"\n')
    assert "reply.reply_all: 'no_ident_here' is not at most 10 letters and digits" in result.output
    assert "fallback" not in result.output


# -- a real IRC server's ident check: ngIRCd, which asks with libident -------------------

NGIRCD_CONF = """[Global]
Name = irc.test
Info = procident test server
Listen = 127.0.0.1
Ports = {port}
ServerUID = 65534
ServerGID = 65534
MotdPhrase = test
[Limits]
MaxConnectionsIP = 0
[Options]
DNS = yes
Ident = yes
PAM = no
"""


def _own_file(path: Path, target: str) -> None:
    """In a process before exec: `path` seen at `target`, in a mount namespace of its own."""
    import ctypes
    import ctypes.util

    from conftest import CLONE_NEWNS, MS_BIND, MS_PRIVATE, MS_REC, _call

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _call(libc, libc.unshare(CLONE_NEWNS))
    _call(libc, libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
    _call(libc, libc.mount(bytes(path), target.encode(), None, MS_BIND, None))


def _irc_register(uid: int, source: str, port: int) -> str:
    """Register with the IRC server as `uid`, from `source`: the server's welcome line,
    which names the ident it accepted (without "~") or none ("~alice")."""
    import os
    import socket

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(uid)
            with socket.socket() as sock:
                sock.settimeout(20)
                sock.bind((source, 0))
                sock.connect(("127.0.0.1", port))
                sock.sendall(b"NICK alice\r\nUSER alice 0 * :Alice\r\n")
                data = b""
                while b" 001 " not in data and b"ERROR" not in data and len(data) < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            os.write(write, data[:60000])
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    return next((line for line in text.splitlines() if " 001 " in line), text)


@requires_root
@pytest.mark.parametrize("kind", ["audit-id", "not IRC-safe"])
def test_ngircd_accepts_the_audit_id_as_the_users_ident(
    start_daemon, workdir: Path, kind: str
) -> None:
    """ngIRCd, which asks over libident and refuses any ident but letters and digits,
    welcomes the user as alice!<audit id>@...; an id with an underscore (the control) it
    refuses, and the user is ~alice."""
    import os
    import socket
    import subprocess

    from harness import need, wait_for

    ngircd = need("ngircd")
    key = workdir / "token.key"
    add_key(str(key))
    rules = {
        "audit-id": 'action = "audit-id"',
        "not IRC-safe": 'action = "reply"\nreply = ["bad_id"]',
    }
    rule = rules[kind]
    source = f"127.{os.getpid() % 200 + 20}.{os.getpid() // 200 % 250 + 1}.18"
    daemon = start_daemon(
        f'[tokens]\nkey_file = "{key}"\n[[rules]]\nuids = ["{USER_UID}"]\n{rule}\n',
        listen=(f"{source}:113",),
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = workdir / "ngircd.conf"
    conf.write_text(NGIRCD_CONF.format(port=port))
    conf.chmod(0o644)
    # ngIRCd asks ident only beside its reverse DNS lookup: /etc/hosts of its own (in a
    # mount namespace) names the client's address, so no query leaves the host.
    hosts = workdir / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{source} client.test\n")
    hosts.chmod(0o644)
    log = workdir / "ngircd.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [ngircd, "--nodaemon", "--config", str(conf)],
            stdout=out,
            stderr=out,
            preexec_fn=lambda: _own_file(hosts, "/etc/hosts"),
        )
    try:
        wait_for(
            lambda: (
                server.poll() is None and f"Now listening on [127.0.0.1]:{port}" in log.read_text()
            ),
            10,
        )
        welcome = _irc_register(USER_UID, source, port)
    finally:
        server.terminate()
        server.wait(10)
    if kind == "audit-id":
        audit_id = daemon.wait_log(r"reply=USERID:OTHER:([a-z0-9]+) rule=rules\[0\]")[1]
        assert ID_PATTERN.fullmatch(audit_id)
        assert f"alice!{audit_id}@client.test" in welcome, (welcome, log.read_text())
        assert re.search(rf'IDENT lookup for connection \d+: "{audit_id}"\.', log.read_text())
    else:
        daemon.wait_log(r"reply=USERID:OTHER:bad_id rule=rules\[0\]")
        assert "alice!~alice@client.test" in welcome, (welcome, log.read_text())
        assert "Got invalid IDENT reply" in log.read_text()


def test_decode_token_prints_what_others_wrote_escaped(tmp_path: Path) -> None:
    """--querier and --date come from an abuse report, pasted: a control sequence in
    them is escaped in the error, never sent to the terminal."""
    config, _ = _config(tmp_path)
    result = _decode(config, "abcdefghij", "-q", "\x1b[2J203.0.113.7", "-d", "2026-12-01")
    assert result.exit_code == 1 and "\x1b" not in result.output
    assert "--querier: not an IP address: \\x1b[2J203.0.113.7" in result.output
    result = _decode(config, "abcdefghij", "-q", "203.0.113.7", "-d", "today\x1b]0;x\x07")
    assert result.exit_code == 1 and "\x1b" not in result.output and "\x07" not in result.output
