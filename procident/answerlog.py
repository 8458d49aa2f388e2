"""The one answer sink: a session's Send or Close record -> one log line and the metrics.

Every driver (the selectors daemon, inetd mode, the asyncio adapter) hands each record
here, so an answered query reads the same in the log and counts the same, whatever
served it.
"""

from __future__ import annotations

import logging

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
