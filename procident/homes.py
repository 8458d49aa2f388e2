"""Reading the files users keep in their home directories, safely.

The daemon runs as an unprivileged user, which cannot read into home
directories of mode 0700. So, when the configuration reads user files, a
small helper process is forked before privileges are dropped and keeps root
for one job only: given a uid, read the fixed list of files (USER_FILES) in
that account's home directory, with its effective uid and groups set to the
account's, so it can never read anything the account itself could not. Each
file is opened without following a symbolic link, must be a regular file owned
by the account (or root), not writable by others, and no larger than the cap.

The daemon asks over a socketpair and never waits for the answer: its event loop
sends the request (HomeHelper.ask), goes on serving, and takes the answer when the
socket is readable (collect); a query waiting for it is answered without the file after
HELPER_TIMEOUT seconds. `serve --inetd`, one connection per process, asks and waits
(read).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procident.config import UsersConfig
from procident.process import (
    CAP_SETGID,
    CAP_SETUID,
    keep_only_capabilities,
    set_no_new_privileges,
)
from procident.userfiles import (
    IDENT,
    NOIDENT,
    OIDENTD_FILES,
    PROCIDENT_FILE,
    ChoiceFile,
    UserFileError,
    UserFiles,
    parse_oidentd_file,
    parse_procident_file,
)

log = logging.getLogger(__name__)

USER_FILES = (NOIDENT, IDENT, PROCIDENT_FILE, *OIDENTD_FILES)
_PRESENCE_ONLY = (NOIDENT, IDENT)
HELPER_TIMEOUT = 1.0
MAX_OUTSTANDING = 256  # requests asked from the loop and not answered yet
MAX_REQUEST_SIZE = 32  # a request number, a uid and a size cap
# status of one file in a reply
ABSENT, PRESENT, CONTENT, REFUSED = 0, 1, 2, 3
_ITEM = struct.Struct("!BI")
_REQUEST = struct.Struct("!QII")  # request number, uid, size cap
_REPLY_HEAD = struct.Struct("!Q")  # the request number the reply answers


@dataclass(frozen=True, slots=True)
class FileState:
    """One file as the reader found it: absent, present (contents not read), its
    contents, or refused with a reason."""

    status: int
    data: bytes = b""

    @property
    def reason(self) -> str:
        return self.data.decode("utf-8", "replace")

    def describe(self) -> str:
        """What `check-config --user` shows for the file."""
        if self.status == ABSENT:
            return "absent"
        if self.status == PRESENT:
            return "present"
        if self.status == CONTENT:
            return f"{len(self.data)} bytes"
        return f"not used: {self.reason}"


def _check_and_read(path: str, uid: int, max_size: int, contents: bool) -> FileState:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        if err.errno == errno.ENOENT or err.errno == errno.ENOTDIR:
            return FileState(ABSENT)
        if err.errno == errno.ELOOP:
            return FileState(REFUSED, b"is a symbolic link")
        return FileState(REFUSED, f"cannot open: {err.strerror}".encode())
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return FileState(REFUSED, b"is not a regular file")
        if info.st_uid not in (uid, 0):
            return FileState(REFUSED, f"is owned by uid {info.st_uid}, not the user".encode())
        if info.st_mode & stat.S_IWOTH:
            return FileState(REFUSED, b"is writable by everyone")
        if not contents:
            return FileState(PRESENT)
        if info.st_size > max_size:
            return FileState(REFUSED, f"is larger than {max_size} bytes".encode())
        data = os.read(fd, max_size + 1)
        if len(data) > max_size:
            return FileState(REFUSED, f"is larger than {max_size} bytes".encode())
        return FileState(CONTENT, data)
    except OSError as err:
        return FileState(REFUSED, f"cannot read: {err.strerror}".encode())
    finally:
        os.close(fd)


def read_home_files(
    uid: int, max_size: int, accounts: Callable[[int], Any] = pwd.getpwuid
) -> dict[str, FileState]:
    """Read USER_FILES in the home directory of `uid`, as that account when run as root.

    `accounts` maps a uid to its passwd entry (pwd.getpwuid; tests give their own).
    """
    try:
        account = accounts(uid)
    except KeyError:
        return {}
    home = account.pw_dir
    if not home.startswith("/"):
        return {}
    as_user = os.geteuid() == 0 and uid != 0
    if as_user:
        groups = os.getgroups()
        os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
        os.setegid(account.pw_gid)
        os.seteuid(uid)
    try:
        return {
            name: _check_and_read(
                os.path.join(home, name), uid, max_size, name not in _PRESENCE_ONLY
            )
            for name in USER_FILES
        }
    finally:
        if as_user:
            os.seteuid(0)
            os.setegid(0)
            os.setgroups(groups)


def describe_files(states: dict[str, FileState], files: UserFiles, granted: bool) -> list[str]:
    """What `check-config --user` shows of one user's files: each file, each choice read
    from them, and a note when no rule lets users choose (`granted`)."""
    lines = [f"~/{name}: {states.get(name, FileState(ABSENT)).describe()}" for name in USER_FILES]
    if files.choices is not None:
        lines.append(f"choices read from {files.choices.path}:")
        for choice in (*files.choices.choices, files.choices.default):
            if choice is not None:
                lines.append(f"  {choice.where}: {choice.describe()}")
        if not granted:
            lines.append("note: no rule has user_may, so these choices are not used")
    return lines


def encode_states(states: dict[str, FileState]) -> bytes:
    """The helper's reply: one status and length-prefixed data per file of USER_FILES."""
    out = bytearray(b"\x01" if states else b"\x00")  # 0: no such account
    for name in USER_FILES:
        state = states.get(name, FileState(ABSENT))
        out += _ITEM.pack(state.status, len(state.data)) + state.data
    return bytes(out)


