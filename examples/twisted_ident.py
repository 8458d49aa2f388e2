#!/usr/bin/env python3
"""An ident server on Twisted that answers from the kernel's tables.

A program written against twisted.protocols.ident changes one line,

    from procident import twisted as ident      # was: from twisted.protocols import ident

and keeps its classes. This one is the shortest such server: ProcServerMixin's lookup
(procident's: netlink, else /proc; IPv4 and IPv6) in an IdentServer, with the owner's
login name sent as "UNIX" and root hidden, as procident's daemon does by default.

    python3 examples/twisted_ident.py [--listen ADDRESS:PORT ...]

It prints "listening on HOST:PORT" for each address once it serves (port 0 picks a
free one; port 113 needs root or CAP_NET_BIND_SERVICE). Needs procident[twisted].
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet import protocol, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from procident import twisted as ident


class KernelIdentServer(ident.ProcServerMixin, ident.IdentServer):
    """Names the owner of a connection of this host; root is never named."""

    SYSTEM_NAME = "UNIX"

    def getUsername(self, uid: int) -> str:
        if uid == 0:
            raise ident.HiddenUser()
        return super().getUsername(uid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", action="append", default=[], metavar="ADDRESS:PORT")
    args = parser.parse_args()
    observers: list[Any] = [textFileLogObserver(sys.stderr)]  # ILogObserver providers
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    factory = protocol.Factory.forProtocol(KernelIdentServer)
    loop: Any = reactor  # the reactor's methods come from zope interfaces
    for where in args.listen or ["0.0.0.0:113", "[::]:113"]:
        host, _, port = where.rpartition(":")
        listening = loop.listenTCP(int(port), factory, interface=host.strip("[]"))
        print(f"listening on {host}:{listening.getHost().port}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
