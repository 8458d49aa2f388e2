"""The procident command: serve, check-config, lookup, query.

Every error an admin can cause is one sentence and a non-zero exit status,
never a traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import pwd
import socket
import sys
import time
from collections.abc import Iterator

import click

from procident import logsetup
from procident.accounts import passwd_name
from procident.advice import irc_warnings
from procident.auditid import ID_PATTERN, describe_period, describe_scope, period_of
from procident.client import NoAnswer, ask
from procident.config import (
    DEFAULT_USER,
    FALLBACK_USER,
    LOG_FORMATS,
    LOG_LEVELS,
    LOG_TARGETS,
    ConfigError,
    LogConfig,
    load_config,
)
from procident.forward import forward_blocking
from procident.homes import (
    HelperError,
    describe_files,
    read_home_files,
    serve_connected,
    user_files_from,
)
from procident.inetd import InetdError, connection_addresses, serve_connection
from procident.logsetup import LogSetupError
from procident.lookup import ConnectionId, Endpoint, normalize_address
from procident.process import (
    SD_LISTEN_FDS_START,
    Notifier,
    PidFileError,
    PrivilegeError,
    check_pid_file,
    close_inherited_descriptors,
    daemonize,
    drop_privileges,
    remove_pid_file,
    write_pid_file,
)
from procident.protocol import ErrorReply, Query, UserIdReply, printable
from procident.responder import explain
from procident.server import Server
from procident.startup import (
    DEFAULT_CONFIG_PATH,
    Opened,
    StartupError,
    audit_ids,
    backend,
    config_file,
    config_loader,
    daemon_account,
    make_responder,
    open_conntrack,
    open_metrics_listener,
    open_privileged,
    open_serving,
    raise_file_limit,
    reloader,
    support_lines,
    token_maker,
    uses_audit_ids,
    uses_tokens,
)
from procident.tokens import TokenError, TokenMaker, add_key, load_keys
from procident.tomlcheck import parse_endpoint

EXIT_NO_ANSWER = 3  # `query`: no valid reply came back

log = logging.getLogger("procident")


def _endpoint(ctx: click.Context, param: click.Parameter, value: str) -> Endpoint:
    try:
        endpoint = parse_endpoint(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    return Endpoint(normalize_address(endpoint.address), endpoint.port)


def _endpoints(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[Endpoint, ...]:
    return tuple(_endpoint(ctx, param, value) for value in values)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.option(
    "-V",
    "--version",
    "show_version",
    is_flag=True,
    help="Show the version and exit; with -v, --verbose, also what this host supports.",
)
@click.option("-v", "--verbose", is_flag=True, help="With --version: backends and features.")
@click.pass_context
def main(ctx: click.Context, show_version: bool, verbose: bool) -> None:
    """procident: an RFC 1413 ident daemon that answers from the kernel's socket tables."""
    if show_version:
        for line in support_lines(verbose):
            click.echo(line)
        ctx.exit()
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(2)


# -- serve ------------------------------------------------------------------


def setup_logging(config: LogConfig) -> None:
    """logsetup.setup_logging, its failure a clear message and exit 1."""
    try:
        logsetup.setup_logging(config)
    except LogSetupError as err:
        raise click.ClickException(str(err)) from None


