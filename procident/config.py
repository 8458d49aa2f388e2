"""The TOML configuration file, read once into the frozen dataclasses of
procident.settings (re-exported here).

Every error names the file, the key path and the reason; unknown keys are
refused, with a suggestion when one is close.
"""

from __future__ import annotations

import logging.handlers
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

from procident.auditid import PERIODS as AUDIT_PERIODS
from procident.auditid import SCOPES as AUDIT_SCOPES
from procident.lookup import Endpoint
from procident.protocol import printable
from procident.settings import (
    DEFAULT_RULES,
    DEFAULT_USER,
    FALLBACK_USER,
    AccessConfig,
    Config,
    ForwardConfig,
    LimitsConfig,
    LogConfig,
    LookupConfig,
    MetricsConfig,
    NatConfig,
    NatMapEntry,
    NetworkLimits,
    ReplyConfig,
    Rule,
    ServerConfig,
    TokensConfig,
    UsersConfig,
)
from procident.tomlcheck import (
    _address,
    _boolean,
    _checked_table,
    _choice,
    _integer,
    _list_of,
    _listen,
    _name,
    _network,
    _number,
    _optional_listen,
    _optional_name,
    _optional_path,
    _optional_user_id,
    _path,
    _range,
    _token,
    _unknown,
    _user_id,
    read_toml,
    shown,
)

