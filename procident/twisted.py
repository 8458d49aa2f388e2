"""A drop-in replacement for Twisted's `twisted.protocols.ident`, correct on Python 3.

Twisted's own module mixes bytes and str (twisted/twisted#11868): over a real
connection every query ends in a TypeError and no reply. Programs built on it change
one import line:

    from procident import twisted as ident        # was: from twisted.protocols import ident

and keep their `IdentServer` subclasses (override `lookup`), `IdentClient`,
`ProcServerMixin` and the four error classes. What they get beside:

- the reader of procident's daemon on real transports (bytes): CR LF or a bare LF,
  strict ports (1 to 5 ASCII digits; INVALID-PORT for 0 and above 65535), a line that
  is no port pair answered `0,0:ERROR:INVALID-PORT` without echoing it and the
  connection closed, a line over MAX_LENGTH (1000) bytes closing the connection;
- the one reply validator of procident, whatever `lookup` returns, and each reply line
  in one write (libident fails on replies in pieces); replies in the order of the
  queries, however their Deferreds fire;
- an exception in `lookup` (raised, or a failing Deferred) answered UNKNOWN-ERROR and
  logged once, with its traceback, through Twisted's logger;
- `ProcServerMixin.lookup` answering from procident's kernel lookup (netlink sock_diag,
  else /proc; IPv4, IPv6 and IPv4-mapped; all four addresses and ports), never naming
  the owner of a socket no process holds.

Lines given as `str` (as Twisted's own tests give them to `lineReceived`) are read and
answered as Twisted's module did, in its spaced form and as `str` through `sendLine`,
but through the same validator.
"""

from __future__ import annotations

import ipaddress
import pwd
import sys
from collections.abc import Iterator
from typing import Any, Literal

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.python import failure
from zope.interface import classImplements  # type: ignore[import-untyped]

from procident.lookup import (
    Backend,
    ConnectionId,
    Endpoint,
    LookupFailed,
    endpoint_from_sockaddr,
    normalize_address,
    select_backend,
)
from procident.lookup.procfs import parse_line
from procident.protocol import (
    MAX_LINE,
    ErrorReply,
    ErrorType,
    Malformed,
    Query,
    ReplyError,
    UserIdReply,
    check_token,
    check_user_id,
    format_reply,
    parse_query,
    parse_reply,
    printable,
)
from procident.protocol import (
    InvalidPort as _InvalidPortEvent,
)

__all__ = [
    "HiddenUser",
    "IdentClient",
    "IdentError",
    "IdentServer",
    "InvalidPort",
    "NoUser",
    "ProcServerMixin",
]

_MIN_PORT = 1
_MAX_PORT = 2**16 - 1
_log = Logger(namespace="procident.twisted")


class IdentError(Exception):
    """Can't determine connection owner; reason unknown."""

    identDescription = "UNKNOWN-ERROR"

    def __str__(self) -> str:
        return self.identDescription


class NoUser(IdentError):
    """The connection specified by the port pair is not currently in use or currently
    not owned by an identifiable entity."""

    identDescription = "NO-USER"


class InvalidPort(IdentError):
    """Either the local or foreign port was improperly specified."""

    identDescription = "INVALID-PORT"


class HiddenUser(IdentError):
    """The server was able to identify the user of this port, but the information was
    not returned at the request of the user."""

    identDescription = "HIDDEN-USER"


