"""Audit tokens: replies opaque to the querier that the admin can turn back into facts.

A token is AES-256-GCM (from the `cryptography` package, the optional extra
"tokens") over the owner's uid, the time and the connection, sent as
URL-safe base64 without padding:

    key id (1 byte) | nonce (12) | ciphertext of the facts (50) | tag (16)

The key id is authenticated too. The key file holds one key per line,
"ID:BASE64", the last line the current key; older lines stay so that older
tokens can still be decoded (key rotation). `procident token-key` writes it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import os
import re
import stat
import struct
from dataclasses import dataclass

from procident.lookup import ConnectionId, Endpoint

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = 1
MAX_KEY_FILE = 1 << 16  # 255 keys take about 12 KiB
_FACTS = struct.Struct("!BqIB16sH16sH")  # version, time, uid, ip version, local, remote
_KEY_LINE = re.compile(r"([0-9]{1,3}):([A-Za-z0-9_=-]+)")


class TokenError(Exception):
    """A key file or token that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class TokenFacts:
    """What a token says: who owned which connection, and when."""

    uid: int
    time: int  # seconds since the epoch
    conn: ConnectionId
    key_id: int


def _aead(key: bytes):  # type: ignore[no-untyped-def]
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise TokenError(
            'tokens need the "cryptography" package: pip install "procident[tokens]"'
        ) from None
    return AESGCM(key)


def available() -> bool:
    """Whether the cryptography package is installed."""
    try:
        import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
    except ImportError:
        return False
    return True