@contextlib.contextmanager
def _one_sentence() -> Iterator[None]:
    """A StartupError or ConfigError as the command's one-line error and exit 1."""
    try:
        yield
    except (StartupError, ConfigError) as err:
        raise click.ClickException(str(err)) from None


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help=f"Configuration file [default: {DEFAULT_CONFIG_PATH} if it exists, else built-in].",
)
@click.option(
    "-l",
    "--listen",
    multiple=True,
    metavar="ADDR:PORT",
    callback=_endpoints,
    help="Listen here instead of server.listen; repeatable; IPv6 as [::1]:113.",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Override log.level.")
@click.option("--log-target", type=click.Choice(LOG_TARGETS), help="Override log.target.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), help="Override log.format.")
@click.option("--daemon", is_flag=True, help="Detach from the terminal (logs go to syslog).")
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write the daemon's pid here.")
@click.option(
    "--inetd",
    is_flag=True,
    help="Answer the one connection on standard input and output, then exit (logs go to syslog).",
)
def serve(
    config_path: str | None,
    listen: tuple[Endpoint, ...],
    log_level: str | None,
    log_target: str | None,
    log_format: str | None,
    daemon: bool,
    pid_file: str | None,
    inetd: bool,
) -> None:
    """Run the ident daemon in the foreground (or detached with --daemon).

    Started by systemd with listening sockets (LISTEN_FDS), it serves on those
    instead of binding; with $NOTIFY_SOCKET it reports READY, RELOADING and
    STOPPING. With --inetd it answers one connection and exits.
    """
    if inetd and (daemon or pid_file or listen):
        raise click.UsageError("--inetd serves one connection: no --daemon, --pid-file or --listen")
    if (daemon or inetd) and log_target is None:
        # stderr is /dev/null once detached, and the client's connection under inetd
        log_target = "syslog"
    load = config_loader(config_path, listen, log_level, log_target, log_format)
    with _one_sentence():
        config = load()
    if pid_file:
        try:
            check_pid_file(pid_file)  # before anything is bound or written
        except PidFileError as err:
            raise click.ClickException(f"--pid-file {pid_file}: {err}") from None
    # A log sink that cannot be opened must not stop the answers (a container or a
    # tcpserver host without /dev/log): standard error instead, or no log in inetd mode
    # when standard error is the client's connection.
    logsetup.setup_logging_or_fall_back(config.log, 0 if inetd else None)
    source = config_file(config_path) or "built-in defaults"
    log.info("configuration: %s", source)
    raise_file_limit(config)
    with _one_sentence():
        found = backend(config.lookup.backend)
    log.info("lookup backend: %s", found.name)
    client: tuple[Endpoint, Endpoint] | None = None
    listeners: list[socket.socket] = []
    metrics_listener: socket.socket | None = None
    if inetd:
        try:
            client = connection_addresses(0, os.environ)
        except InetdError as err:
            raise click.ClickException(str(err)) from None
    else:
        with _one_sentence():
            listeners = open_serving(config, listen)
            metrics_listener = open_metrics_listener(config)
    notifier = Notifier()  # before dropping root
    ready = daemonize() if daemon else None
    if pid_file:
        try:
            write_pid_file(pid_file)  # before dropping root: /run is root's
        except PidFileError as err:
            raise click.ClickException(f"--pid-file {pid_file}: {err}") from None
        except OSError as err:
            raise click.ClickException(
                f"cannot write pid file {pid_file}: {err.strerror}"
            ) from None
    with _one_sentence():
        opened = open_privileged(config, blocking_files=inetd)
    try:
        fallback = FALLBACK_USER if config.server.user == DEFAULT_USER else ""
        run_as = config.server
        log.info(drop_privileges(run_as.user, run_as.group, run_as.keep_root, fallback))
    except PrivilegeError as err:
        opened.close()
        raise click.ClickException(str(err)) from None
    # The loop never waits on the helper: it asks, and takes the answer when it comes.
    responder = make_responder(config, opened, found, loop=not inetd)
    if client is not None:
        try:
            serve_connection(responder, config, *client)
        finally:
            opened.close()
        return
    server = Server(
        config,
        responder,
        listeners,
        reloader(load, opened, source),
        notifier=notifier,
        metrics_listener=metrics_listener,
    )
    if ready is not None:
        ready()
    try:
        server.run()
    finally:
        if pid_file:
            remove_pid_file(pid_file)
        opened.close()
    log.info("stopped")


# -- check-config -------------------------------------------------------------


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "-u",
    "--user",
    "user",
    metavar="NAME",
    help="Also read this user's files (~/.noident, ~/.procident.toml, ...) and show "
    "what procident makes of them.",
)
def check_config(file: str, user: str | None) -> None:
    """Check a configuration file; exit 0 if it is valid, 1 with the reason if not.

    With --user, exit 1 also when one of the user's files cannot be used.
    """
    try:
        config = load_config(file)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{file}: OK")
    for warning in irc_warnings(config):
        click.echo(f"warning: {warning}", err=True)
    if user is None:
        return
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise click.ClickException(f"no user named {user!r} on this host") from None
    states = read_home_files(account.pw_uid, config.users.max_file_size)
    files = user_files_from(states, config.users)
    click.echo(f"user {user} (uid {account.pw_uid}), home {account.pw_dir}:")
    granted = any(rule.user_may for rule in config.rules)
    for line in describe_files(states, files, granted):
        click.echo(f"  {printable(line)}")
    for problem in files.problems:
        click.echo(f"  problem: {printable(problem)}", err=True)
    if files.problems:
        sys.exit(1)


# -- lookup -----------------------------------------------------------------


@main.command()
@click.argument("local", callback=_endpoint, metavar="LOCAL_ADDR:PORT")
@click.argument("remote", callback=_endpoint, metavar="REMOTE_ADDR:PORT")
@click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), help="As for serve."
)
def lookup(local: Endpoint, remote: Endpoint, config_path: str | None) -> None:
    """Explain the answer to a query about one connection.

    LOCAL is this host's end (the address the query would arrive on and the
    server port); REMOTE is the querier's end (its address and the client port).
    """
    if local.address.version != remote.address.version:
        raise click.BadParameter("LOCAL and REMOTE must both be IPv4 or both IPv6")
    if not (local.port and remote.port):
        raise click.BadParameter("ports must be from 1 to 65535")
    with _one_sentence():
        config = config_loader(config_path, (), None, "stderr")()
        setup_logging(LogConfig(level="warning"))
        opened = Opened(
            tokens=token_maker(config) if uses_tokens(config) else None,
            audit_ids=audit_ids(config) if uses_audit_ids(config) else None,
            conntrack=open_conntrack() if config.nat.enabled else None,
            read_files=read_home_files,
        )
        responder = make_responder(config, opened, backend(config.lookup.backend), loop=False)
    query = Query(local.port, remote.port)
    answer = responder.respond(query, ConnectionId(local, remote), time.monotonic(), True)
    if answer.forward is not None:
        answer = forward_blocking(responder, query, answer, config.forward.timeout)
    for line in explain(local, remote, answer):
        click.echo(line)