class _Lines(basic.LineOnlyReceiver):
    """LineOnlyReceiver that ends a line at CR LF or a bare LF (a lone CR does not), and
    closes the connection at a line longer than MAX_LENGTH (PROTOCOL.md)."""

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_LINE
    _received = b""
    _stopped = False

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        buffer = self._received + data
        start = 0
        while not self._stopped:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.MAX_LENGTH:
                self._overlong(line)
                return
            self.lineReceived(line)
        self._received = b"" if self._stopped else buffer[start:]
        rest = self._received
        if len(rest) > self.MAX_LENGTH + 1 or (
            len(rest) == self.MAX_LENGTH + 1 and not rest.endswith(b"\r")
        ):
            self._overlong(rest)

    def _overlong(self, line: bytes) -> None:
        self._stopped = True
        self._received = b""
        self.lineLengthExceeded(line)

    def lineReceived(self, line: bytes | str) -> None:
        raise NotImplementedError

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over MAX_LENGTH: close the connection, without a reply."""
        self._transport().loseConnection()

    def _transport(self) -> Any:
        # The transport's zope interfaces are not types mypy can check calls against.
        assert self.transport is not None
        return self.transport

    def sendLine(self, line: bytes | str) -> None:
        """One line and its end of line in one write (str is sent as UTF-8)."""
        raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
        self._transport().write(raw + self.delimiter)


class _Slot:
    """A reply to come, in the order its query came."""

    __slots__ = ("line", "close")

    def __init__(self) -> None:
        self.line: bytes | str | None = None
        self.close = False


class IdentServer(_Lines):
    _textMode = False  # the line being answered came as str: answer as Twisted did
    _eof = False  # the client has shut its sending side: close once all is answered

    """The Identification Protocol (RFC 1413) server: given a TCP port number pair, it
    returns a character string which identifies the owner of that connection.

    Server authors should subclass this class and override the lookup method. The
    default implementation returns an UNKNOWN-ERROR response for every query.
    """

    def connectionMade(self) -> None:
        self._pending: list[_Slot] = []

    def lineReceived(self, line: bytes | str) -> None:
        if isinstance(line, str):
            self._textLine(line)
            return
        event = parse_query(line)
        if isinstance(event, Query):
            self._textMode = False
            self.validQuery(event.server_port, event.client_port)
        elif isinstance(event, _InvalidPortEvent):
            self._answer(
                self._slot(), event.server_port, event.client_port, _error(InvalidPort()), False
            )
        else:
            assert isinstance(event, Malformed)
            # Never echo the text; answer, then close once the replies before it are out.
            slot = self._slot()
            slot.line = format_reply(0, 0, ErrorReply(ErrorType.INVALID_PORT))
            slot.close = True
            self._stopped = True
            self._flush()

    def readConnectionLost(self) -> None:
        """The client sent all it will (a half-close): answer what it asked, then close."""
        self._stopped = True
        self._eof = True
        self._flush()

    def writeConnectionLost(self) -> None:
        self._transport().loseConnection()

    def _textLine(self, line: str) -> None:
        """A line given as str, as Twisted's module read it (its own tests give these)."""
        parts = line.split(",")
        if len(parts) != 2:
            self.invalidQuery()
            return
        try:
            portOnServer, portOnClient = map(int, parts)
        except ValueError:
            self.invalidQuery()
            return
        if _MIN_PORT <= portOnServer <= _MAX_PORT and _MIN_PORT <= portOnClient <= _MAX_PORT:
            self._textMode = True
            self.validQuery(portOnServer, portOnClient)
        else:
            self._answer(self._slot(), portOnServer, portOnClient, _error(InvalidPort()), True)

    def invalidQuery(self) -> None:
        self._transport().loseConnection()

    def validQuery(self, portOnServer: int, portOnClient: int) -> None:
        """Called when a valid query is received to look up and deliver the response."""
        self._ask(portOnServer, portOnClient, self._textMode)

    def _ask(self, portOnServer: int, portOnClient: int, text: bool) -> None:
        transport = self._transport()
        serverAddr = _host(transport.getHost()), portOnServer
        clientAddr = _host(transport.getPeer()), portOnClient
        slot = self._slot()
        looked = defer.maybeDeferred(self.lookup, serverAddr, clientAddr)
        looked.addCallbacks(_checked, _failed, errbackArgs=(portOnServer, portOnClient))
        looked.addCallback(
            lambda reply: self._answer(slot, portOnServer, portOnClient, reply, text)
        )

    def _slot(self) -> _Slot:
        if not hasattr(self, "_pending"):
            self._pending = []  # a protocol used without makeConnection's connectionMade
        slot = _Slot()
        self._pending.append(slot)
        return slot

    def _answer(
        self, slot: _Slot, sport: int, cport: int, reply: UserIdReply | ErrorReply, text: bool
    ) -> None:
        try:
            slot.line = _spaced(sport, cport, reply) if text else format_reply(sport, cport, reply)
        except ReplyError as err:
            _log.error("lookup returned a reply that cannot be sent: {why}", why=str(err))
            error = ErrorReply(ErrorType.UNKNOWN_ERROR)
            slot.line = _spaced(sport, cport, error) if text else format_reply(sport, cport, error)
        self._flush()

    def _flush(self) -> None:
        while self._pending and self._pending[0].line is not None:
            slot = self._pending.pop(0)
            if self.transport is None or not self.connected:
                continue
            assert slot.line is not None
            if isinstance(slot.line, str):
                self.sendLine(slot.line)
            else:
                self._transport().write(slot.line)  # CR LF included: one write
            if slot.close:
                self._pending.clear()
                self.invalidQuery()
        if self._eof and not self._pending:
            self._transport().loseConnection()

    def lookup(self, serverAddress: tuple[str, int], clientAddress: tuple[str, int]) -> Any:
        """Lookup user information about the specified address pair.

        Return a two-tuple of system name and username (or a Deferred that fires with
        one), or raise IdentError or a subclass to answer that error.

        @param serverAddress: (dotted-quad or IPv6 address, port) of this end.
        @param clientAddress: the same, of the querier's end.
        """
        raise IdentError()


