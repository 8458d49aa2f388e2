"""The procident command: serve, check-config, lookup, query.

Every error an admin can cause is one sentence and a non-zero exit status,
never a traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import ipaddress
import logging
import logging.handlers
import os
import pwd
import socket
import sys
import time
from collections.abc import Callable

import click

from procident import __version__, logsetup
from procident.accounts import Accounts, FileReader, passwd_name
from procident.config import (
    DEFAULT_USER,
    FALLBACK_USER,
    LOG_FORMATS,
    LOG_LEVELS,
    LOG_TARGETS,
    Config,
    ConfigError,
    LogConfig,
    load_config,
    with_listen,
    with_log,
)
from procident.forward import forward_blocking
from procident.homes import (
    ABSENT,
    CONTENT,
    PRESENT,
    USER_FILES,
    FileState,
    HomeHelper,
    read_home_files,
    user_files_from,
)
from procident.inetd import InetdError, connection_addresses, serve_connection
from procident.logsetup import LogSetupError
from procident.lookup import (
    Backend,
    ConnectionId,
    Endpoint,
    LookupFailed,
    normalize_address,
    select_backend,
)
from procident.lookup.conntrack import PATH, ConntrackTable
from procident.process import (
    SD_LISTEN_FDS_START,
    Notifier,
    PidFileError,
    PrivilegeError,
    activated_sockets,
    check_pid_file,
    close_inherited_descriptors,
    daemonize,
    drop_privileges,
    remove_pid_file,
    write_pid_file,
)
from procident.protocol import ErrorReply, Query, UserIdReply, parse_reply, printable
from procident.responder import Responder, describe_owner
from procident.server import ListenError, Server, open_listeners
from procident.tokens import TokenError, TokenMaker, add_key, load_keys
from procident.tokens import available as tokens_available
from procident.tomlcheck import parse_endpoint
from procident.userfiles import Choice

DEFAULT_CONFIG_PATH = "/etc/procident.toml"
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
        for line in version_lines(verbose):
            click.echo(line)
        ctx.exit()
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(2)


def version_lines(verbose: bool) -> list[str]:
    """`procident --version`, and with verbose, the backends and optional features that
    work on this host."""
    lines = [f"procident, version {__version__}"]
    if not verbose:
        return lines
    lines.append(f"python:          {sys.version.split()[0]} ({sys.executable})")
    for name in ("netlink", "procfs"):
        try:
            backend = select_backend(name)
            nowhere = Endpoint(ipaddress.IPv4Address("127.0.0.1"), 0)
            backend.find(ConnectionId(nowhere, nowhere))
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


# -- serve ------------------------------------------------------------------


def config_file(path: str | None) -> str | None:
    """The file to read: the one given, else /etc/procident.toml if it exists, else none."""
    if path:
        return path
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def config_loader(
    path: str | None,
    listen: tuple[Endpoint, ...],
    level: str | None,
    target: str | None,
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


def setup_logging(config: LogConfig) -> None:
    """logsetup.setup_logging, its failure a clear message and exit 1."""
    try:
        logsetup.setup_logging(config)
    except LogSetupError as err:
        raise click.ClickException(str(err)) from None


def _backend(name: str) -> Backend:
    try:
        return select_backend(name)
    except LookupFailed as err:
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
    try:
        config = load()
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    if pid_file:
        try:
            check_pid_file(pid_file)  # before anything is bound or written
        except PidFileError as err:
            raise click.ClickException(f"--pid-file {pid_file}: {err}") from None
    setup_logging(config.log)
    log.info("configuration: %s", config_file(config_path) or "built-in defaults")
    backend = _backend(config.lookup.backend)
    log.info("lookup backend: %s", backend.name)
    listeners: list[socket.socket] = []
    client: tuple[Endpoint, Endpoint] | None = None
    if inetd:
        try:
            client = connection_addresses(0, os.environ)
        except InetdError as err:
            raise click.ClickException(str(err)) from None
    else:
        try:
            listeners = activated_sockets()
        except ValueError as err:
            raise click.ClickException(f"LISTEN_FDS: {err}") from None
        if listeners and listen:
            log.warning("--listen is ignored: the service manager passed listening sockets")
        if not listeners:
            try:
                listeners = open_listeners(config.server.listen)
            except ListenError as err:
                raise click.ClickException(str(err)) from None
    metrics_listener: socket.socket | None = None
    if config.metrics.listen and not inetd:
        try:
            (metrics_listener,) = open_listeners((parse_endpoint(config.metrics.listen),))
        except (ListenError, ValueError) as err:
            raise click.ClickException(f"metrics.listen: {err}") from None
        log.info("metrics on http://%s/metrics", config.metrics.listen)
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
    tokens = _token_maker(config) if uses_tokens(config) else None
    conntrack = _conntrack(config) if config.nat.enabled else None  # root-only file
    helper: HomeHelper | None = None
    read_files: FileReader | None = None
    if reads_user_files(config):
        if os.geteuid() == 0 and not config.server.keep_root:
            helper = HomeHelper()  # keeps root to read home directories; see homes.py
            if inetd:
                read_files = helper.read  # one connection: it may wait for the helper
            log.info("user files are read by helper process %d", helper.pid)
        else:
            read_files = read_home_files
    try:
        fallback = FALLBACK_USER if config.server.user == DEFAULT_USER else ""
        run_as = config.server
        log.info(drop_privileges(run_as.user, run_as.group, run_as.keep_root, fallback))
    except PrivilegeError as err:
        if helper is not None:
            helper.close()
        raise click.ClickException(str(err)) from None

    def reload() -> Config:
        new = load()
        log.setLevel(new.log.level.upper())
        if (new.log.target, new.log.format, new.log.syslog_socket, new.log.syslog_facility) != (
            config.log.target,
            config.log.format,
            config.log.syslog_socket,
            config.log.syslog_facility,
        ):
            log.warning(
                "log.target, log.format and the syslog settings take effect at the next start"
            )
        if reads_user_files(new) and read_files is None and helper is None:
            log.warning("user files are read only if the configuration at start reads them")
        if new.nat.enabled and conntrack is None:
            raise ConfigError(
                f"{config_file(config_path) or 'built-in defaults'}: nat.enabled: the "
                "connection-tracking table is opened at start, as root; restart to turn NAT on"
            )
        if uses_tokens(new) and tokens is None:
            log.warning(
                "the token key is read only if the configuration at start uses tokens; "
                "until a restart, token rules answer UNKNOWN-ERROR"
            )
        return new

    # The loop never waits on the helper: it asks, and takes the answer when it comes.
    accounts = Accounts(config, read_files, helper=None if inetd else helper)
    responder = Responder(backend, config, accounts=accounts, tokens=tokens, conntrack=conntrack)
    if client is not None:
        try:
            serve_connection(responder, config, *client)
        finally:
            if helper is not None:
                helper.close()
        return
    server = Server(
        config, responder, listeners, reload, notifier=notifier, metrics_listener=metrics_listener
    )
    if ready is not None:
        ready()
    try:
        server.run()
    finally:
        if pid_file:
            remove_pid_file(pid_file)
        if helper is not None:
            helper.close()
    log.info("stopped")


def _conntrack(config: Config) -> ConntrackTable:
    """The connection-tracking table, opened for [nat] enabled = true."""
    try:
        return ConntrackTable()
    except OSError as err:
        hint = ""
        if err.errno == errno.ENOENT:
            hint = " (is the nf_conntrack module loaded? It is once a NAT rule exists)"
        elif err.errno == errno.EACCES:
            hint = " (it is readable by root only)"
        raise click.ClickException(
            f"nat.enabled: cannot open {PATH}: {err.strerror}{hint}"
        ) from None


def reads_user_files(config: Config) -> bool:
    """Whether answers may depend on files in users' home directories."""
    users = config.users
    return users.noident or users.opt_in or any(rule.user_may for rule in config.rules)


