"""Twisted programs the tests of procident.twisted run in a process of their own (one
reactor per process): `server MODULE` serves an IdentServer of that module on
127.0.0.1 and prints its port; `client HOST PORT SPORT,CPORT ...` asks with
IdentClient, all queries at once, and prints one result per line.

MODULE is "procident" (procident.twisted) or "twisted" (twisted.protocols.ident, to show
what it does on a real connection). The server's lookup answers by the server port:

    1  ("UNIX", "alice")           2  a Deferred of ("UNIX", "later"), 0.3 s later
    3  raises HiddenUser           4  raises RuntimeError("boom")
    5  ("UNIX", "evil\\r\\nline")    6  a Deferred that fails with ZeroDivisionError
    7  returns 42                  else NoUser
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

loop: Any = reactor


def server(module_name: str) -> None:
    ident: Any = importlib.import_module(
        "procident.twisted" if module_name == "procident" else "twisted.protocols.ident"
    )

    class Server(ident.IdentServer):  # type: ignore[misc,name-defined]
        def lookup(self, serverAddress: tuple[str, int], clientAddress: tuple[str, int]) -> Any:
            port = serverAddress[1]
            if port == 1:
                return ("UNIX", "alice")
            if port == 2:
                later: defer.Deferred[tuple[str, str]] = defer.Deferred()
                loop.callLater(0.3, later.callback, ("UNIX", "later"))
                return later
            if port == 3:
                raise ident.HiddenUser()
            if port == 4:
                raise RuntimeError("boom")
            if port == 5:
                return ("UNIX", "evil\r\nline")
            if port == 6:
                failing: defer.Deferred[Any] = defer.Deferred()
                loop.callLater(0.05, lambda: failing.errback(ZeroDivisionError("by zero")))
                return failing
            if port == 7:
                return 42
            raise ident.NoUser()

    listening = loop.listenTCP(0, protocol.Factory.forProtocol(Server), interface="127.0.0.1")
    print(listening.getHost().port, flush=True)
    loop.run()


def client(host: str, port: int, pairs: list[str]) -> None:
    from procident import twisted as ident

    results: list[str] = []

    def connected(proto: ident.IdentClient) -> defer.Deferred[Any]:
        asked = []
        for pair in pairs:
            sport, cport = (int(n) for n in pair.split(","))
            asked.append(proto.lookup(sport, cport))
        for one in asked:
            one.addCallbacks(
                lambda result: results.append(repr(result)),
                lambda reason: results.append(f"{reason.type.__name__}: {reason.value}"),
            )
        return defer.DeferredList(asked)

    endpoint = endpoints.TCP4ClientEndpoint(loop, host, port)
    made = endpoints.connectProtocol(endpoint, ident.IdentClient())
    made.addCallback(connected)
    made.addErrback(lambda reason: results.append(f"connect failed: {reason.value}"))
    made.addBoth(lambda _: loop.stop())
    loop.run()
    for line in results:
        print(line, flush=True)


if __name__ == "__main__":
    observers: list[Any] = [textFileLogObserver(sys.stderr)]
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    if sys.argv[1] == "server":
        server(sys.argv[2])
    else:
        client(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