def decode_states(data: bytes) -> dict[str, FileState]:
    """Undo encode_states; ValueError on anything malformed."""
    if not data or data[0] not in (0, 1):
        raise ValueError("malformed reply from the user-file helper")
    if data[0] == 0:
        return {}
    states: dict[str, FileState] = {}
    offset = 1
    for name in USER_FILES:
        if offset + _ITEM.size > len(data):
            raise ValueError("truncated reply from the user-file helper")
        status, length = _ITEM.unpack_from(data, offset)
        offset += _ITEM.size
        if status > REFUSED or offset + length > len(data):
            raise ValueError("malformed reply from the user-file helper")
        states[name] = FileState(status, data[offset : offset + length])
        offset += length
    return states


def user_files_from(states: dict[str, FileState], users: UsersConfig) -> UserFiles:
    """What the files say: presence of ~/.noident and ~/.ident, and the first choice
    file that parses (~/.procident.toml, else oidentd's). Problems are listed."""
    problems: list[str] = []
    for name, state in states.items():
        if state.status == REFUSED:
            problems.append(f"~/{name} {state.reason}")
    choices: ChoiceFile | None = None
    candidates: list[tuple[str, Callable[[str, str], ChoiceFile]]] = [
        (PROCIDENT_FILE, parse_procident_file)
    ]
    if users.oidentd_files:
        # oidentd reads ~/.config/oidentd.conf, and ~/.oidentd.conf only without it.
        oidentd = next(
            (n for n in OIDENTD_FILES if states.get(n, FileState(ABSENT)).status != ABSENT),
            None,
        )
        if oidentd is not None:
            candidates.append((oidentd, parse_oidentd_file))
    for name, parse in candidates:
        found = states.get(name)
        if found is None or found.status != CONTENT:
            continue
        try:
            text = found.data.decode("utf-8")
            choices = parse(text, f"~/{name}")
            break
        except UnicodeDecodeError:
            problems.append(f"~/{name}: not UTF-8 text")
        except UserFileError as err:
            problems.append(f"~/{name}: {err}")
        except Exception as err:  # a parser's bug must not make the user's file fatal
            problems.append(f"~/{name}: cannot be parsed ({type(err).__name__})")
    return UserFiles(
        noident=states.get(NOIDENT, FileState(ABSENT)).status != ABSENT,
        ident=states.get(IDENT, FileState(ABSENT)).status in (PRESENT, CONTENT),
        choices=choices,
        problems=tuple(problems),
    )


class HelperError(Exception):
    """The user-file helper did not answer."""


