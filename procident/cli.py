"""The procident command: serve, check-config, lookup, query.

Every error an admin can cause is one sentence and a non-zero exit status,
never a traceback.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import socket
import sys
import time
from collections.abc import Callable

import click

from procident import __version__
from procident.config import (
    LOG_LEVELS,
    LOG_TARGETS,
    Config,
    ConfigError,
    LogConfig,
    load_config,
    parse_endpoint,
    with_listen,
    with_log,
)
from procident.lookup import (
    Backend,
    ConnectionId,
    Endpoint,
    LookupFailed,
    normalize_address,
    select_backend,
)
from procident.process import (
    PrivilegeError,
    daemonize,
    drop_privileges,
    remove_pid_file,
    write_pid_file,
)
from procident.protocol import ErrorReply, Query, UserIdReply, parse_reply
from procident.responder import Responder
from procident.server import ListenError, Server, describe_owner, open_listeners

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="procident")
def main() -> None:
    """procident: an RFC 1413 ident daemon that answers from the kernel's socket tables."""


# -- serve ------------------------------------------------------------------


def config_file(path: str | None) -> str | None:
    """The file to read: the one given, else /etc/procident.toml if it exists, else none."""
    if path:
        return path
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def config_loader(
    path: str | None, listen: tuple[Endpoint, ...], level: str | None, target: str | None
) -> Callable[[], Config]:
    """A function that reads the configuration as `serve` sees it: the file (or the embedded
    default), then the command line's overrides. Called at start and on every SIGHUP."""

    def load() -> Config:
        chosen = config_file(path)
        config = load_config(chosen) if chosen else Config()
        if listen:
            config = with_listen(config, listen)
        return with_log(config, level, target)

    return load


def setup_logging(config: LogConfig) -> None:
    """Send procident's log to stderr or syslog at the configured level."""
    handler: logging.Handler
    if config.target == "syslog":
        try:
            _probe_syslog(config.syslog_socket)
            handler = logging.handlers.SysLogHandler(
                address=config.syslog_socket,
                facility=logging.handlers.SysLogHandler.facility_names[config.syslog_facility],
            )
        except OSError as err:
            raise click.ClickException(
                f"cannot log to syslog at {config.syslog_socket}: {err.strerror or err}"
            ) from None
        handler.setFormatter(logging.Formatter("procident[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(config.level.upper())
    log.propagate = False


def _backend(name: str) -> Backend:
    try:
        return select_backend(name)
    except LookupFailed as err:
        raise click.ClickException(str(err)) from None


def _probe_syslog(path: str) -> None:
    """Fail now if nothing listens at `path`: SysLogHandler itself would silently drop
    every line (as openlog() does), and an admin who asked for syslog would see nothing."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
                return
            except OSError as err:
                if err.errno != errno.EPROTOTYPE:  # a stream socket: try that
                    raise


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
@click.option("--daemon", is_flag=True, help="Detach from the terminal (logs go to syslog).")
@click.option("--pid-file", type=click.Path(dir_okay=False), help="Write the daemon's pid here.")
def serve(
    config_path: str | None,
    listen: tuple[Endpoint, ...],
    log_level: str | None,
    log_target: str | None,
    daemon: bool,
    pid_file: str | None,
) -> None:
    """Run the ident daemon in the foreground (or detached with --daemon)."""
    if daemon and log_target is None:
        log_target = "syslog"  # stderr is /dev/null once detached
    load = config_loader(config_path, listen, log_level, log_target)
    try:
        config = load()
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    setup_logging(config.log)
    log.info("configuration: %s", config_file(config_path) or "built-in defaults")
    backend = _backend(config.lookup.backend)
    log.info("lookup backend: %s", backend.name)
    try:
        listeners = open_listeners(config.server.listen)
    except ListenError as err:
        raise click.ClickException(str(err)) from None
    ready = daemonize() if daemon else None
    if pid_file:
        try:
            write_pid_file(pid_file)  # before dropping root: /run is root's
        except OSError as err:
            raise click.ClickException(
                f"cannot write pid file {pid_file}: {err.strerror}"
            ) from None
    try:
        log.info(drop_privileges(config.server.user, config.server.group, config.server.keep_root))
    except PrivilegeError as err:
        raise click.ClickException(str(err)) from None

    def reload() -> Config:
        new = load()
        log.setLevel(new.log.level.upper())
        if (new.log.target, new.log.syslog_socket, new.log.syslog_facility) != (
            config.log.target,
            config.log.syslog_socket,
            config.log.syslog_facility,
        ):
            log.warning("log.target and the syslog settings take effect at the next start")
        return new

    server = Server(config, Responder(backend, config.reply), listeners, reload)
    if ready is not None:
        ready()
    try:
        server.run()
    finally:
        if pid_file:
            remove_pid_file(pid_file)
    log.info("stopped")


# -- check-config -------------------------------------------------------------


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
def check_config(file: str) -> None:
    """Check a configuration file; exit 0 if it is valid, 1 with the reason if not."""
    try:
        load_config(file)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{file}: OK")


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
    answer = Responder(_backend(config.lookup.backend), config.reply).respond(
        Query(local.port, remote.port), ConnectionId(local, remote), time.monotonic()
    )
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
    click.echo(f"rule:       {answer.rule}")
    click.echo(f"reply:      {answer.line.decode('utf-8', 'backslashreplace').rstrip()}")


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
        click.echo("type:    USERID")
        click.echo(f"os:      {reply.os}")
        if reply.charset:
            click.echo(f"charset: {reply.charset}")
        click.echo(f"user id: {reply.user_id}")
        return
    click.echo("type:    ERROR")
    click.echo(f"error:   {reply.error.value if isinstance(reply, ErrorReply) else reply}")
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


if __name__ == "__main__":  # pragma: no cover
    main()
