"""decide() and mask(): the reply chosen for each kind of lookup result."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from procident.config import ReplyConfig
from procident.lookup import Endpoint, Found, SocketEntry, TcpState
from procident.policy import Owner, decide, mask
from procident.protocol import ErrorReply, ErrorType, UserIdReply

LOCAL = Endpoint(ipaddress.IPv4Address("192.0.2.1"), 40001)
REMOTE = Endpoint(ipaddress.IPv4Address("198.51.100.7"), 6667)
ENTRY = SocketEntry(LOCAL, REMOTE, TcpState.ESTABLISHED, 1000, 4242)
ORPHAN = replace(ENTRY, uid=0, inode=0, state=TcpState.FIN_WAIT2)
DEFAULT = ReplyConfig()
NO_USER = ErrorReply(ErrorType.NO_USER)
HIDDEN = ErrorReply(ErrorType.HIDDEN_USER)
UNKNOWN = ErrorReply(ErrorType.UNKNOWN_ERROR)

CASES = [
    ("no connection", None, None, DEFAULT, NO_USER, "no-connection"),
    ("closed socket", Found(ORPHAN, False), None, DEFAULT, NO_USER, "no-owner"),
    (
        "owner",
        Found(ENTRY, False),
        Owner(1000, "alice"),
        DEFAULT,
        UserIdReply("alice", "UNIX"),
        "owner",
    ),
    (
        "root is named only when root holds it",
        Found(ENTRY, False),
        Owner(0, "root"),
        DEFAULT,
        UserIdReply("root", "UNIX"),
        "owner",
    ),
    (
        "os token",
        Found(ENTRY, False),
        Owner(1000, "alice"),
        replace(DEFAULT, os="LINUX"),
        UserIdReply("alice", "LINUX"),
        "owner",
    ),
    (
        "charset",
        Found(ENTRY, False),
        Owner(1000, "alice"),
        replace(DEFAULT, charset="UTF-8"),
        UserIdReply("alice", "UNIX", "UTF-8"),
        "owner",
    ),
    (
        "unknown uid numeric",
        Found(ENTRY, False),
        Owner(3_000_000_000, None),
        DEFAULT,
        UserIdReply("3000000000", "OTHER"),
        "reply.unknown_uid",
    ),
    (
        "unknown uid other_os",
        Found(ENTRY, False),
        Owner(77, None),
        replace(DEFAULT, other_os="X-UID"),
        UserIdReply("77", "X-UID"),
        "reply.unknown_uid",
    ),
    (
        "unknown uid no-user",
        Found(ENTRY, False),
        Owner(77, None),
        replace(DEFAULT, unknown_uid="no-user"),
        NO_USER,
        "reply.unknown_uid",
    ),
    (
        "inbound hidden by default",
        Found(ENTRY, True),
        Owner(1000, "alice"),
        DEFAULT,
        HIDDEN,
        "reply.inbound",
    ),
    (
        "inbound no-user",
        Found(ENTRY, True),
        Owner(1000, "alice"),
        replace(DEFAULT, inbound="no-user"),
        NO_USER,
        "reply.inbound",
    ),
    (
        "inbound answered",
        Found(ENTRY, True),
        Owner(1000, "alice"),
        replace(DEFAULT, inbound="answer"),
        UserIdReply("alice", "UNIX"),
        "owner",
    ),
    ("inbound closed socket", Found(ORPHAN, True), None, DEFAULT, NO_USER, "no-owner"),
]


@pytest.mark.parametrize(
    ("found", "owner", "config", "reply", "rule"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decide(found, owner, config, reply, rule) -> None:
    """Each lookup outcome gets the reply PROTOCOL.md names, and the rule that chose it."""
    decision = decide(found, owner, config)
    assert (decision.reply, decision.rule) == (reply, rule)


@pytest.mark.parametrize(
    ("reply", "masked"),
    [
        (NO_USER, UNKNOWN),
        (HIDDEN, UNKNOWN),
        (UNKNOWN, UNKNOWN),
        (ErrorReply(ErrorType.INVALID_PORT), ErrorReply(ErrorType.INVALID_PORT)),
        (UserIdReply("alice", "UNIX"), UserIdReply("alice", "UNIX")),
    ],
)
def test_mask_errors(reply, masked) -> None:
    """mask_errors turns NO-USER and HIDDEN-USER into UNKNOWN-ERROR, and nothing else."""
    assert mask(reply, replace(DEFAULT, mask_errors=True)) == masked
    assert mask(reply, DEFAULT) == reply