class HomeHelper:
    """The root helper process that reads user files for the unprivileged daemon."""

    def __init__(
        self,
        reader: Callable[[int, int], dict[str, FileState]] = read_home_files,
        connect: str = "",
    ) -> None:
        """Fork the helper; or, with `connect` (a daemon started unprivileged), reach the
        one systemd runs as root on that socket (procident-helper.socket): `procident
        helper`, serving this connection with serve_connected."""
        self.requests = 0
        # Requests asked from the loop and not answered yet: number -> (uid, when sent).
        self.outstanding: dict[int, tuple[int, float]] = {}
        self.gone = False
        self.pid = 0
        if connect:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self.sock.connect(connect)
            except OSError as err:
                self.sock.close()
                raise HelperError(
                    f"cannot reach the user-file helper at {connect}: {err.strerror}"
                ) from None
            _large_buffers(self.sock)
            return
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (self.sock, child):
            _large_buffers(end)
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the child
            # Keep nothing of the daemon's but this socket and stderr: no listeners.
            keep = child.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
            code = 0
            try:
                _serve_helper(child, reader)
            except BaseException:
                code = 1
            os._exit(code)
        child.close()

    def read(self, uid: int, max_size: int) -> dict[str, FileState]:
        """The states of the files of `uid`; HelperError if the helper fails to answer
        within HELPER_TIMEOUT seconds."""
        self.requests += 1
        number = self.requests
        deadline = time.monotonic() + HELPER_TIMEOUT
        try:
            self.sock.settimeout(HELPER_TIMEOUT)
            self.sock.send(_REQUEST.pack(number, uid, max_size))
            while True:
                # Each reply carries its request's number: a late answer to an earlier
                # request that timed out (another user's files) is skipped, never used.
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = self.sock.recv(_REPLY_HEAD.size + len(USER_FILES) * (max_size + 512))
                if not data:
                    raise HelperError("the user-file helper has exited")
                if len(data) >= _REPLY_HEAD.size and _REPLY_HEAD.unpack_from(data)[0] == number:
                    break
        except OSError as err:
            raise HelperError(f"the user-file helper did not answer: {err}") from None
        try:
            return decode_states(data[_REPLY_HEAD.size :])
        except ValueError as err:
            raise HelperError(str(err)) from None

    # -- asked from the event loop: never waits ---------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def ask(self, uid: int, max_size: int, now: float) -> bool:
        """Send a request for `uid`'s files without waiting (one at a time per uid); False
        when it cannot be sent (the helper is gone, or MAX_OUTSTANDING are unanswered)."""
        if self.gone:
            return False
        if any(asked == uid for asked, _ in self.outstanding.values()):
            return True
        if len(self.outstanding) >= MAX_OUTSTANDING:
            return False
        self.requests += 1
        try:
            self.sock.send(_REQUEST.pack(self.requests, uid, max_size), socket.MSG_DONTWAIT)
        except OSError:  # the helper is gone, or not reading at all
            return False
        self.outstanding[self.requests] = (uid, now)
        return True

    def collect(self) -> list[tuple[int, dict[str, FileState] | None]]:
        """The answers that have come, without waiting: (uid, states), states None when
        the answer was malformed. Answers to no outstanding request are dropped: an
        answer is only ever used for the request it carries the number of."""
        answers: list[tuple[int, dict[str, FileState] | None]] = []
        while not self.gone:
            try:
                data = self.sock.recv(
                    _REPLY_HEAD.size + len(USER_FILES) * (65536 + 512), socket.MSG_DONTWAIT
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.gone = True  # it exited: every later ask fails at once
                break
            if len(data) < _REPLY_HEAD.size:
                continue
            asked = self.outstanding.pop(_REPLY_HEAD.unpack_from(data)[0], None)
            if asked is None:
                continue
            try:
                answers.append((asked[0], decode_states(data[_REPLY_HEAD.size :])))
            except ValueError:
                answers.append((asked[0], None))
        return answers

    def overdue(self, now: float) -> bool:
        """Whether a request has gone unanswered for HELPER_TIMEOUT: the helper is stuck
        (a hung NFS home directory), so asking more would only make more clients wait."""
        return self.gone or any(
            now - sent >= HELPER_TIMEOUT for _, sent in self.outstanding.values()
        )

    def close(self) -> None:
        """Stop the helper: it exits when its end of the socket closes."""
        self.sock.close()
        if self.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def _large_buffers(sock: socket.socket) -> None:
    """Room for a reply of up to three files of 64 KiB."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)


_PEER = struct.Struct("3i")  # struct ucred: pid, uid, gid


def serve_connected(sock: socket.socket) -> None:
    """`procident helper`: serve the daemon connected on `sock`, as root, until it hangs
    up. Only root and the owner of the listening socket's file (SocketUser=, the
    daemon's account) may ask; anyone else is refused (HelperError) before a request."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise HelperError("standard input is not a Unix seqpacket socket")
    pid, uid, _ = _PEER.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER.size))
    path = sock.getsockname()
    owner = os.lstat(path).st_uid if isinstance(path, str) and path.startswith("/") else 0
    if uid not in (0, owner):
        raise HelperError(
            f"refused a connection from uid {uid} (pid {pid}): only root and uid {owner}, "
            f"the owner of {path or 'the socket'}, may ask"
        )
    sock.setblocking(True)
    _large_buffers(sock)
    _serve_helper(sock, read_home_files)


def _serve_helper(
    sock: socket.socket, reader: Callable[[int, int], dict[str, FileState]]
) -> None:  # pragma: no cover - runs in the child
    # The daemon's process group may get ^C or SIGHUP meant for the daemon; the
    # helper ends when the daemon does, as its socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.setgroups([])
    if os.geteuid() == 0:
        # Root for one job: taking each user's uid and groups (CAP_SETUID, CAP_SETGID)
        # to read as them. Nothing else: no reading past permissions, no other power.
        keep_only_capabilities(frozenset({CAP_SETUID, CAP_SETGID}))
    set_no_new_privileges()
    while True:
        request = sock.recv(MAX_REQUEST_SIZE)
        if not request:
            return
        if len(request) != _REQUEST.size:
            continue
        number, uid, max_size = _REQUEST.unpack(request)
        max_size = min(max_size, 65536)
        try:
            states = reader(uid, max_size)
        except OSError as err:
            states = {name: FileState(REFUSED, str(err).encode()) for name in USER_FILES}
        sock.send(_REPLY_HEAD.pack(number) + encode_states(states))
