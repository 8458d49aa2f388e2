"""Build the daemon from a Config, and the one list of what a reload cannot change.

Everything opened here is opened at start, as root, before the privilege drop:
listeners, the connection-tracking table, the token key, the user-file helper. A
reload runs as the service user, so what needs those is in RELOAD_RULES: each entry
says what the admin changed and whether the running value stays until a restart
("kept"), the reload is refused ("refused"), or the change applies but needs
something opened at start to work ("noted"). Nothing here prints: a failure is a
StartupError of one sentence, for the command line to show.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import pwd
import resource
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

from procident import __version__
from procident.accounts import Accounts, FileReader
from procident.admission import MAX_OVERFLOW
from procident.auditid import AuditIds, Scheme
from procident.config import Config, ConfigError, load_config, with_listen, with_log
from procident.homes import HelperError, HomeHelper, read_home_files
from procident.listeners import ListenError, open_listeners
from procident.lookup import Backend, ConnectionId, Endpoint, LookupFailed, select_backend
from procident.lookup.conntrack import PATH, ConntrackTable
from procident.process import activated_sockets
from procident.responder import Responder
from procident.tokens import TokenError, TokenMaker, load_keys
from procident.tokens import available as tokens_available
from procident.tomlcheck import parse_endpoint

DEFAULT_CONFIG_PATH = "/etc/procident.toml"

log = logging.getLogger("procident")


class StartupError(Exception):
    """What keeps the daemon (or a command) from starting, in one sentence."""


# -- reading the configuration ---------------------------------------------------


def config_file(path: str | None) -> str | None:
    """The file to read: the one given, else /etc/procident.toml if it exists, else none."""
    if path:
        return path
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def config_loader(
    path: str | None,
    listen: tuple[Endpoint, ...] = (),
    level: str | None = None,
    target: str | None = None,
    format: str | None = None,
) -> Callable[[], Config]:
    """A function that reads the configuration as `serve` sees it: the file (or the embedded
    default), then the command line's overrides. Called at start and on every SIGHUP."""

    def load() -> Config:
        chosen = config_file(path)
        config = load_config(chosen) if chosen else Config()
        if listen:
            config = with_listen(config, listen)
        return with_log(config, level, target, format)

    return load


def reads_user_files(config: Config) -> bool:
    """Whether answers may depend on files in users' home directories."""
    users = config.users
    return users.noident or users.opt_in or any(rule.user_may for rule in config.rules)


def uses_tokens(config: Config) -> bool:
    """Whether a rule answers with audit tokens."""
    return any(rule.action == "token" for rule in config.rules)


def uses_audit_ids(config: Config) -> bool:
    """Whether a rule answers with audit ids."""
    return any(rule.action == "audit-id" for rule in config.rules)


# -- what is opened at start ---------------------------------------------------


def backend(name: str) -> Backend:
    try:
        return select_backend(name)
    except LookupFailed as err:
        raise StartupError(str(err)) from None


def open_conntrack() -> ConntrackTable:
    """The connection-tracking table, opened for [nat] enabled = true."""
    try:
        return ConntrackTable()
    except OSError as err:
        hint = ""
        if err.errno == errno.ENOENT:
            hint = " (is the nf_conntrack module loaded? It is once a NAT rule exists)"
        elif err.errno == errno.EACCES:
            hint = " (it is readable by root only)"
        raise StartupError(f"nat.enabled: cannot open {PATH}: {err.strerror}{hint}") from None


def daemon_account(config: Config) -> int:
    """The uid of server.user, the daemon's account (-1 where there is none): it may own
    the token key (procident.service starts the daemon as it)."""
    try:
        return pwd.getpwnam(config.server.user).pw_uid
    except KeyError:
        return -1


def _keys(config: Config, key_file: str | None) -> dict[int, bytes]:
    path = key_file or config.tokens.key_file
    try:
        return load_keys(path, daemon_account(config))
    except TokenError as err:
        hint = "" if os.path.exists(path) else f"; create it with: procident token-key {path}"
        raise StartupError(f"tokens.key_file: {err}{hint}") from None


def token_maker(config: Config, key_file: str | None = None) -> TokenMaker:
    keys = _keys(config, key_file)
    try:
        return TokenMaker(keys)
    except TokenError as err:
        raise StartupError(f"tokens.key_file: {err}") from None


def audit_scheme(config: Config) -> Scheme:
    tokens = config.tokens
    return Scheme(
        tokens.audit_period, tokens.audit_scope, tokens.audit_ipv4_prefix, tokens.audit_ipv6_prefix
    )


def audit_ids(config: Config, key_file: str | None = None) -> AuditIds:
    """What makes and decodes audit ids: the keys of the key file, and [tokens] audit_*
    (no cryptography package needed: HMAC-SHA256 from the standard library)."""
    return AuditIds(_keys(config, key_file), audit_scheme(config))