classImplements(IdentServer, IHalfCloseableProtocol)  # readConnectionLost: answer, then close


def _host(address: object) -> str:
    host = getattr(address, "host", "")
    return host if isinstance(host, str) else ""


def _checked(result: object) -> UserIdReply | ErrorReply:
    """What `lookup` returned, as a reply; ReplyError-free checks happen when formatted."""
    if not isinstance(result, tuple | list) or len(result) != 2:
        _log.error("lookup returned {result!r}, not (system name, user id)", result=result)
        return ErrorReply(ErrorType.UNKNOWN_ERROR)
    system, user = (
        part.decode("utf-8", "surrogateescape") if isinstance(part, bytes) else part
        for part in result
    )
    if not isinstance(system, str) or not isinstance(user, str):
        _log.error("lookup returned {result!r}, not two strings", result=result)
        return ErrorReply(ErrorType.UNKNOWN_ERROR)
    return UserIdReply(user, system)


def _failed(reason: failure.Failure, sport: int, cport: int) -> ErrorReply:
    if reason.check(IdentError):  # type: ignore[no-untyped-call]
        return _error(reason.value)
    _log.failure(
        "lookup of {sport}, {cport} failed; answered UNKNOWN-ERROR",
        reason,
        sport=sport,
        cport=cport,
    )
    return ErrorReply(ErrorType.UNKNOWN_ERROR)


def _error(err: BaseException | None) -> ErrorReply:
    described = getattr(err, "identDescription", "UNKNOWN-ERROR")
    try:
        return ErrorReply(ErrorType(described))
    except ValueError:
        return ErrorReply(ErrorType.UNKNOWN_ERROR)


def _spaced(sport: int, cport: int, reply: UserIdReply | ErrorReply) -> str:
    """Twisted's form of a reply, for lines given as str; validated as every reply is."""
    if isinstance(reply, ErrorReply):
        return f"{sport}, {cport} : ERROR : {reply.error.value}"
    check_token(reply.os, "OS token")
    check_user_id(reply.user_id)
    return f"{sport}, {cport} : USERID : {reply.os} : {reply.user_id}"


# -- ProcServerMixin ---------------------------------------------------------------

_kernel: Backend | None = None
# The kernel prints each 32-bit word of an address as a native integer.
_ORDER: Literal["little", "big"] = "little" if sys.byteorder == "little" else "big"


def _backend() -> Backend:
    global _kernel
    if _kernel is None:
        _kernel = select_backend("auto")
    return _kernel


def _normalized(endpoint: Endpoint) -> Endpoint:
    """An IPv4-mapped end (a dual-stack socket's, in /proc/net/tcp6) as IPv4."""
    return Endpoint(normalize_address(endpoint.address), endpoint.port)


