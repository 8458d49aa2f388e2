"""What users say about their own replies: the files in their home directories. Pure.

~/.noident and ~/.ident are read by their existence alone. A user's choice of
reply comes from ~/.procident.toml, or from the oidentd files that IRC software
writes (~/.config/oidentd.conf, else ~/.oidentd.conf). These parsers take the
text; reading it safely is the job of procident.homes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from procident.lookup import ConnectionId, Endpoint
from procident.matching import connection_mismatch
from procident.tomlcheck import (
    IPNetwork,
    PortRange,
    _address,
    _checked_table,
    _key_path,
    _list_of,
    _network,
    _range,
    _string_end,
    _user_id,
    read_toml,
    shown,
)

# The files, relative to the home directory, in the order they are looked for.
NOIDENT = ".noident"
IDENT = ".ident"
PROCIDENT_FILE = ".procident.toml"
OIDENTD_FILES = (".config/oidentd.conf", ".oidentd.conf")  # the first that exists

USER_ACTIONS = ("reply", "hide", "random", "random-numeric", "numeric", "forward")
MAX_USER_REPLIES = 20  # as oidentd allows in user files
MAX_USER_RULES = 1000


class UserFileError(ValueError):
    """A user file that cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Choice:
    """A user's reply for the connections it matches (empty fields match anything)."""

    action: str
    reply: tuple[str, ...] = ()
    forward: Endpoint | None = None
    clients: tuple[IPNetwork, ...] = ()  # the remote address (oidentd: "to")
    client_ports: tuple[PortRange, ...] = ()  # the remote port ("fport")
    local_addresses: tuple[IPNetwork, ...] = ()  # ("from")
    server_ports: tuple[PortRange, ...] = ()  # the local port ("lport")
    where: str = ""  # for the log: "~/.oidentd.conf line 3"

    def matches(self, conn: ConnectionId) -> bool:
        """Whether this choice is for `conn` (local = this host's end)."""
        return not connection_mismatch(self, conn)

    def describe(self) -> str:
        """What `check-config --user` shows: the action and the connections it is for."""
        what = self.action
        if self.reply:
            what += " " + ", ".join(map(repr, self.reply))
        if self.forward:
            what += f" to {self.forward}"
        where = []
        for label, networks in (("to", self.clients), ("from", self.local_addresses)):
            if networks:
                where.append(f"{label} {','.join(map(str, networks))}")
        for label, ranges in (("fport", self.client_ports), ("lport", self.server_ports)):
            if ranges:
                shown = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)
                where.append(f"{label} {shown}")
        return f"{what} for {' '.join(where)}" if where else f"{what} (any connection)"


@dataclass(frozen=True, slots=True)
class ChoiceFile:
    """One user file: choices for some connections, and one for the rest."""

    path: str
    choices: tuple[Choice, ...] = ()  # first match wins
    default: Choice | None = None

    def choose(self, conn: ConnectionId) -> Choice | None:
        """The user's choice for `conn`, or None when the file says nothing about it."""
        for choice in self.choices:
            if choice.matches(conn):
                return choice
        return self.default


@dataclass(frozen=True, slots=True)
class UserFiles:
    """What one user's home directory says, as read at one time."""

    noident: bool = False
    ident: bool = False
    choices: ChoiceFile | None = None
    problems: tuple[str, ...] = field(default=())  # files ignored, and why
    unreadable: bool = False  # the home directory could not be read at all


# -- ~/.procident.toml ---------------------------------------------------------


def _loopback_forward(value: object) -> Endpoint:
    endpoint = _address(value)
    if not endpoint.address.is_loopback:
        raise ValueError(f"{shown(value)}: a user may forward only to a loopback address")
    return endpoint


def _user_action(value: object) -> str:
    if value not in USER_ACTIONS:
        raise ValueError(f"must be one of {', '.join(USER_ACTIONS)}, not {shown(value)}")
    return str(value)


_CHOICE_KEYS: dict[str, Any] = {
    "action": _user_action,
    "reply": lambda v: _list_of(_user_id, "user ids")([v] if isinstance(v, str) else v),
    "forward": _loopback_forward,
    "clients": _list_of(_network, "networks"),
    "client_ports": _list_of(_range(65535, "port"), "ports"),
    "local_addresses": _list_of(_network, "networks"),
    "server_ports": _list_of(_range(65535, "port"), "ports"),
}
_MATCH_KEYS = ("clients", "client_ports", "local_addresses", "server_ports")
# At the top of ~/.procident.toml: the default choice, for every connection.
_DEFAULT_KEYS = {key: check for key, check in _CHOICE_KEYS.items() if key not in _MATCH_KEYS}


