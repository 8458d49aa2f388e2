"""TOML configuration: defaults, the sample file, and errors that name key and reason."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from procident.config import Config, ConfigError, load_config, parse_config, parse_endpoint
from procident.lookup import Endpoint

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
        ({"rules": {}}, "rules: unknown key (known: server, limits, reply, lookup, log)"),
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
    ],
)
def test_errors_name_key_and_reason(data: dict, message: str) -> None:
    """Every refusal says which key and why."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, "f.toml")
    assert str(info.value).startswith(f"f.toml: {message}")


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