class ProcServerMixin:
    """Implements lookup() from the kernel's tables: procident's lookup (netlink
    sock_diag, else /proc/net/tcp and tcp6), matching all four addresses and ports.

    A connection the kernel lookup does not find is looked for in `entries()` too
    (by default the lines of /proc/net/tcp, as Twisted's mixin read them), so the
    hooks of a subclass (`entries`, `parseLine`, `unpackAddress`,
    `dottedQuadFromHexString`, `getUsername`, `SYSTEM_NAME`) keep working. A socket
    no process holds (closed: TIME_WAIT, orphans) is NoUser, never uid 0's name.
    """

    SYSTEM_NAME = "LINUX"

    def getUsername(self, uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            raise NoUser() from None

    def entries(self) -> Iterator[str]:
        with open("/proc/net/tcp") as f:
            f.readline()
            for line in f:
                yield line.strip()

    def dottedQuadFromHexString(self, hexstr: str) -> str:
        """The address of /proc/net/tcp's hex form (8 digits IPv4, 32 digits IPv6)."""
        if len(hexstr) == 32:
            words = (int(hexstr[i : i + 8], 16).to_bytes(4, _ORDER) for i in range(0, 32, 8))
            return str(ipaddress.IPv6Address(b"".join(words)))
        return str(ipaddress.IPv4Address(int(hexstr, 16).to_bytes(4, _ORDER)))

    def unpackAddress(self, packed: str) -> tuple[str, int]:
        addr, port = packed.split(":")
        return self.dottedQuadFromHexString(addr), int(port, 16)

    def parseLine(self, line: str) -> tuple[tuple[str, int], tuple[str, int], int]:
        parts = line.strip().split()
        localAddr = self.unpackAddress(parts[1])
        remoteAddr = self.unpackAddress(parts[2])
        return localAddr, remoteAddr, int(parts[7])

    def lookup(
        self, serverAddress: tuple[str, int], clientAddress: tuple[str, int]
    ) -> tuple[str, str]:
        try:  # as the daemon reads a socket's address: scope ids dropped, mapped as IPv4
            conn = ConnectionId(
                endpoint_from_sockaddr(serverAddress), endpoint_from_sockaddr(clientAddress)
            )
        except (OSError, ValueError):
            raise NoUser() from None
        try:
            found = _backend().find(conn)
        except LookupFailed as err:
            _log.error("the kernel lookup failed: {why}", why=str(err))
            found = None
        if found is not None:
            if not found.entry.owned:
                raise NoUser()
            return self.SYSTEM_NAME, self.getUsername(found.entry.uid)
        uid = self._fromEntries(conn)
        if uid is None:
            raise NoUser()
        return self.SYSTEM_NAME, self.getUsername(uid)

    def _fromEntries(self, conn: ConnectionId) -> int | None:
        """The uid of `conn` in entries(), read with procident's parser (which sees
        closed sockets) unless a subclass parses lines itself."""
        own_parser = all(
            getattr(type(self), hook) is getattr(ProcServerMixin, hook) and hook not in vars(self)
            for hook in ("parseLine", "unpackAddress", "dottedQuadFromHexString")
        )
        for line in self.entries():
            if own_parser:
                try:
                    entry = parse_line(line)
                except ValueError:
                    continue
                if (
                    _normalized(entry.local) == conn.local
                    and _normalized(entry.remote) == conn.remote
                ):
                    return entry.uid if entry.owned else None
                continue
            (laddr, lport), (raddr, rport), uid = self.parseLine(line)
            try:
                local = endpoint_from_sockaddr((laddr, lport))
                remote = endpoint_from_sockaddr((raddr, rport))
            except (OSError, ValueError):
                continue
            if local == conn.local and remote == conn.remote:
                return uid
        return None


# -- IdentClient -------------------------------------------------------------------


class IdentClient(_Lines):
    """Asks an ident server: `lookup(portOnServer, portOnClient)` returns a Deferred
    that fires with (system name, user id), or fails with the error class of the
    reply (IdentError for anything else); queries go one at a time, in order, and
    those pending when the connection is lost fail with IdentError."""

    errorTypes = (IdentError, NoUser, InvalidPort, HiddenUser)

    def __init__(self) -> None:
        self.queries: list[tuple[defer.Deferred[tuple[str, str]], int, int]] = []

    def lookup(self, portOnServer: int, portOnClient: int) -> defer.Deferred[tuple[str, str]]:
        """Lookup user information about the specified address pair."""
        asked: defer.Deferred[tuple[str, str]] = defer.Deferred()
        self.queries.append((asked, portOnServer, portOnClient))
        if len(self.queries) == 1:
            self._send(portOnServer, portOnClient)
        return asked

    def _send(self, portOnServer: int, portOnClient: int) -> None:
        self._transport().write(b"%d, %d\r\n" % (portOnServer, portOnClient))

    def lineReceived(self, line: bytes | str) -> None:
        if not self.queries:
            _log.info("unexpected server response: {line}", line=printable(_text(line), 200))
            return
        asked, sport, cport = self.queries.pop(0)
        self.parseResponse(asked, line, (sport, cport))
        if self.queries and self.transport is not None:
            self._send(self.queries[0][1], self.queries[0][2])

    def connectionLost(self, reason: failure.Failure = connectionDone) -> None:
        queries, self.queries = self.queries, []
        for asked, _, _ in queries:
            asked.errback(IdentError(reason))

    def parseResponse(
        self,
        deferred: defer.Deferred[tuple[str, str]],
        line: bytes | str,
        ports: tuple[int, int] | None = None,
    ) -> None:
        raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
        shown = printable(_text(line), 200)
        try:
            parsed = parse_reply(raw)
        except ValueError:
            deferred.errback(IdentError(shown))
            return
        if ports is not None and (parsed.server_port, parsed.client_port) != ports:
            deferred.errback(IdentError(f"a reply about other ports: {shown}"))
            return
        reply = parsed.reply
        if isinstance(reply, UserIdReply):
            deferred.callback((reply.os, reply.user_id.strip(" \t")))
            return
        token = reply.error.value if isinstance(reply, ErrorReply) else reply
        for errorType in self.errorTypes:
            if errorType.identDescription == token:
                deferred.errback(errorType(shown))
                return
        deferred.errback(IdentError(shown))


def _text(line: bytes | str) -> str:
    return line if isinstance(line, str) else line.decode("utf-8", "surrogateescape")
