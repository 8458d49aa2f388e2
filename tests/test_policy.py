"""decide(), mask(), allowed() and the rate limiter: pure policy, table-driven."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field, replace

import pytest
import tomllib

from procident.admission import RateLimiter, allowed
from procident.config import AccessConfig, Config, ReplyConfig, parse_config
from procident.lookup import ConnectionId, Endpoint, Found, SocketEntry, TcpState
from procident.policy import Owner, decide, mask
from procident.protocol import ErrorReply, ErrorType, UserIdReply
from procident.userfiles import UserFiles, parse_oidentd_file, parse_procident_file

LOCAL = Endpoint(ipaddress.IPv4Address("192.0.2.1"), 40001)
REMOTE = Endpoint(ipaddress.IPv4Address("198.51.100.7"), 6667)
CONN = ConnectionId(LOCAL, REMOTE)
CONN6 = ConnectionId(
    Endpoint(ipaddress.IPv6Address("2001:db8::1"), 40001),
    Endpoint(ipaddress.IPv6Address("2001:db8:7::9"), 6667),
)
ENTRY = SocketEntry(LOCAL, REMOTE, TcpState.ESTABLISHED, 1000, 4242)
ORPHAN = replace(ENTRY, uid=0, inode=0, state=TcpState.FIN_WAIT2)
OUT = Found(ENTRY, False)
IN = Found(ENTRY, True)
ALICE = Owner(1000, "alice")
DEFAULT = ReplyConfig()
NO_USER = ErrorReply(ErrorType.NO_USER)
HIDDEN = ErrorReply(ErrorType.HIDDEN_USER)
UNKNOWN = ErrorReply(ErrorType.UNKNOWN_ERROR)


class FirstRandom(random.Random):
    """Randomness made predictable: always the first choice, and 42."""

    def choice(self, seq):  # type: ignore[override]
        return seq[0]

    def randrange(self, *args, **kwargs):  # type: ignore[override]
        return 42


@dataclass
class FakeFacts:
    """policy.Facts from dicts (groups by user name, files by uid, accounts by name)."""

    groups_of: dict[str, frozenset[str]] = field(default_factory=dict)
    files: dict[int, UserFiles] = field(default_factory=dict)
    accounts: frozenset[str] = frozenset({"root", "alice", "bob"})
    asked: list[str] = field(default_factory=list)

    def groups(self, owner: Owner) -> frozenset[str]:
        self.asked.append("groups")
        return self.groups_of.get(owner.name or "", frozenset())

    def user_files(self, owner: Owner) -> UserFiles:
        self.asked.append("files")
        return self.files.get(owner.uid, UserFiles())

    def is_account(self, name: str) -> bool:
        return name in self.accounts


def config(text: str = "") -> Config:
    return parse_config(tomllib.loads(text))


def oidentd(text: str) -> dict[int, UserFiles]:
    return {1000: UserFiles(choices=parse_oidentd_file(text))}


def rule(body: str) -> str:
    return f"[[rules]]\n{body}\n"


def alice_reply(user_id: str, os: str = "UNIX") -> UserIdReply:
    return UserIdReply(user_id, os)


REAL = alice_reply("alice")
GRANT = 'users = ["alice"]\naction = "real"\nuser_may = '
# (id, config text, conn, found, owner, facts, expected reply, expected rule)
CASES = [
    # -- what the kernel said -------------------------------------------------
    ("no connection", "", CONN, None, None, {}, NO_USER, "no-connection"),
    (
        "no connection, fallback",
        '[reply]\nfallback = "guest"',
        CONN,
        None,
        None,
        {},
        UserIdReply("guest", "OTHER"),
        "reply.fallback",
    ),
    ("closed socket", "", CONN, Found(ORPHAN, False), None, {}, NO_USER, "no-owner"),
    ("no rule matches: the name", "", CONN, OUT, ALICE, {}, REAL, "default"),
    ("root hidden by default", "", CONN, OUT, Owner(0, "root"), {}, HIDDEN, "rules[0]"),
    (
        "unknown uid numeric",
        "",
        CONN,
        OUT,
        Owner(3_000_000_000, None),
        {},
        UserIdReply("3000000000", "OTHER"),
        "reply.unknown_uid",
    ),
    (
        "unknown uid no-user",
        '[reply]\nunknown_uid = "no-user"',
        CONN,
        OUT,
        Owner(77, None),
        {},
        NO_USER,
        "reply.unknown_uid",
    ),
    (
        "os and charset",
        '[reply]\nos = "LINUX"\ncharset = "UTF-8"',
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("alice", "LINUX", "UTF-8"),
        "default",
    ),
    # -- inbound connections ----------------------------------------------------
    ("inbound hidden", "", CONN, IN, ALICE, {}, HIDDEN, "reply.inbound"),
    (
        "inbound no-user",
        '[reply]\ninbound = "no-user"',
        CONN,
        IN,
        ALICE,
        {},
        NO_USER,
        "reply.inbound",
    ),
    ("inbound answered", '[reply]\ninbound = "answer"', CONN, IN, ALICE, {}, REAL, "default"),
    (
        "inbound: rules without inbound = true are skipped",
        rule('users = ["alice"]\naction = "real"'),
        CONN,
        IN,
        ALICE,
        {},
        HIDDEN,
        "reply.inbound",
    ),
    (
        "inbound: a rule with inbound = true answers",
        rule('users = ["alice"]\ninbound = true\naction = "numeric"'),
        CONN,
        IN,
        ALICE,
        {},
        UserIdReply("1000", "OTHER"),
        "rules[0]",
    ),
    (
        "inbound = true rules match outbound connections too",
        rule('users = ["alice"]\ninbound = true\naction = "numeric"'),
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("1000", "OTHER"),
        "rules[0]",
    ),
    # -- match fields -------------------------------------------------------------
    (
        "users match",
        rule('users = ["alice"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "rules[0]",
    ),
    ("users miss", rule('users = ["bob"]\naction = "hide"'), CONN, OUT, ALICE, {}, REAL, "default"),
    (
        "uid range match",
        rule('uids = ["1000-1999"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "rules[0]",
    ),
    (
        "uid single match",
        rule('uids = [1000]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "rules[0]",
    ),
    (
        "uid range miss",
        rule('uids = ["0-999", "1001-4294967295"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        REAL,
        "default",
    ),
    (
        "uid range matches owners without a name",
        rule('uids = ["3000000000-3999999999"]\naction = "hide"'),
        CONN,
        OUT,
        Owner(3_000_000_000, None),
        {},
        HIDDEN,
        "rules[0]",
    ),
    (
        "groups match",
        rule('groups = ["guests"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {"groups_of": {"alice": frozenset({"users", "guests"})}},
        HIDDEN,
        "rules[0]",
    ),
    (
        "groups miss",
        rule('groups = ["guests"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {"groups_of": {"alice": frozenset({"users"})}},
        REAL,
        "default",
    ),
    (
        "users, uids and groups: any of them",
        rule('users = ["bob"]\nuids = [5]\ngroups = ["guests"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {"groups_of": {"alice": frozenset({"guests"})}},
        HIDDEN,
        "rules[0]",
    ),
    (
        "clients match",
        rule('clients = ["198.51.100.0/24"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "rules[0]",
    ),
    (
        "clients miss",
        rule('clients = ["203.0.113.0/24"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        REAL,
        "default",
    ),
    (
        "clients IPv6 match",
        rule('clients = ["2001:db8:7::/48"]\naction = "hide"'),
        CONN6,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "rules[0]",
    ),
    (
        "clients IPv6 miss",
        rule('clients = ["2001:db8:8::/48"]\naction = "hide"'),
        CONN6,
        OUT,
        ALICE,
        {},
        REAL,
        "default",
    ),
    (
        "an IPv4 network never matches an IPv6 client",
        rule('clients = ["0.0.0.0/0"]\naction = "hide"'),
        CONN6,
        OUT,
        ALICE,
        {},
        REAL,
        "default",
    ),
    (
        "local address match",
        rule('local_addresses = ["192.0.2.1"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "rules[0]",
    ),
    (
        "local address miss",
        rule('local_addresses = ["192.0.2.2"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        REAL,
        "default",
    ),
    (
        "server ports match",
        rule('server_ports = ["40000-40010"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "rules[0]",
    ),
    (
        "server ports miss",
        rule('server_ports = ["6660-6669"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        REAL,
        "default",
    ),
    (
        "client ports match",
        rule('client_ports = ["6660-6669", 6697]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "rules[0]",
    ),
    (
        "client ports miss",
        rule('client_ports = [6697]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        REAL,
        "default",
    ),
    (
        "every field given must match",
        rule('users = ["alice"]\nclients = ["203.0.113.0/24"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        REAL,
        "default",
    ),
    (
        "first match wins",
        rule('users = ["alice"]\naction = "numeric"') + rule('users = ["alice"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("1000", "OTHER"),
        "rules[0]",
    ),
    (
        "a later rule matches when earlier ones do not",
        rule('users = ["bob"]\naction = "numeric"') + rule('name = "all"\naction = "no-user"'),
        CONN,
        OUT,
        ALICE,
        {},
        NO_USER,
        "all",
    ),
    # -- actions --------------------------------------------------------------------
    ("real", rule('action = "real"'), CONN, OUT, ALICE, {}, REAL, "rules[0]"),
    (
        "real with os",
        rule('action = "real"\nos = "LINUX"'),
        CONN,
        OUT,
        ALICE,
        {},
        alice_reply("alice", "LINUX"),
        "rules[0]",
    ),
    (
        "numeric",
        rule('action = "numeric"'),
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("1000", "OTHER"),
        "rules[0]",
    ),
    ("hide", rule('action = "hide"'), CONN, OUT, ALICE, {}, HIDDEN, "rules[0]"),
    ("no-user", rule('action = "no-user"'), CONN, OUT, ALICE, {}, NO_USER, "rules[0]"),
    ("deny", rule('action = "deny"'), CONN, OUT, ALICE, {}, UNKNOWN, "rules[0]"),
    (
        "reply",
        rule('action = "reply"\nreply = "wonderland"'),
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("wonderland", "OTHER"),
        "rules[0]",
    ),
    (
        "reply from a list",
        rule('action = "reply"\nreply = ["x1", "x2"]'),
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("x1", "OTHER"),
        "rules[0]",
    ),
    (
        "reply with os and charset",
        rule('action = "reply"\nreply = "w"\nos = "UNIX"\ncharset = "UTF-8"'),
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("w", "UNIX", "UTF-8"),
        "rules[0]",
    ),
    (
        "random",
        rule('action = "random"'),
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("aaaaaaaa", "OTHER"),
        "rules[0]",
    ),
    (
        "random-numeric",
        rule('action = "random-numeric"'),
        CONN,
        OUT,
        ALICE,
        {},
        UserIdReply("user42", "OTHER"),
        "rules[0]",
    ),
    (
        "token: completed by the responder",
        rule('action = "token"'),
        CONN,
        OUT,
        ALICE,
        {},
        None,
        "rules[0]",
    ),
    (
        "forward: completed by the server",
        rule('action = "forward"\nforward = "127.0.0.1:1113"'),
        CONN,
        OUT,
        ALICE,
        {},
        None,
        "rules[0]",
    ),
    # -- the owner's files ----------------------------------------------------------
    (
        "~/.noident",
        "[users]\nnoident = true",
        CONN,
        OUT,
        ALICE,
        {"files": {1000: UserFiles(noident=True)}},
        HIDDEN,
        "~/.noident",
    ),
    (
        "~/.noident unread when off",
        "",
        CONN,
        OUT,
        ALICE,
        {"files": {1000: UserFiles(noident=True)}},
        REAL,
        "default",
    ),
    ("no ~/.noident", "[users]\nnoident = true", CONN, OUT, ALICE, {}, REAL, "default"),
    (
        "opt-in without ~/.ident",
        "[users]\nopt_in = true",
        CONN,
        OUT,
        ALICE,
        {},
        HIDDEN,
        "users.opt_in",
    ),
    (
        "opt-in with ~/.ident",
        "[users]\nopt_in = true",
        CONN,
        OUT,
        ALICE,
        {"files": {1000: UserFiles(ident=True)}},
        REAL,
        "default",
    ),
    (
        "files unreadable: hidden, as the owner may have asked",
        "[users]\nnoident = true",
        CONN,
        OUT,
        ALICE,
        {"files": {1000: UserFiles(unreadable=True)}},
        HIDDEN,
        "users.unreadable",
    ),
    (
        "a rule that hides is not undone by the owner's files",
        "[users]\nopt_in = true\n" + rule('users = ["alice"]\naction = "hide"'),
        CONN,
        OUT,
        ALICE,
        {"files": {1000: UserFiles(ident=True)}},
        HIDDEN,
        "rules[0]",
    ),
    (
        "spoof: the owner's reply",
        rule(GRANT + '["spoof"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd('global { reply "nick" }')},
        UserIdReply("nick", "OTHER"),
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "no user_may: the owner's choice is not read",
        rule('users = ["alice"]\naction = "real"'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd('global { reply "nick" }')},
        REAL,
        "rules[0]",
    ),
    (
        "spoof without spoof_all cannot name another account",
        rule(GRANT + '["spoof"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd('global { reply "bob" }')},
        REAL,
        "rules[0]+~/.oidentd.conf line 1: reply refused",
    ),
    (
        "spoof_all may name another account",
        rule(GRANT + '["spoof", "spoof_all"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd('global { reply "bob" }')},
        UserIdReply("bob", "OTHER"),
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "spoof_all without spoof: nothing",
        rule(GRANT + '["spoof_all"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd('global { reply "nick" }')},
        REAL,
        "rules[0]+~/.oidentd.conf line 1: reply refused",
    ),
    (
        "the owner's own name needs no capability beyond user_may",
        rule(GRANT + '["hide"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd('global { reply "alice" }')},
        UserIdReply("alice", "UNIX"),
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "a privileged remote port needs spoof_privport",
        rule(GRANT + '["spoof"]'),
        ConnectionId(LOCAL, Endpoint(REMOTE.address, 25)),
        OUT,
        ALICE,
        {"files": oidentd('global { reply "nick" }')},
        REAL,
        "rules[0]+~/.oidentd.conf line 1: reply refused",
    ),
    (
        "spoof_privport allows it",
        rule(GRANT + '["spoof", "spoof_privport"]'),
        ConnectionId(LOCAL, Endpoint(REMOTE.address, 25)),
        OUT,
        ALICE,
        {"files": oidentd('global { reply "nick" }')},
        UserIdReply("nick", "OTHER"),
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "hide needs hide",
        rule(GRANT + '["spoof"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd("global { hide }")},
        REAL,
        "rules[0]+~/.oidentd.conf line 1: hide refused",
    ),
    (
        "hide granted",
        rule(GRANT + '["hide"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd("global { hide }")},
        HIDDEN,
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "random granted",
        rule(GRANT + '["random"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd("global { random }")},
        UserIdReply("aaaaaaaa", "OTHER"),
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "random_numeric granted by random",
        rule(GRANT + '["random"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd("global { random_numeric }")},
        UserIdReply("user42", "OTHER"),
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "numeric granted",
        rule(GRANT + '["numeric"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd("global { numeric }")},
        UserIdReply("1000", "OTHER"),
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "numeric refused",
        rule(GRANT + '["random"]'),
        CONN,
        OUT,
        ALICE,
        {"files": oidentd("global { numeric }")},
        REAL,
        "rules[0]+~/.oidentd.conf line 1: numeric refused",
    ),
    (
        "a per-connection block for this connection",
        rule(GRANT + '["spoof", "hide"]'),
        CONN,
        OUT,
        ALICE,
        {
            "files": oidentd(
                'global { reply "nick" }\nto 198.51.100.7 fport 6667 lport 40001 { hide }'
            )
        },
        HIDDEN,
        "rules[0]+~/.oidentd.conf line 2",
    ),
    (
        "a per-connection block for another connection",
        rule(GRANT + '["spoof", "hide"]'),
        CONN,
        OUT,
        ALICE,
        {
            "files": oidentd(
                'global { reply "nick" }\nto 198.51.100.7 fport 6667 lport 40002 { hide }'
            )
        },
        UserIdReply("nick", "OTHER"),
        "rules[0]+~/.oidentd.conf line 1",
    ),
    (
        "a ~/.procident.toml choice",
        rule(GRANT + '["spoof"]'),
        CONN,
        OUT,
        ALICE,
        {
            "files": {
                1000: UserFiles(choices=parse_procident_file('action = "reply"\nreply = "n2"'))
            }
        },
        UserIdReply("n2", "OTHER"),
        "rules[0]+~/.procident.toml",
    ),
    (
        "forward chosen by the owner",
        rule(GRANT + '["forward"]'),
        CONN,
        OUT,
        ALICE,
        {
            "files": {
                1000: UserFiles(
                    choices=parse_procident_file('action = "forward"\nforward = "127.0.0.1:9113"')
                )
            }
        },
        None,
        "rules[0]+~/.procident.toml",
    ),
]


@pytest.mark.parametrize(
    ("text", "conn", "found", "owner", "facts", "reply", "rule_name"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decide(text, conn, found, owner, facts, reply, rule_name) -> None:
    """Each case gets the reply and names the rule that chose it."""
    decision = decide(conn, found, owner, config(text), FakeFacts(**facts), FirstRandom())
    assert (decision.reply, decision.rule) == (reply, rule_name)


def test_token_and_forward_decisions_carry_what_completes_them() -> None:
    """token and forward leave the reply to the responder, with the OS and the target."""
    token = decide(CONN, OUT, ALICE, config(rule('action = "token"')), FakeFacts(), FirstRandom())
    assert (token.action, token.os, token.forward) == ("token", "OTHER", None)
    forward = decide(
        CONN,
        OUT,
        ALICE,
        config(rule('action = "forward"\nforward = "[::1]:1113"\nos = "X"')),
        FakeFacts(),
        FirstRandom(),
    )
    assert forward.action == "forward" and forward.os == "X"
    assert forward.forward == Endpoint(ipaddress.IPv6Address("::1"), 1113)
    assert forward.capabilities is None  # the admin's forward: the answer is trusted


def test_users_forward_carries_the_capabilities() -> None:
    """A forward the owner chose is judged later against what the rule lets them send."""
    files = {
        1000: UserFiles(choices=parse_procident_file('action = "forward"\nforward = "127.0.0.1:9"'))
    }
    decision = decide(
        CONN,
        OUT,
        ALICE,
        config(rule(GRANT + '["forward", "spoof"]')),
        FakeFacts(files=files),
        FirstRandom(),
    )
    assert decision.capabilities == frozenset({"forward", "spoof"})
    assert decision.forward == Endpoint(ipaddress.IPv4Address("127.0.0.1"), 9)


def test_random_ids_are_fresh() -> None:
    """random gives a new alphanumeric id per reply; random-numeric userNNNNN."""
    rng = random.Random(7)
    ids = {
        decide(CONN, OUT, ALICE, config(rule('action = "random"')), FakeFacts(), rng).reply
        for _ in range(50)
    }
    assert len(ids) == 50
    for reply in ids:
        assert (
            isinstance(reply, UserIdReply)
            and reply.user_id.isalnum()
            and reply.user_id[0].isalpha()
        )
    numeric = decide(CONN, OUT, ALICE, config(rule('action = "random-numeric"')), FakeFacts(), rng)
    assert isinstance(numeric.reply, UserIdReply)
    assert numeric.reply.user_id.startswith("user") and 0 <= int(numeric.reply.user_id[4:]) < 100000


def test_facts_are_asked_only_when_needed() -> None:
    """Groups and user files are not looked up for rules and settings that do not use them."""
    facts = FakeFacts()
    decide(
        CONN,
        OUT,
        ALICE,
        config(rule('users = ["alice"]\naction = "numeric"')),
        facts,
        FirstRandom(),
    )
    assert facts.asked == []
    decide(
        CONN, OUT, ALICE, config(rule('groups = ["g"]\naction = "numeric"')), facts, FirstRandom()
    )
    assert facts.asked == ["groups"]


def test_explain_lists_every_rule_consulted() -> None:
    """The trace names each rule with why it did not match, then the one that did."""
    text = rule('users = ["bob"]\naction = "hide"') + rule(
        'name = "irc"\nclient_ports = [6667]\naction = "numeric"'
    )
    decision = decide(CONN, OUT, ALICE, config(text), FakeFacts(), FirstRandom(), explain=True)
    assert decision.trace == ("rules[0]: no match (owner)", "irc: matches; action numeric")
    quiet = decide(CONN, OUT, ALICE, config(text), FakeFacts(), FirstRandom())
    assert quiet.trace == ()


@pytest.mark.parametrize(
    ("reply", "masked"),
    [
        (NO_USER, UNKNOWN),
        (HIDDEN, UNKNOWN),
        (UNKNOWN, UNKNOWN),
        (ErrorReply(ErrorType.INVALID_PORT), ErrorReply(ErrorType.INVALID_PORT)),
        (UserIdReply("alice", "UNIX"), UserIdReply("alice", "UNIX")),
    ],
)
def test_mask_errors(reply, masked) -> None:
    """mask_errors turns NO-USER and HIDDEN-USER into UNKNOWN-ERROR, and nothing else."""
    assert mask(reply, replace(DEFAULT, mask_errors=True)) == masked
    assert mask(reply, DEFAULT) == reply


def net(*texts: str) -> tuple:
    return tuple(ipaddress.ip_network(t) for t in texts)


@pytest.mark.parametrize(
    ("access", "address", "ok"),
    [
        (AccessConfig(), "203.0.113.5", True),
        (AccessConfig(allow=net("198.51.100.0/24")), "198.51.100.9", True),
        (AccessConfig(allow=net("198.51.100.0/24")), "203.0.113.5", False),
        (AccessConfig(deny=net("203.0.113.0/24")), "203.0.113.5", False),
        (AccessConfig(deny=net("203.0.113.0/24")), "198.51.100.9", True),
        (AccessConfig(allow=net("0.0.0.0/0"), deny=net("203.0.113.5/32")), "203.0.113.5", False),
        (AccessConfig(allow=net("2001:db8::/32")), "2001:db8::5", True),
        (AccessConfig(allow=net("2001:db8::/32")), "2001:db9::5", False),
        (AccessConfig(allow=net("2001:db8::/32")), "192.0.2.1", False),
    ],
)
def test_access_lists(access, address, ok) -> None:
    """Deny wins; with an allow list, only listed clients may ask."""
    assert allowed(ipaddress.ip_address(address), access) is ok


def test_rate_limiter_bucket() -> None:
    """A full bucket allows `burst` queries at once, then `rate` per second."""
    limiter = RateLimiter(rate=2, burst=5, size=100)
    assert [limiter.allow("a", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("b", 0.0)  # others have their own bucket
    assert not limiter.allow("a", 0.4)  # 0.8 of a token so far
    assert limiter.allow("a", 0.5) and not limiter.allow("a", 0.5)
    assert [limiter.allow("a", 10.0) for _ in range(6)] == [True] * 5 + [False]  # capped at burst


def test_rate_limiter_refused_queries_do_not_build_credit() -> None:
    """Hammering an empty bucket keeps it empty: refusals are not paid back later."""
    limiter = RateLimiter(rate=1, burst=1, size=10)
    assert limiter.allow("a", 0.0)
    assert not any(limiter.allow("a", 0.0 + i / 100) for i in range(1, 100))
    assert limiter.allow("a", 1.0)


def test_rate_limiter_off() -> None:
    """rate 0 means no limit."""
    limiter = RateLimiter(rate=0, burst=1, size=10)
    assert all(limiter.allow("a", 0.0) for _ in range(1000)) and len(limiter) == 0


def test_rate_limiter_table_is_bounded() -> None:
    """A flood from many addresses keeps at most `size` buckets; a busy client stays."""
    limiter = RateLimiter(rate=1, burst=2, size=100)
    limiter.allow("busy", 0.0)
    limiter.allow("busy", 0.0)
    for i in range(10_000):
        limiter.allow(i, 0.0)
        if i % 50 == 0:
            assert not limiter.allow("busy", 0.0)  # stays known, and empty
    assert len(limiter) == 100