__all__ = [
    "DEFAULT_RULES",
    "DEFAULT_USER",
    "FALLBACK_USER",
    "AccessConfig",
    "Config",
    "ConfigError",
    "ForwardConfig",
    "LimitsConfig",
    "LogConfig",
    "LookupConfig",
    "MetricsConfig",
    "NatConfig",
    "NatMapEntry",
    "NetworkLimits",
    "ReplyConfig",
    "Rule",
    "ServerConfig",
    "TokensConfig",
    "UsersConfig",
    "load_config",
    "parse_config",
    "with_listen",
    "with_log",
]


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and why."""


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("stderr", "syslog")
LOG_FORMATS = ("text", "json")
UNKNOWN_UID_ACTIONS = ("numeric", "no-user")
INBOUND_ACTIONS = ("hide", "no-user", "answer")
LOOKUP_BACKENDS = ("auto", "netlink", "procfs")
OVER_LIMIT_ACTIONS = ("error", "close")
NAT_ORDERS = ("forward", "map")
NAT_MAP_ACTIONS = ("reply", "hide", "no-user", "deny")
ACTIONS = (
    "real",
    "numeric",
    "hide",
    "no-user",
    "reply",
    "random",
    "random-numeric",
    "token",
    "audit-id",
    "forward",
    "deny",
)
CAPABILITIES = (
    "spoof",
    "spoof_all",
    "spoof_privport",
    "hide",
    "random",
    "numeric",
    "forward",
)
SYSLOG_FACILITIES = tuple(sorted(logging.handlers.SysLogHandler.facility_names))


MAX_AUDIT_UIDS = 1 << 20  # uids decode-token tries beside the accounts: about 2 s a key


def _uid_span(value: object) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] <= value[1] < 1 << 32
    ):
        raise ValueError(f"must be [FIRST, LAST], two uids with FIRST <= LAST, not {shown(value)}")
    if value[1] - value[0] >= MAX_AUDIT_UIDS:
        raise ValueError(f"must span at most {MAX_AUDIT_UIDS} uids, not {shown(value)}")
    return value[0], value[1]


_SECTIONS: dict[str, tuple[type[Any], dict[str, Callable[[Any], Any]]]] = {
    "server": (
        ServerConfig,
        {"listen": _listen, "user": _name, "group": _optional_name, "keep_root": _boolean},
    ),
    "limits": (
        LimitsConfig,
        {
            "idle_timeout": _integer(1, 3600),
            "max_connections": _integer(1, 65536),
            "per_client_connections": _integer(1, 65536),
            "max_queries_per_connection": _integer(1, 10000),
            "per_client_rate": _number(0, 1e6),
            "per_client_burst": _integer(1, 1000000),
            "over_limit": _choice(*OVER_LIMIT_ACTIONS),
            "clients_tracked": _integer(16, 10000000),
            "networks": lambda value: _limit_networks(value),
        },
    ),
    "reply": (
        ReplyConfig,
        {
            "os": _token("OS token"),
            "other_os": _token("OS token"),
            "charset": _token("charset", empty_ok=True),
            "unknown_uid": _choice(*UNKNOWN_UID_ACTIONS),
            "inbound": _choice(*INBOUND_ACTIONS),
            "mask_errors": _boolean,
            "min_response_time": _number(0, 10),
            "reply_all": _optional_user_id,
            "fallback": _optional_user_id,
        },
    ),
    "lookup": (LookupConfig, {"backend": _choice(*LOOKUP_BACKENDS)}),
    "users": (
        UsersConfig,
        {
            "noident": _boolean,
            "opt_in": _boolean,
            "oidentd_files": _boolean,
            "max_file_size": _integer(64, 65536),
            "cache_seconds": _integer(0, 3600),
            "helper_socket": _optional_path,
        },
    ),
    "access": (
        AccessConfig,
        {
            "allow": _list_of(_network, "networks"),
            "deny": _list_of(_network, "networks"),
        },
    ),
    "tokens": (
        TokensConfig,
        {
            "key_file": _path,
            "audit_period": _choice(*AUDIT_PERIODS),
            "audit_scope": _choice(*AUDIT_SCOPES),
            "audit_ipv4_prefix": _integer(8, 32),
            "audit_ipv6_prefix": _integer(16, 128),
            "audit_uids": _uid_span,
        },
    ),
    "forward": (ForwardConfig, {"timeout": _number(0.1, 60)}),
    "nat": (
        NatConfig,
        {
            "enabled": _boolean,
            "order": _choice(*NAT_ORDERS),
            "forward": _boolean,
            "port": _integer(1, 65535),
            "map": lambda value: _nat_map(value),
            "gateways": _list_of(_network, "networks"),
        },
    ),
    "metrics": (
        MetricsConfig,
        {
            "listen": _optional_listen,
            "textfile": _optional_path,
            "interval": _integer(1, 3600),
        },
    ),
    "log": (
        LogConfig,
        {
            "level": _choice(*LOG_LEVELS),
            "target": _choice(*LOG_TARGETS),
            "syslog_socket": _path,
            "syslog_facility": _choice(*SYSLOG_FACILITIES),
            "format": _choice(*LOG_FORMATS),
            "user_names": _boolean,
        },
    ),
}


MAX_UID = 2**32 - 1
_RULE_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _name,
    "users": _list_of(_name, "user names"),
    "uids": _list_of(_range(MAX_UID, "uid"), "uids"),
    "groups": _list_of(_name, "group names"),
    "clients": _list_of(_network, "networks"),
    "local_addresses": _list_of(_network, "networks"),
    "server_ports": _list_of(_range(65535, "port"), "ports"),
    "client_ports": _list_of(_range(65535, "port"), "ports"),
    "inbound": _boolean,
    "action": _choice(*ACTIONS),
    "reply": lambda value: _list_of(_user_id, "user ids")(
        [value] if isinstance(value, str) else value
    ),
    "os": _token("OS token"),
    "charset": _token("charset"),
    "forward": _address,
    "user_may": _list_of(_choice(*CAPABILITIES), "capabilities"),
    "long_ids": _boolean,
}
_SETS = ("users", "groups", "user_may")
# Actions that name nobody: the owner's own files cannot turn them into a reply.
CONCEALING = ("hide", "no-user", "deny")
MAX_REPLIES = 255


def _parse_rule(table: object, path: str) -> Rule:
    try:
        values = _checked_table(table, _RULE_KEYS, path, "[[rules]]")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for key in _SETS:
        if key in values:
            values[key] = frozenset(values[key])
    action = values.get("action")
    if action is None:
        raise ConfigError(f"{path}: has no action (one of {', '.join(ACTIONS)})")
    for key, needed_by in (("reply", "reply"), ("forward", "forward")):
        if key in values and action != needed_by:
            raise ConfigError(f'{path}.{key}: is used only with action = "{needed_by}"')
        if key not in values and action == needed_by:
            raise ConfigError(f'{path}: action = "{needed_by}" needs the key {key!r}')
    replies = values.get("reply", ())
    if action == "reply" and not 1 <= len(replies) <= MAX_REPLIES:
        raise ConfigError(f"{path}.reply: must hold 1 to {MAX_REPLIES} ids")
    if values.get("user_may") and action in CONCEALING:
        raise ConfigError(
            f'{path}.user_may: a rule with action = "{action}" names nobody, '
            "so there is nothing for users to choose"
        )
    values.setdefault("name", path)
    return Rule(**values)


_NAT_MAP_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _name,
    "hosts": _list_of(_network, "networks"),
    "action": _choice(*NAT_MAP_ACTIONS),
    "reply": _RULE_KEYS["reply"],
    "os": _token("OS token"),
    "charset": _token("charset"),
}


def _tables(
    value: object, keys: dict[str, Callable[[Any], Any]], kind: str, needs: str, example: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The tables of an array of tables [[kind]], each checked against `keys` and required
    to have a non-empty `needs`: (its index as "[i]", its values)."""
    if not isinstance(value, list):
        raise ValueError(f"must be an array of tables [[{kind}]]")
    for index, table in enumerate(value):
        where = f"[{index}]"
        values = _checked_table(table, keys, where, f"[[{kind}]]")
        if not values.get(needs):
            raise ValueError(f'{where}: needs {needs}, a list such as ["{example}"]')
        yield where, values


