"""Audit tokens: round trip, tampering, key files and rotation."""

from __future__ import annotations

import base64
import ipaddress
import os
from pathlib import Path

import pytest

from procident.lookup import ConnectionId, Endpoint
from procident.protocol import UserIdReply, format_reply
from procident.tokens import TokenError, TokenMaker, add_key, load_keys, parse_keys

CONN4 = ConnectionId(
    Endpoint(ipaddress.IPv4Address("192.0.2.1"), 40001),
    Endpoint(ipaddress.IPv4Address("198.51.100.7"), 6667),
)
CONN6 = ConnectionId(
    Endpoint(ipaddress.IPv6Address("2001:db8::1"), 65535),
    Endpoint(ipaddress.IPv6Address("2001:db8:ffff::7"), 1),
)
KEY = {1: bytes(range(32))}


@pytest.mark.parametrize("conn", [CONN4, CONN6])
@pytest.mark.parametrize("uid", [0, 1000, 2**31, 2**32 - 1])
def test_round_trip(conn: ConnectionId, uid: int) -> None:
    """A token gives back the uid (all 32 bits), time and connection, IPv4 and IPv6."""
    maker = TokenMaker(KEY)
    token = maker.make(uid, 1_795_000_000.7, conn)
    facts = maker.read(token)
    assert (facts.uid, facts.time, facts.conn, facts.key_id) == (uid, 1_795_000_000, conn, 1)


def test_tokens_are_opaque_and_fresh() -> None:
    """The same facts give a different token each time, none showing the uid or ports,
    and every token is a valid user id on the wire."""
    maker = TokenMaker(KEY)
    tokens = {maker.make(1000, 0, CONN4) for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert "1000" not in token and "6667" not in token and token.isascii()
        format_reply(1, 1, UserIdReply(token, "OTHER"))


def test_tampering_is_detected() -> None:
    """Flipping any bit of a token makes it unreadable, never a different answer."""
    maker = TokenMaker(KEY)
    raw = bytearray(base64.urlsafe_b64decode(maker.make(1000, 5, CONN4) + "=="))
    for index in range(len(raw)):
        altered = bytearray(raw)
        altered[index] ^= 0x01
        token = base64.urlsafe_b64encode(bytes(altered)).rstrip(b"=").decode()
        with pytest.raises(TokenError):
            maker.read(token)


@pytest.mark.parametrize("token", ["", "not base64!", "QUJD", "A" * 200])
def test_garbage_is_not_a_token(token: str) -> None:
    """Anything else is refused with a reason."""
    with pytest.raises(TokenError):
        TokenMaker(KEY).read(token)


def test_another_key_cannot_read() -> None:
    """A token made with one key is refused by a maker with another key of the same id."""
    token = TokenMaker(KEY).make(1000, 5, CONN4)
    with pytest.raises(TokenError, match="not made with this key, or altered"):
        TokenMaker({1: bytes(32)}).read(token)
    with pytest.raises(TokenError, match="made with key 1, which is not in the key file"):
        TokenMaker({2: bytes(32)}).read(token)


def test_key_file_created_private_and_rotated(tmp_path: Path) -> None:
    """token-key creates the file 0600; a second key becomes current, and tokens made with
    the first can still be read."""
    path = str(tmp_path / "token.key")
    assert add_key(path) == 1
    assert os.stat(path).st_mode & 0o777 == 0o600
    old = TokenMaker(load_keys(path))
    token = old.make(1000, 5, CONN4)
    assert add_key(path) == 2
    new = TokenMaker(load_keys(path))
    assert new.current == 2 and new.read(token).key_id == 1
    assert new.read(new.make(7, 5, CONN6)).key_id == 2


def test_key_file_must_be_private(tmp_path: Path) -> None:
    """A key file others can read is refused: anyone who reads it can decode tokens."""
    path = tmp_path / "token.key"
    add_key(str(path))
    path.chmod(0o644)
    with pytest.raises(TokenError, match="must not be readable or writable by group or others"):
        load_keys(str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        ("1:" + "A" * 10, "the key is not 32 bytes"),
        ("key", "line 1: not ID:BASE64-KEY"),
        ("0:" + base64.urlsafe_b64encode(bytes(32)).decode(), "key id 0 is not 1 to 255"),
        (
            "\n".join(["3:" + base64.urlsafe_b64encode(bytes(32)).decode()] * 2),
            "line 2: key id 3 appears twice",
        ),
    ],
)
def test_bad_key_files(text: str, message: str) -> None:
    """A key file with a mistake is refused with its line and the reason."""
    with pytest.raises(TokenError, match=message):
        parse_keys(text)