# -- tokens -------------------------------------------------------------------


def _key_file(key_file: str | None, config_path: str | None) -> tuple[str, int]:
    """The key file (KEY_FILE, else tokens.key_file) and the daemon's account."""
    with _one_sentence():
        config = config_loader(config_path)()
    return key_file or config.tokens.key_file, daemon_account(config)


@main.command("token-key")
@click.argument("key_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), help="As for serve."
)
def token_key(key_file: str | None, config_path: str | None) -> None:
    """Add a new key to the token key file (tokens.key_file unless KEY_FILE is given),
    creating it with mode 0600 (owned by server.user where its directory is, as
    procident.service makes it, else by root). New tokens use the newest key once
    procident restarts;
    older keys stay in the file, so older tokens can still be decoded."""
    path, account = _key_file(key_file, config_path)
    try:
        key_id = add_key(path, account)
    except TokenError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(f"{path}: cannot write: {err.strerror}") from None
    click.echo(f"{path}: added key {key_id}; restart procident to make tokens with it")


@main.command("decode-token")
@click.argument("token")
@click.option("-k", "--key-file", type=click.Path(dir_okay=False), help="tokens.key_file.")
@click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), help="As for serve."
)
@click.option(
    "-q", "--querier", metavar="ADDRESS", help="An audit id's querier: the IRC server's address."
)
@click.option("-d", "--date", metavar="YYYY-MM-DD", help="The day the audit id was seen (UTC).")
def decode_token(
    token: str,
    key_file: str | None,
    config_path: str | None,
    querier: str | None,
    date: str | None,
) -> None:
    """Say whose connection an audit token stands for (uid, time and connection), or
    whose account an audit id of action "audit-id" is (give the querier and the date
    where [tokens] audit_scope and audit_period make the id depend on them).

    Exit 1 when the token was not made with a key in the key file, or was altered; for
    an audit id, when no account matches, or more than one does.
    """
    if ID_PATTERN.fullmatch(token):
        _decode_audit_id(token, key_file, config_path, querier, date)
        return
    path, account = _key_file(key_file, config_path)
    try:
        facts = TokenMaker(load_keys(path, account)).read(token)
    except TokenError as err:
        raise click.ClickException(str(err)) from None
    when = datetime.datetime.fromtimestamp(facts.time, datetime.timezone.utc)
    name = passwd_name(facts.uid)
    click.echo(f"uid:        {facts.uid}" + (f" ({name})" if name else " (no passwd entry)"))
    click.echo(f"time:       {when.isoformat()}")
    click.echo(f"connection: {facts.conn.local} (this host) <-> {facts.conn.remote} (querier)")
    click.echo(f"key:        {facts.key_id}")