def open_serving(config: Config, listen: tuple[Endpoint, ...] = ()) -> list[socket.socket]:
    """The listening sockets: those the service manager passed (LISTEN_FDS), else new
    ones on server.listen."""
    try:
        listeners = activated_sockets()
    except ValueError as err:
        raise StartupError(f"LISTEN_FDS: {err}") from None
    if listeners and listen:
        log.warning("--listen is ignored: the service manager passed listening sockets")
    if listeners:
        return listeners
    try:
        return open_listeners(config.server.listen)
    except ListenError as err:
        raise StartupError(str(err)) from None


# Descriptors the daemon needs besides its client connections: listeners, forwards,
# metrics clients, the helper, the log, the selector, and some to spare.
SPARE_DESCRIPTORS = 128


def raise_file_limit(config: Config) -> None:
    """Raise the soft limit on open files (RLIMIT_NOFILE; systemd's default is 1024) to
    what max_connections needs, as far as the hard limit allows; say so when it does not
    allow enough (past it, accepting pauses for a second at a time)."""
    need = config.limits.max_connections + MAX_OVERFLOW + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (OSError, ValueError) as err:
            log.warning("cannot raise the open file limit to %d: %s", soft, err)
            return
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open file limit %d is below what limits.max_connections = %d needs (%d): "
            "raise LimitNOFILE or lower max_connections",
            soft,
            config.limits.max_connections,
            need,
        )


def open_metrics_listener(config: Config) -> socket.socket | None:
    if not config.metrics.listen:
        return None
    try:
        (listener,) = open_listeners((parse_endpoint(config.metrics.listen),))
    except (ListenError, ValueError) as err:
        raise StartupError(f"metrics.listen: {err}") from None
    log.info("metrics on http://%s/metrics", config.metrics.listen)
    return listener


@dataclass
class Opened:
    """What the daemon opened at start, as root, for the configuration it started with."""

    tokens: TokenMaker | None = None
    audit_ids: AuditIds | None = None
    conntrack: ConntrackTable | None = None
    helper: HomeHelper | None = None
    read_files: FileReader | None = None  # how a query reads a user's files, if it may

    @property
    def reads_user_files(self) -> bool:
        return self.read_files is not None or self.helper is not None

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()


def open_privileged(config: Config, blocking_files: bool = False) -> Opened:
    """Open, as root, what `config` needs and only root can open: the token key, the
    connection-tracking table, and the helper that reads users' files (a process of its
    own that keeps root; started unprivileged, the helper systemd runs at
    users.helper_socket, or else the files are read directly). With
    `blocking_files` (inetd: one connection), a query waits for the helper's answer."""
    opened = Opened()
    opened.tokens = token_maker(config) if uses_tokens(config) else None
    opened.audit_ids = audit_ids(config) if uses_audit_ids(config) else None
    opened.conntrack = open_conntrack() if config.nat.enabled else None
    if not reads_user_files(config):
        return opened
    if os.geteuid() == 0 and not config.server.keep_root:
        opened.helper = HomeHelper()  # keeps root to read home directories; see homes.py
        log.info("user files are read by helper process %d", opened.helper.pid)
    elif os.geteuid() != 0:
        opened.helper = _systemds_helper(config.users.helper_socket)
    if opened.helper is None:  # root with keep_root, or no helper to ask
        opened.read_files = read_home_files
    elif blocking_files:
        opened.read_files = opened.helper.read
    return opened


def _systemds_helper(reach: str) -> HomeHelper | None:
    """Started unprivileged by systemd: the helper of procident-helper.socket at `reach`,
    or None (said in the log). Never a reason not to answer: the files are then read as
    this account, and those it cannot read are answered as such (an owner who may have
    asked to be hidden is hidden)."""
    why = f"no helper at users.helper_socket {reach!r}"
    if reach and os.path.lexists(reach):
        try:
            helper = HomeHelper(connect=reach)
        except HelperError as err:
            why = f"users.helper_socket: {err}"  # stopped, or not this account's
        else:
            log.info("user files are read by the helper at %s", reach)
            return helper
    log.warning(
        "%s; user files are read as uid %d, which cannot read them in home directories "
        "it may not enter",
        why,
        os.geteuid(),
    )
    return None


def make_responder(config: Config, opened: Opened, found: Backend, loop: bool = True) -> Responder:
    """The responder for `config`. With `loop` (the selectors daemon) the user-file helper
    is asked without waiting; its answer comes to the loop."""
    helper = opened.helper if loop else None
    accounts = Accounts(config, opened.read_files, helper=helper)
    return Responder(
        found,
        config,
        accounts=accounts,
        tokens=opened.tokens,
        audit_ids=opened.audit_ids,
        conntrack=opened.conntrack,
    )


# -- reloads ---------------------------------------------------------------------

KEPT, REFUSED, NOTED = "kept", "refused", "noted"
_LOG_SINKS = ("target", "format", "syslog_socket", "syslog_facility")


@dataclass(frozen=True)
class ReloadRule:
    """One thing a reload cannot simply change."""

    what: str  # the settings, as the admin writes them
    changed: Callable[[Config, Config, Opened], bool]  # (running, new, opened)
    effect: str  # KEPT, REFUSED or NOTED
    why: str  # the log line's reason
    keep: Callable[[Config, Config], Config] | None = None  # KEPT: new, with running's value


