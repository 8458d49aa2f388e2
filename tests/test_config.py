"""TOML configuration: defaults, the sample file, and errors that name key and reason."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from procident.config import Config, ConfigError, load_config, parse_config
from procident.lookup import Endpoint
from procident.tomlcheck import parse_endpoint

SAMPLE = Path(__file__).parent.parent / "etc" / "procident.toml"


def test_sample_is_the_embedded_default() -> None:
    """etc/procident.toml documents exactly the built-in defaults."""
    assert load_config(str(SAMPLE)) == Config()


def test_sample_sets_every_key() -> None:
    """Every key the loader knows appears in the sample, so none is undocumented there."""
    import tomllib

    sample = tomllib.loads(SAMPLE.read_text())
    config = Config()
    for section in config.__dataclass_fields__:
        if section == "rules":
            continue  # a list; its keys are checked against the man page (test_docs)
        fields = set(getattr(config, section).__dataclass_fields__)
        assert set(sample[section]) == fields, section


def test_empty_file_is_the_default(tmp_path: Path) -> None:
    """An empty file changes nothing."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert load_config(str(path)) == Config()


def test_values_are_read(tmp_path: Path) -> None:
    """Each section's values reach the dataclasses."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:1113", "[::1]:1113"]\nuser = "daemon"\ngroup = "adm"\n'
        "[limits]\nidle_timeout = 5\nmax_connections = 3\n"
        '[reply]\nos = "LINUX"\ncharset = "UTF-8"\nunknown_uid = "no-user"\ninbound = "answer"\n'
        'mask_errors = true\n[log]\nlevel = "debug"\ntarget = "syslog"\n'
    )
    config = load_config(str(path))
    assert config.server.listen == (
        Endpoint(ipaddress.IPv4Address("127.0.0.1"), 1113),
        Endpoint(ipaddress.IPv6Address("::1"), 1113),
    )
    assert (config.server.user, config.server.group) == ("daemon", "adm")
    assert (config.limits.idle_timeout, config.limits.max_connections) == (5, 3)
    assert config.limits.per_client_connections == Config().limits.per_client_connections
    assert (config.reply.os, config.reply.charset, config.reply.mask_errors) == (
        "LINUX",
        "UTF-8",
        True,
    )
    assert (config.reply.unknown_uid, config.reply.inbound) == ("no-user", "answer")
    assert (config.log.level, config.log.target) == ("debug", "syslog")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sever": {}}, "sever: unknown key; did you mean 'server'?"),
        (
            {"policy": {}},
            "policy: unknown key (known: server, limits, reply, lookup, users, access, tokens, ",
        ),
        ({"rules": {}}, "rules: must be an array of tables [[rules]]"),
        ({"rules": [{"users": ["a"]}]}, "rules[0]: has no action (one of real, numeric"),
        ({"rules": [{"action": "lie"}]}, "rules[0].action: must be one of 'real', 'numeric'"),
        (
            {"rules": [{"action": "hide", "usr": []}]},
            "rules[0].usr: unknown key; did you mean 'users'?",
        ),
        ({"rules": [{"action": "reply"}]}, "rules[0]: action = \"reply\" needs the key 'reply'"),
        (
            {"rules": [{"action": "hide", "reply": "x"}]},
            'rules[0].reply: is used only with action = "reply"',
        ),
        ({"rules": [{"action": "reply", "reply": []}]}, "rules[0].reply: must hold 1 to 255 ids"),
        (
            {"rules": [{"action": "reply", "reply": ["ok", "a\r\nb"]}]},
            "rules[0].reply[1]: 'a\\r\\nb' cannot be sent: the user id contains the control character CR",
        ),
        (
            {"rules": [{"action": "reply", "reply": "x" * 513}]},
            "rules[0].reply[0]: ",
        ),
        (
            {"rules": [{"action": "reply", "reply": "a\u0000b"}]},
            "rules[0].reply[0]: 'a\\x00b' cannot be sent: the user id contains the control character NUL",
        ),
        (
            {"rules": [{"action": "forward"}]},
            "rules[0]: action = \"forward\" needs the key 'forward'",
        ),
        (
            {"rules": [{"action": "forward", "forward": "localhost:113"}]},
            "rules[0].forward: 'localhost' in 'localhost:113' is not an IP address",
        ),
        (
            {"rules": [{"action": "hide", "clients": ["10.0.0.1/8"]}]},
            "rules[0].clients[0]: '10.0.0.1/8' has host bits set; did you mean '10.0.0.0/8'?",
        ),
        (
            {"rules": [{"action": "hide", "clients": ["example.net"]}]},
            "rules[0].clients[0]: 'example.net' is not an IP address or network",
        ),
        (
            {"rules": [{"action": "hide", "server_ports": ["70-60"]}]},
            "rules[0].server_ports[0]: '70-60' is not a port range from 1 to 65535, low first",
        ),
        (
            {"rules": [{"action": "hide", "client_ports": [0]}]},
            "rules[0].client_ports[0]: '0' is not a port range from 1 to 65535",
        ),
        (
            {"rules": [{"action": "hide", "uids": ["4294967296"]}]},
            "rules[0].uids[0]: '4294967296' is not a uid range from 0 to 4294967295",
        ),
        (
            {"rules": [{"action": "hide", "user_may": ["spoof"]}]},
            'rules[0].user_may: a rule with action = "hide" names nobody',
        ),
        (
            {"rules": [{"action": "real", "user_may": ["lie"]}]},
            "rules[0].user_may[0]: must be one of 'spoof', 'spoof_all'",
        ),
        ({"rules": [{"action": "real", "os": "A B"}]}, "rules[0].os: the OS token 'A B'"),
        (
            {"rules": [{"action": "real", "name": "x"}, {"action": "hide", "name": "x"}]},
            "rules[1].name: 'x' names an earlier rule too",
        ),
        ({"rules": [5]}, "rules[0]: must be a table [[rules]]"),
        (
            {"reply": {"reply_all": "a\nb"}},
            "reply.reply_all: 'a\\nb' cannot be sent: the user id contains the control character LF",
        ),
        ({"reply": {"fallback": 5}}, "reply.fallback: must be a string"),
        ({"limits": {"per_client_rate": -1}}, "limits.per_client_rate: must be a number from 0"),
        ({"limits": {"over_limit": "drop"}}, "limits.over_limit: must be one of 'error', 'close'"),
        ({"users": {"noident": "yes"}}, "users.noident: must be true or false"),
        ({"users": {"max_file_size": 10**7}}, "users.max_file_size: must be a whole number"),
        ({"access": {"allow": "10.0.0.0/8"}}, "access.allow: must be a list of networks"),
        ({"access": {"deny": ["10.0.0.0/33"]}}, "access.deny[0]: '10.0.0.0/33' is not an IP"),
        ({"tokens": {"key_file": "token.key"}}, "tokens.key_file: must be an absolute path"),
        ({"forward": {"timeout": 0}}, "forward.timeout: must be a number from 0.1 to 60"),
        (
            {"reply": {"min_response_time": 5}, "limits": {"idle_timeout": 5}},
            "reply.min_response_time: 5 must be shorter than limits.idle_timeout (5)",
        ),
        (
            {"lookup": {"backend": "ebpf"}},
            "lookup.backend: must be one of 'auto', 'netlink', 'procfs'",
        ),
        ({"server": {"lisen": []}}, "server.lisen: unknown key; did you mean 'listen'?"),
        ({"server": 5}, "server: must be a table"),
        ({"server": {"listen": []}}, "server.listen: must be a non-empty list"),
        ({"server": {"listen": "0.0.0.0:113"}}, "server.listen: must be a non-empty list"),
        (
            {"server": {"listen": ["x:113"]}},
            "server.listen[0]: 'x' in 'x:113' is not an IP address",
        ),
        ({"server": {"listen": ["::1:113"]}}, "server.listen[0]: '::1:113' is not ADDRESS:PORT"),
        ({"server": {"listen": ["1.2.3.4:70000"]}}, "server.listen[0]: '70000'"),
        (
            {"server": {"listen": ["1.2.3.4:113", "1.2.3.4:113"]}},
            "server.listen[1]: '1.2.3.4:113' is listed twice",
        ),
        ({"server": {"listen": [113]}}, "server.listen[0]: must be a string"),
        ({"server": {"user": ""}}, "server.user: must be a user or group name"),
        ({"server": {"user": 0}}, "server.user: must be a user or group name"),
        ({"server": {"keep_root": "yes"}}, "server.keep_root: must be true or false"),
        (
            {"limits": {"idle_timeout": 0}},
            "limits.idle_timeout: must be a whole number from 1 to 3600",
        ),
        ({"limits": {"idle_timeout": 1.5}}, "limits.idle_timeout: must be a whole number"),
        ({"limits": {"max_connections": True}}, "limits.max_connections: must be a whole number"),
        ({"limits": {"per_client_connections": -1}}, "limits.per_client_connections: must be"),
        ({"limits": {"networks": [{"per_client_rate": 1}]}}, "limits.networks[0]: needs clients"),
        (
            {"limits": {"networks": [{"clients": ["10.0.0.0/8"]}]}},
            "limits.networks[0]: sets no limit",
        ),
        (
            {"limits": {"networks": [{"clients": ["10.0.0.0/8"], "burst": 3}]}},
            "limits.networks[0].burst: unknown key",
        ),
        ({"limits": {"max_queries_per_connection": "5"}}, "limits.max_queries_per_connection:"),
        ({"reply": {"os": "UN IX"}}, "reply.os: the OS token 'UN IX' is not 1 to 64"),
        ({"reply": {"os": ""}}, "reply.os: the OS token '' is not"),
        ({"reply": {"other_os": "A:B"}}, "reply.other_os: the OS token 'A:B'"),
        ({"reply": {"charset": "UTF,8"}}, "reply.charset: the charset 'UTF,8'"),
        (
            {"reply": {"unknown_uid": "hide"}},
            "reply.unknown_uid: must be one of 'numeric', 'no-user'",
        ),
        (
            {"reply": {"inbound": "yes"}},
            "reply.inbound: must be one of 'hide', 'no-user', 'answer'",
        ),
        ({"reply": {"mask_errors": 1}}, "reply.mask_errors: must be true or false"),
        ({"log": {"level": "loud"}}, "log.level: must be one of"),
        ({"log": {"target": "file"}}, "log.target: must be one of 'stderr', 'syslog'"),
        ({"log": {"syslog_socket": "dev/log"}}, "log.syslog_socket: must be an absolute path"),
        ({"log": {"syslog_facility": "kernel"}}, "log.syslog_facility: must be one of"),
        ({"nat": {"enabled": "yes"}}, "nat.enabled: must be true or false"),
        ({"nat": {"order": "first"}}, "nat.order: must be one of 'forward', 'map'"),
        ({"nat": {"port": 0}}, "nat.port: must be a whole number from 1 to 65535"),
        ({"nat": {"gateways": ["10.0.0.1/8"]}}, "nat.gateways[0]: '10.0.0.1/8' has host bits"),
        ({"nat": {"map": {"hosts": []}}}, "nat.map: must be an array of tables [[nat.map]]"),
        ({"nat": {"map": [{"reply": "x"}]}}, "nat.map[0]: needs hosts, a list such as"),
        ({"nat": {"map": [{"hosts": ["10.0.0.0/8"]}]}}, 'nat.map[0]: action = "reply" needs'),
        (
            {"nat": {"map": [{"hosts": ["10.0.0.0/8"], "reply": "a:b\n"}]}},
            "nat.map[0].reply[0]: 'a:b\\n' cannot be sent: the user id contains the control character LF",
        ),
        (
            {"nat": {"map": [{"hosts": ["10.0.0.0/8"], "action": "hide", "os": "UNIX"}]}},
            'nat.map[0]: reply, os and charset are used only with action = "reply"',
        ),
        (
            {"nat": {"map": [{"hosts": ["10.0.0.0/8"], "action": "real"}]}},
            "nat.map[0].action: must be one of 'reply', 'hide', 'no-user', 'deny'",
        ),
        (
            {"nat": {"map": [{"hosts": ["::/0"], "reply": "x", "host": []}]}},
            "nat.map[0].host: unknown key; did you mean 'hosts'?",
        ),
        (
            {
                "nat": {
                    "map": [
                        {"name": "a", "hosts": ["::/0"], "reply": "x"},
                        {"name": "a", "hosts": ["::/0"], "reply": "y"},
                    ]
                }
            },
            "nat.map[1].name: 'a' names an earlier entry too",
        ),
    ],
)
def test_errors_name_key_and_reason(data: dict, message: str) -> None:
    """Every refusal says which key and why."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, "f.toml")
    assert str(info.value).startswith(f"f.toml: {message}")