def _decode_audit_id(
    audit_id: str,
    key_file: str | None,
    config_path: str | None,
    querier_text: str | None,
    date: str | None,
) -> None:
    with _one_sentence():
        config = config_loader(config_path)()
        ids = audit_ids(config, key_file)
    scheme = ids.scheme
    querier = None
    if scheme.scope == "network":
        if querier_text is None:
            raise click.ClickException(
                "an audit id depends on the querier's network ([tokens] audit_scope = "
                '"network"): give --querier ADDRESS, the address of the server that asked'
            )
        try:
            querier = ipaddress.ip_address(querier_text.strip("[]"))
        except ValueError:
            raise click.ClickException(
                f"--querier: not an IP address: {printable(querier_text, 80)}"
            ) from None
    if date is None and scheme.period != "forever":
        raise click.ClickException(
            f"an audit id depends on the {scheme.period} it was made in ([tokens] audit_period "
            f'= "{scheme.period}"): give --date YYYY-MM-DD, the day it was seen (UTC)'
        )
    day = _day(date) if date else datetime.date(1970, 1, 1)
    first, last = config.tokens.audit_uids
    uids = set(range(first, last + 1)) | {entry.pw_uid for entry in pwd.getpwall()}
    matches = ids.find([audit_id], uids, day, querier)[audit_id]
    if not matches:
        raise click.ClickException(
            f"no account matches {audit_id}: no uid of the accounts or of [tokens] "
            f"audit_uids ({first} to {last}) has it, with any key of the key file, for "
            + describe_scope(querier, scheme)
            + f", in {describe_period(scheme.period, period_of(scheme.period, day))} or "
            "the periods either side"
        )
    if len(matches) > 1:
        click.echo(
            f"{len(matches)} matches for {audit_id} (account and period); the id cannot say which:"
        )
    for match in matches:
        name = passwd_name(match.uid)
        click.echo(f"uid:        {match.uid}" + (f" ({name})" if name else " (no passwd entry)"))
        click.echo(f"period:     {describe_period(scheme.period, match.period)}")
        click.echo(f"querier:    {describe_scope(querier, scheme)}")
        click.echo(f"key:        {match.key_id}")
    if len(matches) > 1:
        sys.exit(1)


def _day(text: str) -> datetime.date:
    """A day (UTC) from YYYY-MM-DD or an ISO date and time (with its time zone)."""
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise click.ClickException(f"--date: not YYYY-MM-DD: {printable(text, 80)}") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc)
    return moment.date()


# -- helper -------------------------------------------------------------------


@main.command()
def helper() -> None:
    """Read users' files for a daemon started unprivileged: run as root by
    procident-helper@.service, with the daemon's connection (procident-helper.socket)
    as standard input, until the daemon hangs up. Only root and the socket file's owner
    may ask."""
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        raise click.ClickException("standard input is not a socket") from None
    try:
        serve_connected(sock)
    except HelperError as err:
        raise click.ClickException(str(err)) from None


# -- query --------------------------------------------------------------------


@main.command()
@click.argument("host")
@click.argument("server_port", type=click.IntRange(1, 65535))
@click.argument("client_port", type=click.IntRange(1, 65535))
@click.option("-p", "--port", default=113, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "-t", "--timeout", default=30.0, show_default=True, type=click.FloatRange(0, min_open=True)
)
def query(host: str, server_port: int, client_port: int, port: int, timeout: float) -> None:
    """Ask the ident server on HOST who owns a connection (an RFC 1413 client).

    SERVER_PORT is the port on HOST's side of the connection, CLIENT_PORT the
    port on this side. Exit status: 0 for a USERID reply, 1 for an ERROR reply,
    3 when no valid reply came.
    """
    try:
        parsed = ask(host, port, server_port, client_port, timeout)
    except NoAnswer as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(EXIT_NO_ANSWER)
    reply = parsed.reply
    if isinstance(reply, UserIdReply):
        # What a remote server sent: escaped, so it cannot drive the terminal.
        click.echo("type:    USERID")
        click.echo(f"os:      {printable(reply.os)}")
        if reply.charset:
            click.echo(f"charset: {printable(reply.charset)}")
        click.echo(f"user id: {printable(reply.user_id)}")
        return
    click.echo("type:    ERROR")
    error = reply.error.value if isinstance(reply, ErrorReply) else reply
    click.echo(f"error:   {printable(error)}")
    sys.exit(1)


def run() -> None:
    """The `procident` program (console script and python -m procident): first close
    every descriptor the starting process left open (but the listening sockets systemd
    passes, LISTEN_FDS), so none stays with the daemon or reaches its helper; then the
    commands. Tests that call `main` in their own process skip the closing."""
    keep: frozenset[int] = frozenset()
    count = os.environ.get("LISTEN_FDS", "")
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and count.isdigit():
        keep = frozenset(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    close_inherited_descriptors(keep)
    main()


if __name__ == "__main__":  # pragma: no cover
    run()
