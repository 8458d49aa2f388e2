"""The RFC 1413 client of `procident query`: ask one question, read one reply line."""

from __future__ import annotations

import socket

from procident.protocol import ParsedReply, parse_reply

MAX_REPLY = 4096  # bytes: a reply line longer than this is not an ident reply


class NoAnswer(Exception):
    """No valid reply came: the connection failed, closed early, or the reply was malformed
    or about other ports."""


def ask(host: str, port: int, server_port: int, client_port: int, timeout: float) -> ParsedReply:
    """Ask the ident server at host:port who owns the connection from its `server_port`
    to our `client_port`; the parsed reply, or NoAnswer saying why there is none."""
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"%d,%d\r\n" % (server_port, client_port))
            line = read_line(sock)
    except (OSError, UnicodeError) as err:
        raise NoAnswer(f"no answer from {host} port {port}: {err}") from None
    try:
        parsed = parse_reply(line)
    except ValueError as err:
        raise NoAnswer(f"{host} sent a malformed reply: {err}") from None
    if (parsed.server_port, parsed.client_port) != (server_port, client_port):
        raise NoAnswer(
            f"{host} answered about {parsed.server_port},{parsed.client_port}, "
            f"not {server_port},{client_port}"
        )
    return parsed


def read_line(sock: socket.socket, limit: int = MAX_REPLY) -> bytes:
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