def _choice_from(table: dict[str, Any], path: str, where: str, top: bool) -> Choice:
    if top:
        table = {key: value for key, value in table.items() if key != "rules"}
    try:
        values = _checked_table(table, _DEFAULT_KEYS if top else _CHOICE_KEYS, path, "")
    except ValueError as err:
        raise UserFileError(str(err)) from None
    action = values.get("action")
    if action is None:
        raise UserFileError(f"{path or 'the file'}: has no action")
    for key in ("reply", "forward"):
        if (key in values) != (action == key):
            raise UserFileError(
                f'{_key_path(path, key)}: goes with action = "{key}", and only with it'
            )
    if len(values.get("reply", ())) > MAX_USER_REPLIES:
        raise UserFileError(f"{_key_path(path, 'reply')}: at most {MAX_USER_REPLIES} ids")
    return Choice(where=where, **values)


def parse_procident_file(text: str, path: str = "~/" + PROCIDENT_FILE) -> ChoiceFile:
    """Parse a user's ~/.procident.toml; UserFileError says what is wrong.

    Top-level action/reply/forward: the default choice; [[rules]]: choices
    for some connections (match keys as in the system rules), first match wins.
    """
    try:
        data = read_toml(text)
    except ValueError as err:
        raise UserFileError(str(err)) from None
    default = _choice_from(data, "", path, top=True) if "action" in data else None
    if default is None:
        stray = [k for k in data if k != "rules"]
        if stray:
            raise UserFileError(f"{_key_path('', stray[0])}: without an action at the top level")
    rules = data.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise UserFileError("rules: must be an array of tables [[rules]]")
    if len(rules) > MAX_USER_RULES:
        raise UserFileError(f"rules: at most {MAX_USER_RULES}")
    choices = tuple(
        _choice_from(rule, f"rules[{i}]", f"{path} rules[{i}]", top=False)
        for i, rule in enumerate(rules)
    )
    return ChoiceFile(path, choices, default)


# -- oidentd's user files, as ZNC, The Lounge, Quassel and eggdrop write them --

# The tokens of an oidentd file, one match at a time from where the last one ended: white
# space, a comment (# to the end of the line, or /* to */, found with str.find), a quoted
# string (with C escapes), a brace, or a bare word. Each step consumes what it matched and
# no pattern can rescan past its own end, so a file of any content is read in linear time.
_OIDENTD_TOKEN = re.compile(
    r'(\s+)|(#[^\n]*)|(/\*)|(")|([{}])'  # white space, comments, a string, a brace
    r'|([^\s{}"#/]+(?:/(?!\*)[^\s{}"#/]*)*|/)'  # a word: anything else, up to a "/*"
)
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|.)", re.S)
_STATEMENTS = {
    "hide": "hide",
    "random": "random",
    "random_numeric": "random-numeric",
    "numeric": "numeric",
}


def _unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match[1]
        if code[0] == "x" and len(code) > 1:  # a bare \x is an x (found by fuzzing)
            return chr(int(code[1:], 16))
        if code[0] in "01234567":
            return chr(int(code, 8) & 0xFF)
        return _ESCAPES.get(code, code)

    return _ESCAPE.sub(one, text)