def _section(name: str) -> ReloadRule:
    return ReloadRule(
        f"[{name}]",
        lambda old, new, opened: getattr(old, name) != getattr(new, name),
        KEPT,
        "settings take effect at the next start",
        lambda old, new: replace(new, **{name: getattr(old, name)}),
    )


RELOAD_RULES: tuple[ReloadRule, ...] = (
    # listeners are bound and root dropped at start
    _section("server"),
    _section("lookup"),  # the backend is chosen at start
    _section("tokens"),  # the key file is readable by root only
    _section("metrics"),  # the scrape listener is bound at start
    ReloadRule(
        "log.target, log.format and the syslog settings",
        lambda old, new, opened: any(
            getattr(old.log, key) != getattr(new.log, key) for key in _LOG_SINKS
        ),
        KEPT,
        "take effect at the next start",
        lambda old, new: replace(
            new, log=replace(new.log, **{key: getattr(old.log, key) for key in _LOG_SINKS})
        ),
    ),
    ReloadRule(
        "users.helper_socket",
        lambda old, new, opened: old.users.helper_socket != new.users.helper_socket,
        KEPT,
        "takes effect at the next start (the helper is reached at start)",
        lambda old, new: replace(
            new, users=replace(new.users, helper_socket=old.users.helper_socket)
        ),
    ),
    ReloadRule(
        "nat.enabled",
        lambda old, new, opened: new.nat.enabled and opened.conntrack is None,
        REFUSED,
        "the connection-tracking table is opened at start, as root; restart to turn NAT on",
    ),
    ReloadRule(
        "users' files",
        lambda old, new, opened: reads_user_files(new) and not opened.reads_user_files,
        NOTED,
        "user files are read only if the configuration at start reads them",
    ),
    ReloadRule(
        'action = "token"',
        lambda old, new, opened: uses_tokens(new) and opened.tokens is None,
        NOTED,
        "the token key is read only if the configuration at start uses tokens; "
        "until a restart, token rules answer UNKNOWN-ERROR",
    ),
    ReloadRule(
        'action = "audit-id"',
        lambda old, new, opened: uses_audit_ids(new) and opened.audit_ids is None,
        NOTED,
        "the token key is read only if the configuration at start uses audit ids; "
        "until a restart, audit-id rules answer UNKNOWN-ERROR",
    ),
)


def reconcile(running: Config, new: Config, opened: Opened, source: str) -> Config:
    """What a reload to `new` serves with, given the `running` configuration and what was
    opened at start: RELOAD_RULES applied in order. A KEPT setting keeps its running value
    (so the next reload says so again); a REFUSED change raises ConfigError naming the key."""
    for rule in RELOAD_RULES:
        if not rule.changed(running, new, opened):
            continue
        if rule.effect == REFUSED:
            raise ConfigError(f"{source}: {rule.what}: {rule.why}")
        if rule.effect == KEPT:
            assert rule.keep is not None
            new = rule.keep(running, new)
            log.warning("%s %s", rule.what, rule.why)
        else:
            log.warning("%s", rule.why)
    return new


def reloader(load: Callable[[], Config], opened: Opened, source: str) -> Callable[[Config], Config]:
    """The daemon's SIGHUP: read the configuration again and reconcile it with what runs.
    The log level applies at once."""

    def reload(running: Config) -> Config:
        new = reconcile(running, load(), opened, source)
        log.setLevel(new.log.level.upper())
        if new.limits.max_connections > running.limits.max_connections:
            raise_file_limit(new)  # up to the hard limit: no privilege needed
        return new

    return reload


# -- what this host supports ---------------------------------------------------


def support_lines(verbose: bool) -> list[str]:
    """`procident --version`, and with verbose, the backends and optional features that
    work on this host."""
    lines = [f"procident, version {__version__}"]
    if not verbose:
        return lines
    lines.append(f"python:          {sys.version.split()[0]} ({sys.executable})")
    for name in ("netlink", "procfs"):
        try:
            nowhere = Endpoint(ipaddress.IPv4Address("127.0.0.1"), 0)
            select_backend(name).find(ConnectionId(nowhere, nowhere))
            state = "works here"
        except LookupFailed as err:
            state = f"does not work here ({err})"
        lines.append(f"lookup {name + ':':<9} {state}")
    with contextlib.suppress(LookupFailed):
        lines.append(f"lookup auto:     {select_backend('auto').name}")
    if tokens_available():
        import cryptography

        lines.append(f"audit tokens:    available (cryptography {cryptography.__version__})")
    else:
        lines.append("audit tokens:    not available: pip install 'procident[tokens]'")
    lines.append("systemd:         socket activation (LISTEN_FDS) and sd_notify, built in")
    lines.append("inetd mode:      serve --inetd")
    path = config_file(None)
    lines.append(f"configuration:   {path or f'{DEFAULT_CONFIG_PATH} absent: built-in defaults'}")
    return lines
