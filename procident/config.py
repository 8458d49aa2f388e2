"""The TOML configuration, parsed once into frozen dataclasses.

Every error names the file, the key path and the reason; unknown keys are
refused, with a suggestion when one is close. The defaults here are the
embedded default configuration, and etc/procident.toml documents exactly them
(a test holds the two together).
"""

from __future__ import annotations

import difflib
import ipaddress
import logging.handlers
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from procident.lookup import Endpoint
from procident.protocol import ReplyError, check_token

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: where to listen and whom to run as."""

    listen: tuple[Endpoint, ...] = (
        Endpoint(ipaddress.IPv4Address("0.0.0.0"), 113),
        Endpoint(ipaddress.IPv6Address("::"), 113),
    )
    user: str = "nobody"
    group: str = ""  # empty: the user's primary group
    keep_root: bool = False


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[limits]: what one client, and all of them, may hold."""

    idle_timeout: int = 60
    max_connections: int = 256
    per_client_connections: int = 8
    max_queries_per_connection: int = 20


@dataclass(frozen=True, slots=True)
class ReplyConfig:
    """[reply]: what the answers look like."""

    os: str = "UNIX"
    other_os: str = "OTHER"
    charset: str = ""  # empty: none sent
    unknown_uid: str = "numeric"  # or "no-user"
    inbound: str = "hide"  # or "no-user", "answer"
    mask_errors: bool = False


@dataclass(frozen=True, slots=True)
class LookupConfig:
    """[lookup]: how the kernel is asked."""

    backend: str = "auto"  # or "netlink", "procfs"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: where log lines go."""

    level: str = "info"
    target: str = "stderr"  # or "syslog"
    syslog_socket: str = "/dev/log"
    syslog_facility: str = "daemon"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    reply: ReplyConfig = field(default_factory=ReplyConfig)
    lookup: LookupConfig = field(default_factory=LookupConfig)
    log: LogConfig = field(default_factory=LogConfig)


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("stderr", "syslog")
UNKNOWN_UID_ACTIONS = ("numeric", "no-user")
INBOUND_ACTIONS = ("hide", "no-user", "answer")
LOOKUP_BACKENDS = ("auto", "netlink", "procfs")
SYSLOG_FACILITIES = tuple(sorted(logging.handlers.SysLogHandler.facility_names))


def parse_endpoint(text: str) -> Endpoint:
    """Parse ADDRESS:PORT, an IPv6 address in brackets: 0.0.0.0:113, [::1]:113."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]:")
        if not bracket:
            raise ValueError(f"{text!r} is not [IPV6-ADDRESS]:PORT")
    else:
        host, colon, port = text.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(f"{text!r} is not ADDRESS:PORT (write IPv6 as [::1]:113)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} in {text!r} is not an IP address") from None
    if "[" in text and address.version != 6:
        raise ValueError(f"{text!r}: brackets are for IPv6 addresses")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"{port!r} in {text!r} is not a port from 0 to 65535")
    return Endpoint(address, int(port))


# -- value checkers: each takes the TOML value and returns it checked ---------


def _integer(low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}, not {value!r}")
        return value

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return str(value)

    return check


def _name(value: object) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in ":\0\n"):
        raise ValueError(f"must be a user or group name, not {value!r}")
    return value


def _optional_name(value: object) -> str:
    return "" if value == "" else _name(value)


def _token(what: str, empty_ok: bool = False) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {value!r}")
        if empty_ok and value == "":
            return value
        try:
            return check_token(value, what)
        except ReplyError as err:
            raise ValueError(str(err)) from None

    return check


def _path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be an absolute path, not {value!r}")
    return value


def _listen(value: object) -> tuple[Endpoint, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('must be a non-empty list such as ["0.0.0.0:113", "[::]:113"]')
    endpoints: list[Endpoint] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"[{index}]: must be a string ADDRESS:PORT, not {item!r}")
        try:
            endpoint = parse_endpoint(item)
        except ValueError as err:
            raise ValueError(f"[{index}]: {err}") from None
        if endpoint in endpoints:
            raise ValueError(f"[{index}]: {item!r} is listed twice")
        endpoints.append(endpoint)
    return tuple(endpoints)


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
        },
    ),
    "lookup": (LookupConfig, {"backend": _choice(*LOOKUP_BACKENDS)}),
    "log": (
        LogConfig,
        {
            "level": _choice(*LOG_LEVELS),
            "target": _choice(*LOG_TARGETS),
            "syslog_socket": _path,
            "syslog_facility": _choice(*SYSLOG_FACILITIES),
        },
    ),
}


def _unknown(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
    return f"{where}: unknown key{hint}"


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Turn parsed TOML into a Config; ConfigError names the key and the reason."""
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: {_unknown(name, list(_SECTIONS), name)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name}: must be a table [{name}]")
        cls, checkers = _SECTIONS[name]
        values: dict[str, Any] = {}
        for key, value in table.items():
            path = f"{name}.{key}"
            if key not in checkers:
                raise ConfigError(f"{source}: {_unknown(key, list(checkers), path)}")
            try:
                values[key] = checkers[key](value)
            except ValueError as err:
                reason = str(err)  # a reason about an item starts with its index
                sep = "" if reason.startswith("[") else ": "
                raise ConfigError(f"{source}: {path}{sep}{reason}") from None
        sections[name] = cls(**values)
    return Config(**sections)


def load_config(path: str) -> Config:
    """Read and parse a TOML file; ConfigError says what is wrong and where."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(data, path)


def with_listen(config: Config, listen: tuple[Endpoint, ...]) -> Config:
    """The same config with other listen addresses (the CLI's --listen)."""
    return replace(config, server=replace(config.server, listen=listen))


def with_log(config: Config, level: str | None, target: str | None) -> Config:
    """The same config with the CLI's log level and target, where given."""
    log = config.log
    return replace(config, log=replace(log, level=level or log.level, target=target or log.target))