def _oidentd_tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, value, line): kind is "string", "brace" or "word"; comments are dropped."""
    tokens: list[tuple[str, str, int]] = []
    position = 0
    line = 1  # of `position`; counted as the scan moves, never from the start again
    end = len(text)
    while position < end:
        match = _OIDENTD_TOKEN.match(text, position)
        assert match is not None  # the last alternative takes any other character
        start = position
        if match[3] is not None:  # /* ... */
            close = text.find("*/", position + 2)
            if close < 0:
                raise UserFileError(f"line {line}: comment not closed with '*/'")
            position = close + 2
        elif match[4] is not None:  # a quoted string
            close = _string_end(text, position + 1, '"')
            if close < 0:
                raise UserFileError(f"line {line}: unterminated string")
            tokens.append(("string", _unescape(text[position + 1 : close - 1]), line))
            position = close
        else:
            position = match.end()
            if match[5] is not None:
                tokens.append(("brace", match[5], line))
            elif match[6] is not None:
                tokens.append(("word", match[6], line))
        line += text.count("\n", start, position)
    return tokens


def _oidentd_port(text: str, line: int) -> PortRange:
    low, colon, high = text.partition(":")
    if not colon:
        high = low
    try:
        bounds = (int(low) if low else 1, int(high) if high else 65535)
        # ASCII digits only: int() and str.isdigit() take "٥" for 5 (PROTOCOL.md).
        if not (low or high) or not all(b.isascii() and b.isdigit() for b in (low, high) if b):
            raise ValueError
    except ValueError:
        raise UserFileError(
            f"line {line}: port {shown(text)} is not a number or range MIN:MAX "
            "(service names are not read)"
        ) from None
    if not 1 <= bounds[0] <= bounds[1] <= 65535:
        raise UserFileError(f"line {line}: port range {shown(text)} is outside 1 to 65535")
    return bounds


def _oidentd_host(text: str, line: int) -> IPNetwork:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise UserFileError(
            f"line {line}: host {shown(text)} is not an IP address (host names are not read)"
        ) from None
    return ipaddress.ip_network(address)


def parse_oidentd_file(text: str, path: str = "~/.oidentd.conf") -> ChoiceFile:
    """Parse the subset of oidentd.conf(5) user files that IRC software writes.

    Read: `global { ... }` and range blocks `to HOST fport P from HOST lport P
    { ... }` (filters in any order, each optional, ports N, MIN:MAX, MIN: or
    :MAX, hosts as IP addresses), holding one statement: `reply "id" ...`,
    `hide`, `random`, `random_numeric` or `numeric`; comments (#, /* */) and
    quoted strings with C escapes. Anything else makes the file unusable.
    """
    tokens = _oidentd_tokens(text)
    default: Choice | None = None
    choices: list[Choice] = []
    i = 0
    while i < len(tokens):
        kind, word, line = tokens[i]
        filters: dict[str, list[Any]] = {}
        if kind == "word" and word == "global":
            i += 1
        else:
            while i < len(tokens) and tokens[i][0] != "brace":
                kind, word, line = tokens[i]
                if word not in ("to", "fport", "from", "lport") or i + 1 >= len(tokens):
                    raise UserFileError(f"line {line}: unexpected {shown(word)}")
                value = tokens[i + 1][1]
                if word in ("to", "from"):
                    filters.setdefault(word, []).append(_oidentd_host(value, line))
                else:
                    filters.setdefault(word, []).append(_oidentd_port(value, line))
                i += 2
            if not filters:
                raise UserFileError(f"line {line}: a block needs 'global' or a range before '{{'")
        if i >= len(tokens) or tokens[i][1] != "{":
            raise UserFileError(f"line {line}: expected '{{'")
        start_line = tokens[i][2]
        i += 1
        body: list[tuple[str, str, int]] = []
        while i < len(tokens) and tokens[i][1] != "}":
            if tokens[i][1] == "{":
                raise UserFileError(f"line {tokens[i][2]}: unexpected '{{'")
            body.append(tokens[i])
            i += 1
        if i >= len(tokens):
            raise UserFileError(f"line {start_line}: block not closed with '}}'")
        i += 1
        where = f"{path} line {start_line}"
        choice = _oidentd_statement(body, start_line, where)
        if not filters:
            if default is not None:
                raise UserFileError(f"line {start_line}: a second 'global' block")
            default = choice
        else:
            choices.append(
                Choice(
                    choice.action,
                    choice.reply,
                    clients=tuple(filters.get("to", ())),
                    client_ports=tuple(filters.get("fport", ())),
                    local_addresses=tuple(filters.get("from", ())),
                    server_ports=tuple(filters.get("lport", ())),
                    where=where,
                )
            )
        if len(choices) > MAX_USER_RULES:
            raise UserFileError(f"more than {MAX_USER_RULES} blocks")
    return ChoiceFile(path, tuple(choices), default)


def _oidentd_statement(body: list[tuple[str, str, int]], line: int, where: str) -> Choice:
    if not body or body[0][0] != "word":
        raise UserFileError(f"line {line}: an empty block")
    word = body[0][1]
    if word == "reply":
        replies = body[1:]
        if not replies or any(kind == "brace" for kind, _, _ in replies):
            raise UserFileError(f"line {line}: reply needs one or more ids")
        if len(replies) > MAX_USER_REPLIES:
            raise UserFileError(f"line {line}: at most {MAX_USER_REPLIES} replies")
        ids = []
        for _, value, at in replies:
            try:
                ids.append(_user_id(value))
            except ValueError as err:
                raise UserFileError(f"line {at}: {err}") from None
        return Choice("reply", tuple(ids), where=where)
    if word in _STATEMENTS and len(body) == 1:
        return Choice(_STATEMENTS[word], where=where)
    raise UserFileError(
        f"line {body[0][2]}: {shown(word)} is not read here "
        "(only reply, hide, random, random_numeric and numeric, one per block)"
    )