def _nat_map(value: object) -> tuple[NatMapEntry, ...]:
    """[[nat.map]] entries; a ValueError starts with the entry's index and key."""
    entries: list[NatMapEntry] = []
    for where, values in _tables(value, _NAT_MAP_KEYS, "nat.map", "hosts", "192.168.1.0/24"):
        action = values.setdefault("action", "reply")
        replies = values.get("reply", ())
        if action == "reply" and not 1 <= len(replies) <= MAX_REPLIES:
            raise ValueError(f'{where}: action = "reply" needs reply, 1 to {MAX_REPLIES} ids')
        if action != "reply" and ("reply" in values or "os" in values or "charset" in values):
            raise ValueError(f'{where}: reply, os and charset are used only with action = "reply"')
        values.setdefault("name", f"nat.map{where}")
        if any(entry.name == values["name"] for entry in entries):
            raise ValueError(f"{where}.name: {values['name']!r} names an earlier entry too")
        entries.append(NatMapEntry(**values))
    return tuple(entries)


_NETWORK_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _name,
    "clients": _list_of(_network, "networks"),
    "per_client_connections": _integer(1, 65536),
    "per_client_rate": _number(0, 1e6),
    "per_client_burst": _integer(1, 1000000),
}


def _limit_networks(value: object) -> tuple[NetworkLimits, ...]:
    """[[limits.networks]] entries; a ValueError starts with the entry's index and key."""
    entries: list[NetworkLimits] = []
    tables = _tables(value, _NETWORK_KEYS, "limits.networks", "clients", "203.0.113.0/24")
    for where, values in tables:
        if len(values) - ("name" in values) == 1:
            raise ValueError(
                f"{where}: sets no limit (per_client_connections, per_client_rate or "
                "per_client_burst)"
            )
        values.setdefault("name", f"limits.networks{where}")
        entries.append(NetworkLimits(**values))
    return tuple(entries)


def _parse_rules(value: object, source: str) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{source}: rules: must be an array of tables [[rules]]")
    rules: list[Rule] = []
    names: set[str] = set()
    for index, table in enumerate(value):
        path = f"rules[{index}]"
        try:
            rule = _parse_rule(table, path)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        if rule.name in names:
            raise ConfigError(f"{source}: {path}.name: {rule.name!r} names an earlier rule too")
        names.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Turn parsed TOML into a Config; ConfigError names the key and the reason."""
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name == "rules":
            sections["rules"] = _parse_rules(table, source)
            continue
        if name not in _SECTIONS:
            known = [*_SECTIONS, "rules"]
            raise ConfigError(f"{source}: {_unknown(name, known, printable(name, 64))}")
        cls, checkers = _SECTIONS[name]
        try:
            sections[name] = cls(**_checked_table(table, checkers, name, f"[{name}]"))
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
    config = Config(**sections)
    if config.reply.min_response_time >= config.limits.idle_timeout:
        raise ConfigError(
            f"{source}: reply.min_response_time: {config.reply.min_response_time:g} must be "
            f"shorter than limits.idle_timeout ({config.limits.idle_timeout})"
        )
    return config


def load_config(path: str) -> Config:
    """Read and parse a TOML file; ConfigError says what is wrong and where."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        data = read_toml(raw.decode("utf-8"))
    except UnicodeDecodeError as err:  # TOML is UTF-8 (found by fuzz/fuzz_config.py)
        raise ConfigError(
            f"{path}: not UTF-8 text: byte {err.start} is {err.object[err.start]:#04x}"
        ) from None
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    return parse_config(data, path)


def with_listen(config: Config, listen: tuple[Endpoint, ...]) -> Config:
    """The same config with other listen addresses (the CLI's --listen)."""
    return replace(config, server=replace(config.server, listen=listen))


def with_log(
    config: Config, level: str | None, target: str | None, format: str | None = None
) -> Config:
    """The same config with the CLI's log level, target and format, where given."""
    log = config.log
    return replace(
        config,
        log=replace(
            log,
            level=level or log.level,
            target=target or log.target,
            format=format or log.format,
        ),
    )