def uses_tokens(config: Config) -> bool:
    """Whether a rule answers with audit tokens."""
    return any(rule.action == "token" for rule in config.rules)


def _token_maker(config: Config, key_file: str | None = None) -> TokenMaker:
    path = key_file or config.tokens.key_file
    try:
        return TokenMaker(load_keys(path))
    except TokenError as err:
        hint = "" if os.path.exists(path) else f"; create it with: procident token-key {path}"
        raise click.ClickException(f"tokens.key_file: {err}{hint}") from None


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
    if user is None:
        return
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise click.ClickException(f"no user named {user!r} on this host") from None
    states = read_home_files(account.pw_uid, config.users.max_file_size)
    files = user_files_from(states, config.users)
    click.echo(f"user {user} (uid {account.pw_uid}), home {account.pw_dir}:")
    for name in USER_FILES:
        state = _describe_state(states.get(name, FileState(ABSENT)))
        click.echo(f"  ~/{name}: {printable(state)}")
    if files.choices is not None:
        click.echo(f"  choices read from {files.choices.path}:")
        for choice in (*files.choices.choices, files.choices.default):
            if choice is not None:
                click.echo(f"    {choice.where}: {printable(_describe_choice(choice))}")
    granted = [rule.name for rule in config.rules if rule.user_may]
    if files.choices is not None and not granted:
        click.echo("  note: no rule has user_may, so these choices are not used")
    for problem in files.problems:
        click.echo(f"  problem: {printable(problem)}", err=True)
    if files.problems:
        sys.exit(1)


def _describe_state(state: FileState) -> str:
    if state.status == ABSENT:
        return "absent"
    if state.status == PRESENT:
        return "present"
    if state.status == CONTENT:
        return f"{len(state.data)} bytes"
    return f"not used: {state.reason}"


