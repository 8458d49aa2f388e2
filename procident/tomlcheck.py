"""Typed checkers of TOML values, and reading TOML that others wrote, for the
configuration (config.py) and users' ~/.procident.toml (userfiles.py).

Each checker takes a parsed TOML value and returns it checked, or raises ValueError
with the reason; _checked_table runs a table's keys through theirs, naming the key's
path. read_toml parses text in linear time or says in one line why not.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import reprlib
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from procident.lookup import Endpoint
from procident.protocol import ReplyError, check_token, check_user_id, printable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]  # low, high; both included


def parse_endpoint(text: str) -> Endpoint:
    """Parse ADDRESS:PORT, an IPv6 address in brackets: 0.0.0.0:113, [::1]:113."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]:")
        if not bracket:
            raise ValueError(f"{shown(text)} is not [IPV6-ADDRESS]:PORT")
    else:
        host, colon, port = text.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(f"{shown(text)} is not ADDRESS:PORT (write IPv6 as [::1]:113)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{shown(host)} in {shown(text)} is not an IP address") from None
    if "[" in text and address.version != 6:
        raise ValueError(f"{shown(text)}: brackets are for IPv6 addresses")
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"{shown(port)} in {shown(text)} is not a port from 0 to 65535")
    return Endpoint(address, int(port))


# -- value checkers: each takes the TOML value and returns it checked ---------

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxdict = 10
_SHOWN.maxlevel = 3


def shown(value: object) -> str:
    """A value as an error message quotes it: its repr (which escapes control
    characters), cut short, nesting included, so no file can make a message long."""
    return _SHOWN.repr(value)


def _integer(low: int, high: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be a whole number from {low} to {high}, not {shown(value)}")
        return value

    return check


def _number(low: float, high: float) -> Callable[[object], float]:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number from {low:g} to {high:g}, not {shown(value)}")
        if not low <= value <= high:
            raise ValueError(f"must be a number from {low:g} to {high:g}, not {shown(value)}")
        return float(value)

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {shown(value)}")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, not {shown(value)}")
        return str(value)

    return check


def _name(value: object) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in ":\0\n"):
        raise ValueError(f"must be a user or group name, not {shown(value)}")
    return value


def _optional_name(value: object) -> str:
    return "" if value == "" else _name(value)


def _token(what: str, empty_ok: bool = False) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {shown(value)}")
        if empty_ok and value == "":
            return value
        try:
            return check_token(value, what)
        except ReplyError as err:
            raise ValueError(str(err)) from None

    return check


def _user_id(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {shown(value)}")
    try:
        check_user_id(value)
    except ReplyError as err:
        raise ValueError(f"{shown(value)} cannot be sent: {err}") from None
    return value


def _optional_user_id(value: object) -> str:
    return "" if value == "" else _user_id(value)


def _list_of(check: Callable[[object], T], what: str) -> Callable[[object], tuple[T, ...]]:
    """A list whose items each pass `check`; the error names the item's index."""

    def check_list(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError(f"must be a list of {what}, not {shown(value)}")
        items: list[T] = []
        for index, item in enumerate(value):
            try:
                items.append(check(item))
            except ValueError as err:
                raise ValueError(f"[{index}]: {err}") from None
        return tuple(items)

    return check_list


def parse_network(text: str) -> IPNetwork:
    """An address or CIDR network: 198.51.100.0/24, 2001:db8::/32, 192.0.2.7."""
    try:
        return ipaddress.ip_network(text)
    except ValueError as err:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{shown(text)} is not an IP address or network: {err}") from None
        raise ValueError(f"{shown(text)} has host bits set; did you mean {str(loose)!r}?") from None


def _network(value: object) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f'must be a string such as "198.51.100.0/24", not {shown(value)}')
    return parse_network(value)


def parse_range(text: str, high: int, what: str) -> PortRange:
    """N or LOW-HIGH, both numbers from 0 (1 for ports) to `high`."""
    low_text, dash, high_text = text.partition("-")
    bounds = []
    for part in (low_text, high_text) if dash else (low_text,):
        part = part.strip()
        if not (part.isascii() and part.isdigit() and len(part) <= 10):
            raise ValueError(f"{shown(text)} is not a {what} or a range LOW-HIGH")
        bounds.append(int(part))
    low, top = bounds[0], bounds[-1]
    least = 1 if what == "port" else 0
    if not least <= low <= top <= high:
        raise ValueError(f"{shown(text)} is not a {what} range from {least} to {high}, low first")
    return low, top


def _range(high: int, what: str) -> Callable[[object], PortRange]:
    def check(value: object) -> PortRange:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f'must be a {what} or a string "LOW-HIGH", not {shown(value)}')
        return parse_range(value, high, what)

    return check


