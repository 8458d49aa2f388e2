"""The forwards under way in the daemon: one ForwardClient per waiting connection, their
deadlines (one timeout for all, so one order), and the NAT loop guard.

Each is driven from the daemon's selector; `done(owner, answer, line, failure)` is called
once per forward with the reply line (end of line removed), or None and why.
"""

from __future__ import annotations

import functools
import logging
import selectors
from collections import OrderedDict
from collections.abc import Callable, Hashable

from procident.forward import ForwardClient, ForwardFailed
from procident.lookup import Endpoint
from procident.responder import Answer

log = logging.getLogger(__name__)

Done = Callable[[Hashable, Answer, "bytes | None", str], None]


class Forwards:
    """Forwards keyed by their owner (a connection), in order of their deadline."""

    def __init__(self, selector: selectors.BaseSelector, done: Done) -> None:
        self.selector = selector
        self.done = done
        self.deadlines: OrderedDict[Hashable, float] = OrderedDict()
        self.under_way: dict[Hashable, tuple[ForwardClient, Answer]] = {}
        # Inner connections (NAT) being asked about -> how many forwards ask: the loop guard.
        self.nat_asking: dict[tuple[Endpoint, Endpoint], int] = {}

    def __len__(self) -> int:
        return len(self.deadlines)

    def __bool__(self) -> bool:
        return bool(self.deadlines)

    def start(self, owner: Hashable, answer: Answer, deadline: float) -> str:
        """Ask answer.forward's target for `owner`; "" when under way, else why not (the
        loop guard, or the connection could not be started): then no `done` call."""
        forward = answer.forward
        assert forward is not None
        nat = forward.nat
        # The loop guard: gateways that forward to each other in a circle would pass one
        # query around until every timeout ran out. A query forwarded by a gateway about
        # an inner connection this daemon is already asking about is such a circle (or a
        # repeat), and is not forwarded again.
        if nat is not None and nat.from_gateway and nat.key in self.nat_asking:
            return f"loop guard: already asking about {nat.inner.local}"
        try:
            client = ForwardClient(forward.target, forward.ask)
        except ForwardFailed as err:
            return str(err)
        if nat is not None:
            self.nat_asking[nat.key] = self.nat_asking.get(nat.key, 0) + 1
        self.under_way[owner] = (client, answer)
        self.deadlines[owner] = deadline
        self.selector.register(client.sock, client.events, functools.partial(self._on_event, owner))
        return ""

    def next_deadline(self) -> float | None:
        return next(iter(self.deadlines.values()), None)

    def expire(self, now: float, timeout: float) -> None:
        """End the forwards whose deadline has passed."""
        while self.deadlines:
            owner, deadline = next(iter(self.deadlines.items()))
            if deadline > now:
                break
            self._finish(owner, None, f"no answer in {timeout:g}s")

    def shorten(self, latest: float) -> None:
        """A reload shortened forward.timeout: no forward under way waits past `latest`."""
        for owner, deadline in sorted(self.deadlines.items(), key=lambda item: item[1]):
            self.deadlines[owner] = min(deadline, latest)
            self.deadlines.move_to_end(owner)

    def drop(self, owner: Hashable) -> None:
        """Forget the forward of `owner` (if any), without calling `done`."""
        if owner not in self.under_way:
            return
        client, answer = self.under_way.pop(owner)
        del self.deadlines[owner]
        nat = answer.forward.nat if answer.forward is not None else None
        if nat is not None:
            count = self.nat_asking.pop(nat.key) - 1
            if count:
                self.nat_asking[nat.key] = count
        self.selector.unregister(client.sock)
        client.close()

    def _on_event(self, owner: Hashable, mask: int) -> None:
        client = self.under_way[owner][0]
        try:
            line = client.handle(mask)
        except ForwardFailed as err:
            self._finish(owner, None, str(err))
            return
        except Exception:
            log.exception("unexpected error forwarding to %s", client.target)
            self._finish(owner, None, "internal error")
            return
        if line is not None:
            self._finish(owner, line, "")
        else:
            self.selector.modify(
                client.sock, client.events, functools.partial(self._on_event, owner)
            )

    def _finish(self, owner: Hashable, line: bytes | None, failure: str) -> None:
        answer = self.under_way[owner][1]
        self.drop(owner)
        self.done(owner, answer, line, failure)
