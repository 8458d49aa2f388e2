"""The one answer sink: a session's Send or Close record -> one log line and the metrics.

Every driver (the selectors daemon, inetd mode, the asyncio adapter) hands each record
here, so an answered query reads the same in the log and counts the same, whatever
served it.
"""

from __future__ import annotations

import contextlib
import logging
import time

from procident.logsetup import FastInfo
from procident.lookup import Endpoint
from procident.metrics import Metrics
from procident.responder import Answer, describe_owner
from procident.session import Record


def record_answer(
    logger: logging.Logger,
    peer: Endpoint,
    record: Record,
    names: bool = True,
    metrics: Metrics | None = None,
) -> None:
    """Log and count what the session of the client at `peer` did, for one record (a
    Send's or a Close's)."""
    kind = record.kind
    client = peer.address
    if record.line:
        if metrics is not None:
            metrics.reply(record.line)
        query = record.query
        if kind == "malformed" or query is None:
            if metrics is not None:
                metrics.malformed += 1
            if not logger.isEnabledFor(logging.INFO):
                return
            logger.info(
                "answer client=%s query=malformed reply=INVALID-PORT",
                client,
                extra={
                    "fields": {
                        "event": "answer",
                        "client": str(client),
                        "query": "malformed",
                        "reply": "ERROR:INVALID-PORT",
                        "rule": "malformed",
                    }
                },
            )
            return
        if not logger.isEnabledFor(logging.INFO):
            return  # (log_answer would say the same, a call later: once per query)
        detail = record.detail if isinstance(record.detail, Answer) else None
        log_answer(
            logger,
            client,
            query.server_port,
            query.client_port,
            record.line,
            record.rule,
            detail,
            names,
        )
        return
    if kind == "overlong":
        if metrics is not None:
            metrics.overlong += 1
        logger.info("closing %s: line longer than the limit", peer)
    elif kind == "idle":
        if metrics is not None:
            metrics.timed_out += 1
        logger.debug("closing %s: idle for %ss", peer, record.rule)


def log_answer(
    logger: logging.Logger,
    client: object,
    server_port: int,
    client_port: int,
    line: bytes,
    rule: str,
    answer: Answer | None = None,
    names: bool = True,
) -> None:
    """The one log line of an answered query: client, port pair, real owner, reply, rule.

    names=False ([log] user_names = false) leaves out login names and user ids: the
    owner is given by uid, and a USERID reply's id as "-".
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    reply = line.split(b":", 1)[1].rstrip(b"\r\n").decode("utf-8", "backslashreplace")
    owner = describe_owner(answer)
    if not names:
        if reply.startswith("USERID:"):
            reply = reply.rsplit(":", 1)[0] + ":-"
        if answer is not None and answer.owner is not None:
            owner = f"uid={answer.owner.uid}"
        rule = rule.split(" forward ", 1)[0]  # a forward's note may quote an id
    fast = _fast(logger)
    if fast is not None:  # procident's own text log: the same line, without a LogRecord
        try:
            fast.write(
                f"answer client={_text(client)} query={server_port},{client_port} owner={owner} "
                f"reply={reply} rule={rule}",
                time.time(),
                flush=not _HELD.holding,
            )
        except (OSError, ValueError):
            pass  # the stream failed (a full disk, a closed pipe): logging's way says so
        else:
            if _HELD.holding:
                _HELD.streams.add(fast)
            return
    fields = {
        "event": "answer",
        "client": str(client),
        "server_port": server_port,
        "client_port": client_port,
        "owner": owner,
        "uid": answer.owner.uid if answer is not None and answer.owner is not None else None,
        "reply": reply,
        "rule": rule,
    }
    logger.info(
        "answer client=%s query=%d,%d owner=%s reply=%s rule=%s",
        client,
        server_port,
        client_port,
        owner,
        reply,
        rule,
        extra={"fields": fields},
    )


# The text of each client address object, by its identity (the daemon's connections
# share one object per address: lookup.endpoint_from_sockaddr): str() of an address is
# about 1.5 us, once per answer line otherwise. Bounded: emptied when full.
_TEXTS: dict[int, tuple[object, str]] = {}
_TEXTS_SIZE = 4096


def _text(address: object) -> str:
    known = _TEXTS.get(id(address))
    if known is not None and known[0] is address:
        return known[1]
    text = str(address)
    if len(_TEXTS) >= _TEXTS_SIZE:
        _TEXTS.clear()
    _TEXTS[id(address)] = (address, text)  # (held: its id is not reused meanwhile)
    return text


class _Held:
    """Answer lines written but not flushed yet, in one turn of the daemon's loop: one
    write(2) per turn, not per answer. A line logged otherwise meanwhile goes to the
    same stream, so the order of lines is kept."""

    def __init__(self) -> None:
        self.holding = False
        self.streams: set[FastInfo] = set()
        # Each logger's FastInfo (or None) for this turn: no handler changes within one
        # (a reload comes between turns), so it is looked for once a turn, not per line.
        self.fast: dict[str, FastInfo | None] = {}


_HELD = _Held()


def hold_lines() -> None:
    """From now until release_lines, answer lines wait in their stream's buffer."""
    _HELD.holding = True
    _HELD.fast.clear()


def release_lines() -> None:
    """Flush the answer lines held since hold_lines."""
    _HELD.holding = False
    _HELD.fast.clear()
    while _HELD.streams:
        # A log that cannot be written never stops the loop (nor an answer): as
        # logging's handlers do, the lines are lost and serving goes on.
        with contextlib.suppress(OSError, ValueError):
            _HELD.streams.pop().flush()


# The FastInfo of each logger, with the handlers and stream it was made for.
_FAST: dict[str, tuple[tuple[object, ...], FastInfo | None]] = {}


def _fast(logger: logging.Logger) -> FastInfo | None:
    """The logger's FastInfo, made again whenever its handlers (or theirs) change (looked
    for once per turn of the daemon's loop, while lines are held)."""
    held = _HELD.fast if _HELD.holding else None
    if held is not None and logger.name in held:
        return held[logger.name]
    # (Filters as tuples: a list in the key is the list itself, so a filter added to it
    # later would compare equal.)
    chain: list[object] = [tuple(logger.filters)]
    current: logging.Logger | None = logger
    while current is not None:
        chain += (current.propagate, *current.handlers)
        for handler in current.handlers:
            chain += (getattr(handler, "stream", None), handler.formatter, handler.level)
            chain.append(tuple(handler.filters))
        current = current.parent if current.propagate else None
    key = tuple(chain)
    made = _FAST.get(logger.name)
    if made is None or made[0] != key:
        made = (key, FastInfo.for_logger(logger))
        _FAST[logger.name] = made
    if held is not None:
        held[logger.name] = made[1]
    return made[1]