def _address(value: object) -> Endpoint:
    if not isinstance(value, str):
        raise ValueError(f"must be a string ADDRESS:PORT, not {shown(value)}")
    endpoint = parse_endpoint(value)
    if endpoint.port == 0:
        raise ValueError(f"{shown(value)}: port 0 cannot be asked")
    return endpoint


def _optional_listen(value: object) -> str:
    if value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError(f"must be a string ADDRESS:PORT, or empty, not {shown(value)}")
    parse_endpoint(value)
    return value


def _optional_path(value: object) -> str:
    return "" if value == "" else _path(value)


def _path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"must be an absolute path, not {shown(value)}")
    return value


def _listen(value: object) -> tuple[Endpoint, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError('must be a non-empty list such as ["0.0.0.0:113", "[::]:113"]')
    endpoints: list[Endpoint] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"[{index}]: must be a string ADDRESS:PORT, not {shown(item)}")
        try:
            endpoint = parse_endpoint(item)
        except ValueError as err:
            raise ValueError(f"[{index}]: {err}") from None
        if endpoint in endpoints:
            raise ValueError(f"[{index}]: {shown(item)} is listed twice")
        endpoints.append(endpoint)
    return tuple(endpoints)


def _key_path(path: str, key: str) -> str:
    """A key's path for messages: section.key, rules[2].key, or key at a file's top. The
    key is whatever the file says (a user's file too): escaped and cut short."""
    key = printable(key, 64)
    return f"{path}.{key}" if path else key


def _checked_table(
    table: object, checkers: Mapping[str, Callable[[Any], Any]], path: str, what: str
) -> dict[str, Any]:
    """Each key of a TOML table passed through its checker: a section, a [[rules]] entry,
    a [[nat.map]] entry, a user's choice. A ValueError names the key's path (`path` is
    the table's, such as reply or rules[2]; empty at the top of a file) and the reason."""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: must be a table {what}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = _key_path(path, key)
        if key not in checkers:
            raise ValueError(_unknown(key, list(checkers), where))
        try:
            values[key] = checkers[key](value)
        except ValueError as err:
            reason = str(err)  # a reason about a list's item starts with its index
            sep = "" if reason.startswith("[") else ": "
            raise ValueError(f"{where}{sep}{reason}") from None
    return values


def _unknown(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
    return f"{where}: unknown key{hint}"


# Python's TOML reader takes time quadratic in the number of parts of a dotted key
# (a.a.a...: 4 s for 32 KiB); no configuration needs more than a few.
MAX_KEY_PARTS = 16
_TOML_MARKS = re.compile(r"[\"'#\n=,\[\]{}.]")


def _string_end(text: str, start: int, quote: str) -> int:
    """Where the string whose content starts at `start` ends (after its closing `quote`,
    one character or three), or -1 if it never does. Basic strings (") honour backslash
    escapes. Linear: each find starts past the last, and each backslash run is counted
    once."""
    escapes = quote[0] == '"'
    at = start
    while True:
        found = text.find(quote, at)
        if found < 0:
            return -1
        if escapes:
            back = found
            while back > start and text[back - 1] == "\\":
                back -= 1
            if (found - back) % 2:  # an escaped quote: look further
                at = found + 1
                continue
        return found + len(quote)


def toml_shape_problem(text: str) -> str:
    """Why `text` must not be given to the TOML reader (a dotted key of more than
    MAX_KEY_PARTS parts), or "". A linear scan that skips strings and comments."""
    position, dots = 0, 0
    while True:
        mark = _TOML_MARKS.search(text, position)
        if mark is None:
            return ""
        char, position = mark[0], mark.end()
        if char == ".":
            dots += 1
            if dots >= MAX_KEY_PARTS:
                line = text.count("\n", 0, position) + 1
                return f"line {line}: a dotted key of more than {MAX_KEY_PARTS} parts"
        elif char == "#":
            end = text.find("\n", position)
            if end < 0:
                return ""
            position = end
        elif char in "\"'":
            quote = char * 3 if text.startswith(char * 3, position - 1) else char
            end = _string_end(text, position - 1 + len(quote), quote)
            if end < 0:
                return ""  # unterminated: the reader says so
            position = end
        else:
            dots = 0


def read_toml(text: str) -> dict[str, Any]:
    """Parse TOML text that others may have written (the configuration, a user's
    ~/.procident.toml). ValueError (tomllib.TOMLDecodeError among them) says why not,
    in one line; no input takes more than linear time or raises anything else."""
    problem = toml_shape_problem(text)
    if problem:
        raise ValueError(f"not usable: {problem}")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"not valid TOML: {err}") from None
    except RecursionError:  # arrays or tables nested thousands deep
        raise ValueError("not usable: nested too deeply") from None
    except ValueError as err:  # an integer of thousands of digits, and the like
        raise ValueError(f"not usable: {printable(str(err), 80)}") from None
