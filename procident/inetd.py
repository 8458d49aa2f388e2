"""inetd mode: answer the queries of one connection on standard input and output, then exit.

For inetd, xinetd, systemd's Accept=yes sockets, s6-tcpserver, tcpserver and
socat. The connection's addresses come from the socket itself when standard
input is one, else from the environment the super-server sets: TCPREMOTEIP,
TCPREMOTEPORT, TCPLOCALIP, TCPLOCALPORT (UCSPI: tcpserver, s6), or
SOCAT_PEERADDR, SOCAT_PEERPORT, SOCAT_SOCKADDR, SOCAT_SOCKPORT (socat).
The per-connection rules are the daemon's (one procident.session.IdentSession);
per-client limits need the daemon, which sees every connection (one process here
sees one).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
import socket
import time
from collections.abc import Callable, Mapping

from procident.answerlog import record_answer
from procident.config import Config
from procident.forward import forward_blocking
from procident.lookup import ConnectionId, Endpoint, endpoint_from_sockaddr, normalize_address
from procident.protocol import Query
from procident.responder import FILE_RACE_POLL, FILE_RACE_WAIT, Responder, waited
from procident.session import Ask, Close, IdentSession, Outcome, Send, rules_from

log = logging.getLogger(__name__)

RECV_SIZE = 4096
# (remote address, remote port, local address, local port) variables, per super-server
_ENVIRONMENTS = (
    ("TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT"),
    ("SOCAT_PEERADDR", "SOCAT_PEERPORT", "SOCAT_SOCKADDR", "SOCAT_SOCKPORT"),
)


class InetdError(Exception):
    """The connection on standard input cannot be served; the message says why."""


def connection_addresses(fd: int, environ: Mapping[str, str]) -> tuple[Endpoint, Endpoint]:
    """(the client's end, our end) of the connection on `fd`."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        sock = None  # not a socket: a pipe from tcpserver or socat
    if sock is not None:
        with sock:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    return (
                        endpoint_from_sockaddr(sock.getpeername()),
                        endpoint_from_sockaddr(sock.getsockname()),
                    )
                except OSError as err:
                    raise InetdError(f"standard input: {err.strerror}") from None
    for remote_ip, remote_port, local_ip, local_port in _ENVIRONMENTS:
        if remote_ip in environ and local_ip in environ:
            try:
                return (
                    _endpoint(environ[remote_ip], environ.get(remote_port, "0")),
                    _endpoint(environ[local_ip], environ.get(local_port, "0")),
                )
            except ValueError as err:
                raise InetdError(f"{remote_ip}/{local_ip}: {err}") from None
    raise InetdError(
        "standard input is not a TCP connection, and neither TCPREMOTEIP and TCPLOCALIP "
        "nor SOCAT_PEERADDR and SOCAT_SOCKADDR say whose it is"
    )


def _endpoint(address: str, port: str) -> Endpoint:
    parsed = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"{port!r} is not a port")
    return Endpoint(normalize_address(parsed), int(port))


def serve_connection(
    responder: Responder,
    config: Config,
    peer: Endpoint,
    local: Endpoint,
    fd_in: int = 0,
    fd_out: int = 1,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Answer the queries that arrive on `fd_in` on `fd_out`, until the client is done,
    a rule ends the connection, or the idle timeout passes: the session's rules
    (procident.session), min_response_time included; lookups block, which one
    connection per process allows."""
    rules = rules_from(config.limits, config.reply)
    session = IdentSession(rules, clock())
    names = config.log.user_names
    while True:
        action = session.next_action(clock())
        if isinstance(action, Ask):
            try:
                with responder.batch():
                    outcome = _answer(responder, config, action.query, peer, local, clock)
            except Exception:
                log.exception("unexpected error answering %s", peer)
                session.fail(action.seq, clock())
            else:
                session.answer(action.seq, outcome, clock())
        elif isinstance(action, Send):
            record_answer(log, peer, action.record, names)
            if not _write(fd_out, action.line, rules.idle_timeout):
                return
        elif isinstance(action, Close):
            record_answer(log, peer, action.record, names)
            return
        else:
            deadline = session.deadline
            wait = 0.0 if deadline is None else deadline - clock()
            if session.wants_read() and _wait(fd_in, select.POLLIN, wait):
                try:
                    data = os.read(fd_in, RECV_SIZE)
                except OSError:
                    return
                session.receive_data(data, clock())
            elif wait > 0 and not session.wants_read():
                time.sleep(wait)  # a reply held for min_response_time
            session.tick(clock())


def _answer(
    responder: Responder,
    config: Config,
    query: Query,
    peer: Endpoint,
    local: Endpoint,
    clock: Callable[[], float],
) -> Outcome:
    conn = ConnectionId(
        Endpoint(local.address, query.server_port), Endpoint(peer.address, query.client_port)
    )
    answer = responder.respond(query, conn, clock())
    until = clock() + FILE_RACE_WAIT
    while answer.recheck:
        # No block for this connection in the owner's file: it may be being written.
        if clock() >= until:
            answer = waited(answer)
            break
        time.sleep(FILE_RACE_POLL)  # one connection per process: it may wait
        if answer.owner is not None:
            responder.accounts.read_again(answer.owner.uid)
        answer = responder.respond(query, conn, clock())
    if answer.forward is not None:
        answer = forward_blocking(responder, query, answer, config.forward.timeout)
    assert answer.line is not None  # no helper here: files are read as they are asked for
    return Outcome(answer.line, answer.rule, answer)


def _wait(fd: int, event: int, timeout: float) -> bool:
    if timeout <= 0:
        return False
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(timeout * 1000))


def _write(fd: int, data: bytes, timeout: float) -> bool:
    """Write all of `data` within `timeout` seconds; False if the client does not take it."""
    deadline = time.monotonic() + timeout
    while data:
        if not _wait(fd, select.POLLOUT, deadline - time.monotonic()):
            return False
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            continue
        except OSError:
            return False
        data = data[written:]
    return True