def test_nat_is_read() -> None:
    """[nat] and its [[nat.map]] entries reach the dataclasses, named by index."""
    from procident.config import NatMapEntry

    config = parse_config(
        {
            "nat": {
                "enabled": True,
                "order": "map",
                "port": 1113,
                "gateways": ["192.0.2.1", "fd00::1"],
                "map": [
                    {"hosts": ["10.0.0.0/8"], "reply": ["a", "b"], "os": "UNIX"},
                    {"name": "rest", "hosts": ["::/0", "0.0.0.0/0"], "action": "hide"},
                ],
            }
        }
    )
    nat = config.nat
    assert (nat.enabled, nat.order, nat.forward, nat.port) == (True, "map", True, 1113)
    assert nat.gateways == (
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("fd00::1/128"),
    )
    assert nat.map == (
        NatMapEntry(
            "nat.map[0]", (ipaddress.ip_network("10.0.0.0/8"),), "reply", ("a", "b"), "UNIX"
        ),
        NatMapEntry(
            "rest", (ipaddress.ip_network("::/0"), ipaddress.ip_network("0.0.0.0/0")), "hide"
        ),
    )


def test_rules_are_read() -> None:
    """Every match key and action setting reaches the Rule, in order."""
    config = parse_config(
        {
            "rules": [
                {
                    "name": "irc",
                    "users": ["alice", "bob"],
                    "uids": [7, "100-200"],
                    "groups": ["guests"],
                    "clients": ["198.51.100.0/24", "2001:db8::/32"],
                    "local_addresses": ["192.0.2.1"],
                    "server_ports": ["1024-65535"],
                    "client_ports": [6667, "6660-6669"],
                    "inbound": True,
                    "action": "reply",
                    "reply": ["a", "b"],
                    "os": "X",
                    "charset": "UTF-8",
                    "user_may": ["spoof", "hide"],
                },
                {"action": "forward", "forward": "[::1]:1113"},
            ]
        }
    )
    first, second = config.rules
    assert first.name == "irc" and first.users == frozenset({"alice", "bob"})
    assert first.uids == ((7, 7), (100, 200)) and first.groups == frozenset({"guests"})
    assert first.clients == (
        ipaddress.ip_network("198.51.100.0/24"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert first.local_addresses == (ipaddress.ip_network("192.0.2.1/32"),)
    assert first.server_ports == ((1024, 65535),)
    assert first.client_ports == ((6667, 6667), (6660, 6669))
    assert (
        first.inbound and first.reply == ("a", "b") and (first.os, first.charset) == ("X", "UTF-8")
    )
    assert first.user_may == frozenset({"spoof", "hide"})
    assert second.name == "rules[1]"
    assert second.forward == Endpoint(ipaddress.IPv6Address("::1"), 1113)


def test_rules_replace_the_default_root_rule() -> None:
    """No [[rules]] means the default (root hidden); any [[rules]] list replaces it."""
    assert [r.users for r in Config().rules] == [frozenset({"root"})]
    assert parse_config({"rules": []}).rules == ()


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error gives the file, the line and the column."""
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nuser = 'x'\nlisten = [,]\n[limits]\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML: .*line 3, column"):
        load_config(str(path))


def test_unreadable_file(tmp_path: Path) -> None:
    """A file that cannot be read is a ConfigError with the reason."""
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        load_config(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize(
    ("text", "address", "port"),
    [
        ("0.0.0.0:113", "0.0.0.0", 113),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("[::]:113", "::", 113),
        ("[::1]:65535", "::1", 65535),
        ("[fe80::1]:113", "fe80::1", 113),
    ],
)
def test_parse_endpoint(text: str, address: str, port: int) -> None:
    """ADDRESS:PORT and [IPV6]:PORT are read."""
    assert parse_endpoint(text) == Endpoint(ipaddress.ip_address(address), port)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "113",
        "localhost:113",
        "[127.0.0.1]:113",
        "[::1]113",
        "::1:113",
        "1.2.3.4:+5",
        "1.2.3.4:\u0665",
    ],
)
def test_parse_endpoint_refuses(text: str) -> None:
    """Host names, unbracketed IPv6, and odd ports are refused."""
    with pytest.raises(ValueError):
        parse_endpoint(text)


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError with the offending byte, not a traceback
    (found by fuzz/fuzz_config.py)."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nuser = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text: byte 20 is 0xe9"):
        load_config(str(path))