def parse_keys(text: str, source: str = "key file") -> dict[int, bytes]:
    """Key id -> key, in file order (the last is the current key); TokenError if bad."""
    keys: dict[int, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _KEY_LINE.fullmatch(line)
        if match is None:
            raise TokenError(f"{source} line {number}: not ID:BASE64-KEY")
        key_id = int(match[1])
        try:
            key = base64.urlsafe_b64decode(match[2] + "=" * (-len(match[2]) % 4))
        except (binascii.Error, ValueError):
            raise TokenError(f"{source} line {number}: the key is not base64") from None
        if not 1 <= key_id <= 255:
            raise TokenError(f"{source} line {number}: key id {key_id} is not 1 to 255")
        if len(key) != KEY_BYTES:
            raise TokenError(f"{source} line {number}: the key is not {KEY_BYTES} bytes")
        if key_id in keys:
            raise TokenError(f"{source} line {number}: key id {key_id} appears twice")
        keys[key_id] = key
    if not keys:
        raise TokenError(f"{source}: holds no key")
    return keys


def _open_key_file(path: str, flags: int, account: int = -1) -> int:
    """Open the key file without following a link and without blocking (a FIFO at the
    path must not hang the daemon), then check what was opened: a regular file, owned by
    root, the running user or `account` (the daemon's, which procident.service starts
    as), readable and writable by that owner alone."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise TokenError(f"{path}: is a symbolic link; name the file itself") from None
        if err.errno in (errno.EISDIR, errno.ENXIO):
            raise TokenError(f"{path}: is not a regular file") from None
        raise TokenError(f"{path}: cannot read: {err.strerror}") from None
    try:
        info = os.fstat(fd)
        euid = os.geteuid()
        if not stat.S_ISREG(info.st_mode):
            raise TokenError(f"{path}: is not a regular file")
        owners = {0, euid, account} - {-1}
        if info.st_uid not in owners:
            who = " or ".join(["root"] + [f"uid {uid}" for uid in sorted(owners - {0})])
            raise TokenError(f"{path}: is owned by uid {info.st_uid}; it must be owned by {who}")
        if info.st_mode & 0o077:
            raise TokenError(
                f"{path}: must not be readable or writable by group or others (chmod 600)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_keys(fd: int, path: str) -> dict[int, bytes]:
    data = b""
    while len(data) <= MAX_KEY_FILE:
        chunk = os.read(fd, MAX_KEY_FILE + 1 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_KEY_FILE:
        raise TokenError(f"{path}: larger than {MAX_KEY_FILE} bytes")
    return parse_keys(data.decode("ascii", "replace"), path)


def load_keys(path: str, account: int = -1) -> dict[int, bytes]:
    """Read a key file (a private regular file of root, this user or `account`; see
    _open_key_file)."""
    fd = _open_key_file(path, os.O_RDONLY, account)
    try:
        return _read_keys(fd, path)
    finally:
        os.close(fd)


def add_key(path: str, account: int = -1) -> int:
    """Append a new random key to the key file (created 0600 if missing); return its id.

    A new file made by root in a directory of `account` (the daemon's account, whose
    StateDirectory= procident.service makes) is given to that account, so the daemon,
    started as it, can read it; anywhere else it is root's.

    New tokens use it at once (after a restart or reload); older keys stay, so
    older tokens can still be decoded. Delete old lines when those tokens may go.
    An existing file is checked as load_keys checks it, through the same descriptor
    that is then appended to; a new one is created with O_EXCL, never through a link.
    """
    try:
        fd = _open_key_file(path, os.O_RDWR | os.O_APPEND, account)
        keys = _read_keys(fd, path)
    except TokenError:
        if os.path.lexists(path):
            raise
        directory = os.path.dirname(path)
        if directory and not os.path.lexists(directory):
            # A fresh host has no /var/lib/procident yet: made for the key, root's only
            # (its parent must exist: nothing more is made).
            os.mkdir(directory, 0o700)
        fd = os.open(
            path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        keys = {}
        try:
            place = os.stat(directory or ".")
            if account > 0 and os.geteuid() == 0 and place.st_uid == account:
                os.fchown(fd, account, place.st_gid)
        except BaseException:
            os.close(fd)
            raise
    try:
        key_id = max(keys, default=0) % 255 + 1
        if key_id in keys:
            raise TokenError(f"{path}: key id {key_id} is in use; remove old keys first")
        line = f"{key_id}:{base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode()}\n"
        os.write(fd, line.encode("ascii"))
    finally:
        os.close(fd)
    return key_id


def _packed(endpoint: Endpoint) -> bytes:
    return endpoint.address.packed.rjust(16, b"\0")


class TokenMaker:
    """Makes and reads tokens with the keys of one key file."""

    def __init__(self, keys: dict[int, bytes]) -> None:
        if not keys:
            raise TokenError("no key")
        self.keys = dict(keys)
        self.current = list(keys)[-1]
        self._aeads = {key_id: _aead(key) for key_id, key in keys.items()}

    def make(self, uid: int, when: float, conn: ConnectionId) -> str:
        """A token for `uid` owning `conn` at `when` (seconds since the epoch)."""
        version = conn.local.address.version
        facts = _FACTS.pack(
            VERSION,
            int(when),
            uid,
            version,
            _packed(conn.local),
            conn.local.port,
            _packed(conn.remote),
            conn.remote.port,
        )
        header = bytes([self.current])
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aeads[self.current].encrypt(nonce, facts, header)
        return base64.urlsafe_b64encode(header + nonce + sealed).rstrip(b"=").decode("ascii")

    def read(self, token: str) -> TokenFacts:
        """The facts in `token`; TokenError if it was not made with these keys, or altered."""
        try:
            raw = base64.urlsafe_b64decode(token.strip() + "=" * (-len(token.strip()) % 4))
        except (binascii.Error, ValueError):
            raise TokenError("not a token: not base64") from None
        if len(raw) != 1 + NONCE_BYTES + _FACTS.size + 16:
            raise TokenError("not a token: wrong length")
        key_id = raw[0]
        aead = self._aeads.get(key_id)
        if aead is None:
            raise TokenError(f"made with key {key_id}, which is not in the key file")
        from cryptography.exceptions import InvalidTag

        try:
            facts = aead.decrypt(raw[1 : 1 + NONCE_BYTES], raw[1 + NONCE_BYTES :], raw[:1])
        except InvalidTag:
            raise TokenError("not made with this key, or altered") from None
        version, when, uid, family, local, lport, remote, rport = _FACTS.unpack(facts)
        if version != VERSION or family not in (4, 6):
            raise TokenError("a token of an unknown version")
        size = 4 if family == 4 else 16
        conn = ConnectionId(
            Endpoint(ipaddress.ip_address(local[-size:]), lport),
            Endpoint(ipaddress.ip_address(remote[-size:]), rport),
        )
        return TokenFacts(uid, when, conn, key_id)