def _describe_choice(choice: Choice) -> str:
    what = choice.action
    if choice.reply:
        what += " " + ", ".join(map(repr, choice.reply))
    if choice.forward:
        what += f" to {choice.forward}"
    where = []
    for label, networks in (("to", choice.clients), ("from", choice.local_addresses)):
        if networks:
            where.append(f"{label} {','.join(map(str, networks))}")
    for label, ranges in (("fport", choice.client_ports), ("lport", choice.server_ports)):
        if ranges:
            where.append(f"{label} {','.join(f'{a}-{b}' if a != b else str(a) for a, b in ranges)}")
    return f"{what} for {' '.join(where)}" if where else f"{what} (any connection)"


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
    try:
        config = config_loader(config_path, (), None, "stderr")()
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    setup_logging(LogConfig(level="warning"))
    tokens = _token_maker(config) if uses_tokens(config) else None
    accounts = Accounts(config, read_home_files)
    conntrack = _conntrack(config) if config.nat.enabled else None
    responder = Responder(
        _backend(config.lookup.backend),
        config,
        accounts=accounts,
        tokens=tokens,
        conntrack=conntrack,
    )
    query = Query(local.port, remote.port)
    answer = responder.respond(query, ConnectionId(local, remote), time.monotonic(), True)
    if answer.forward is not None:
        answer = forward_blocking(responder, query, answer, config.forward.timeout)
    found = answer.found
    click.echo(f"connection: {local} (this host) <-> {remote} (querier)")
    if found is None:
        click.echo("kernel:     no socket with these four values")
    else:
        entry = found.entry
        click.echo(
            f"kernel:     {entry.source}: {entry.state.name}, uid {entry.uid}, inode {entry.inode}"
        )
        if found.inbound:
            click.echo(f"inbound:    port {local.port} has a listening socket on this host")
    if found is not None and answer.owner is None:
        click.echo("owner:      none: no process holds this socket")
    elif answer.owner is not None:
        click.echo(f"owner:      {describe_owner(answer)}")
    for step in answer.trace:
        click.echo(f"policy:     {printable(step)}")
    click.echo(f"rule:       {printable(answer.rule)}")
    line = (answer.line or b"").rstrip(b"\r\n")
    click.echo(f"reply:      {printable(line.decode('utf-8', 'surrogateescape'))}")


# -- tokens -------------------------------------------------------------------


def _key_file(key_file: str | None, config_path: str | None) -> str:
    if key_file:
        return key_file
    try:
        return config_loader(config_path, (), None, None)().tokens.key_file
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


@main.command("token-key")
@click.argument("key_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), help="As for serve."
)
def token_key(key_file: str | None, config_path: str | None) -> None:
    """Add a new key to the token key file (tokens.key_file unless KEY_FILE is given),
    creating it with mode 0600. New tokens use the newest key once procident restarts;
    older keys stay in the file, so older tokens can still be decoded."""
    path = _key_file(key_file, config_path)
    try:
        key_id = add_key(path)
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
def decode_token(token: str, key_file: str | None, config_path: str | None) -> None:
    """Say whose connection an audit token stands for: uid, time and connection.

    Exit 1 when the token was not made with a key in the key file, or was altered.
    """
    path = _key_file(key_file, config_path)
    try:
        facts = TokenMaker(load_keys(path)).read(token)
    except TokenError as err:
        raise click.ClickException(str(err)) from None
    when = datetime.datetime.fromtimestamp(facts.time, datetime.timezone.utc)
    name = passwd_name(facts.uid)
    click.echo(f"uid:        {facts.uid}" + (f" ({name})" if name else " (no passwd entry)"))
    click.echo(f"time:       {when.isoformat()}")
    click.echo(f"connection: {facts.conn.local} (this host) <-> {facts.conn.remote} (querier)")
    click.echo(f"key:        {facts.key_id}")


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
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"%d,%d\r\n" % (server_port, client_port))
            line = _read_line(sock)
    except (OSError, UnicodeError) as err:
        click.echo(f"Error: no answer from {host} port {port}: {err}", err=True)
        sys.exit(EXIT_NO_ANSWER)
    try:
        parsed = parse_reply(line)
    except ValueError as err:
        click.echo(f"Error: {host} sent a malformed reply: {err}", err=True)
        sys.exit(EXIT_NO_ANSWER)
    if (parsed.server_port, parsed.client_port) != (server_port, client_port):
        click.echo(
            f"Error: {host} answered about {parsed.server_port},{parsed.client_port}, "
            f"not {server_port},{client_port}",
            err=True,
        )
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


def _read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    """Read one reply line (end of line removed); the whole of it must fit in `limit`."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(limit)
        if not chunk:
            raise OSError("connection closed before a complete reply")
        data += chunk
        if len(data) > limit:
            raise OSError(f"no end of line in {limit} bytes")
    line = data.split(b"\n", 1)[0]
    return line[:-1] if line.endswith(b"\r") else line


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
