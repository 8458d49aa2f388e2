"""Process-level start-up: dropping root, detaching from the terminal, the pid file.

Kept apart from the loop (server.py) and the commands (cli.py) because both the
daemon and its tests need it, and none of it is about ident.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import logging
import os
import pwd
import selectors
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from types import FrameType

log = logging.getLogger(__name__)


class PrivilegeError(Exception):
    """Privileges that could not be dropped as configured."""


_libc = ctypes.CDLL(None, use_errno=True)
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
CAP_SETGID, CAP_SETUID = 6, 7
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise PrivilegeError(f"{what}: {os.strerror(code)}")


def set_no_new_privileges() -> None:
    """No program this process runs can gain privileges (set-user-ID files, file
    capabilities): prctl(PR_SET_NO_NEW_PRIVS), which no one can undo."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "cannot set no-new-privileges")


def keep_only_capabilities(keep: frozenset[int]) -> None:
    """Keep only the capabilities `keep` of root's: in the effective and permitted sets
    (capset(2)) and, where this process may change it, the bounding set; none inherited
    or ambient. Without CAP_SETPCAP (systemd's CapabilityBoundingSet has already cut the
    bounding set) the bounding set is left as it is."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:
            last = int(file.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        if cap in keep or _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == 0:
            continue
        code = ctypes.get_errno()
        if code not in (errno.EPERM, errno.EINVAL):
            raise PrivilegeError(f"cannot drop capability {cap}: {os.strerror(code)}")
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    mask = sum(1 << cap for cap in keep)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(
        _CapData(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0), _CapData(mask >> 32, mask >> 32, 0)
    )
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"cannot limit capabilities: {os.strerror(ctypes.get_errno())}")


def held_capabilities() -> int:
    """This process's permitted capabilities (capget(2)), as one mask: 0 when it holds
    none (the ambient and effective sets are never larger)."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"cannot read capabilities: {os.strerror(ctypes.get_errno())}")
    return int(data[0].permitted) | int(data[1].permitted) << 32


def close_inherited_descriptors(keep: frozenset[int] = frozenset()) -> None:
    """Close every descriptor above standard error except `keep` (the sockets systemd
    passed): whatever the starting process left open (a root-only file, a socket) must
    not stay with the daemon once it runs unprivileged, nor reach the helper."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: every possible descriptor
        fds = list(range(3, min(os.sysconf("SC_OPEN_MAX"), 1 << 16)))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
                os.close(fd)


def drop_privileges(user: str, group: str, keep_root: bool, fallback: str = "") -> str:
    """Become `user` (and `group`, or the user's primary group), with no supplementary
    groups, and prove root cannot be regained; no program it runs can gain privileges.
    Return a sentence saying what happened. With `fallback`, a host without `user` (the
    default account, not created yet) gets that account instead, and a warning."""
    if os.geteuid() != 0:
        # Started unprivileged (systemd's User=), perhaps with capabilities to bind port
        # 113 and open the connection-tracking table (AmbientCapabilities=): all opened
        # by now, so none is kept.
        held = held_capabilities()
        if held:
            keep_only_capabilities(frozenset())
            if held_capabilities():
                raise PrivilegeError("capabilities were not dropped")
        set_no_new_privileges()
        said = f"running as uid {os.geteuid()}, gid {os.getegid()} (not started as root)"
        return said + ("; its capabilities dropped" if held else "")
    if keep_root:
        return "running as root, because server.keep_root is true"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        if not fallback:
            raise PrivilegeError(f"server.user: no user named {user!r} on this host") from None
        log.warning(
            "there is no account %r: running as %r, which every other process running as "
            "%r may signal or trace; create the account: useradd --system --user-group "
            "--no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin %s",
            user,
            fallback,
            fallback,
            user,
        )
        user = fallback
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise PrivilegeError(f"server.user: no user named {user!r} on this host") from None
    uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"server.group: no group named {group!r} on this host") from None
    if uid == 0 or gid == 0:
        raise PrivilegeError(
            f"server.user {user!r} and its group must not be uid or gid 0; to run as root "
            "anyway, set server.keep_root = true"
        )
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if 0 in os.getresuid() or 0 in os.getresgid() or os.getgroups():
        raise PrivilegeError("privileges were not dropped: a uid or gid is still 0")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("root could be regained after dropping privileges")
    set_no_new_privileges()
    return f"dropped privileges to user {user} (uid {uid}), gid {gid}"


def daemonize() -> Callable[[], None]:
    """Detach from the terminal and session (double fork).

    The original process waits until the detached one calls the returned
    function, so a service manager sees it exit 0 only once the daemon serves,
    and exit 1 if the daemon died on the way; until then errors still reach the
    terminal, after it standard input and output go to /dev/null.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        status = os.read(read_end, 1)
        os._exit(0 if status == b"1" else 1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")

    def ready() -> None:
        os.write(write_end, b"1")
        os.close(write_end)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)

    return ready


class PidFileError(Exception):
    """A pid file path that root must not write through; the message says why."""


def _safe_directory(path: str) -> int:
    """A descriptor of the directory of `path`, opened one component at a time from /
    without following a symbolic link. The directory reached must be owned by root (or
    by this process's user when it is not root) and writable by no one else: whoever can
    write it could make root's write land on a file of their choice. Directories above it
    need no check: the walk holds each one open, so renaming them changes nothing, and
    what an attacker could put in its place would be theirs, and refused."""
    directory = os.path.dirname(os.path.abspath(path))
    euid = os.geteuid()
    trusted = {0, euid}
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = "/"
    try:
        for part in [p for p in directory.split("/") if p]:
            walked = os.path.join(walked, part)
            try:
                child = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PidFileError(f"{walked} is not a directory (a symbolic link?)") from None
                raise PidFileError(f"cannot open {walked}: {err.strerror}") from None
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if info.st_uid not in trusted:
            owner = "root" if euid == 0 else f"root or uid {euid}"
            raise PidFileError(
                f"{walked} is owned by uid {info.st_uid}: the pid file's directory must be "
                f"owned by {owner}"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PidFileError(
                f"{walked} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_pid_file(path: str) -> None:
    """Raise PidFileError if `path` is not a safe place for the pid file: its directory
    must be writable only by root (or by this user when not root)."""
    os.close(_safe_directory(path))


def write_pid_file(path: str) -> None:
    """Write this process's pid to `path`, replacing it atomically.

    The directory is checked first (PidFileError). The new file is created with
    O_EXCL and O_NOFOLLOW under a temporary name, its mode set on the descriptor,
    and renamed over `path`: a link at either name is replaced, never followed.
    """
    dir_fd = _safe_directory(path)
    name = os.path.basename(path)
    temporary = f".{name}.{os.getpid()}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=dir_fd)  # left by a crash of this same pid
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=dir_fd,
        )
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        finally:
            os.close(fd)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def remove_pid_file(path: str) -> None:
    """Remove the pid file if this process may (after dropping root it often may not)."""
    try:
        os.unlink(path)
    except OSError as err:
        log.debug("pid file %s left in place: %s", path, err.strerror)


class Notifier:
    """Tells systemd how the service is doing (sd_notify(3)): READY, RELOADING, STOPPING.

    The socket is opened at start, before root is dropped, and kept; without
    $NOTIFY_SOCKET (not run by systemd as Type=notify), every call does nothing.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.sock: socket.socket | None = None
        path = environ.get("NOTIFY_SOCKET", "")
        if not path:
            return
        if path.startswith("@"):  # an abstract socket
            path = "\0" + path[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
        except OSError as err:
            sock.close()
            log.warning("cannot reach NOTIFY_SOCKET %s: %s", path.lstrip("\0"), err.strerror)
            return
        self.sock = sock

    def notify(self, *fields: str) -> None:
        """Send KEY=VALUE fields, such as "READY=1"; a failure is logged, never raised."""
        if self.sock is None:
            return
        try:
            self.sock.send("\n".join(fields).encode())
        except OSError as err:
            log.warning("cannot notify the service manager: %s", err.strerror)

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic time, as systemd 253 and later want it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


SD_LISTEN_FDS_START = 3


def activated_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The listening sockets the service manager passed (sd_listen_fds(3)), or [] when it
    passed none to this process; ValueError if one is not a listening TCP socket. The
    variables are removed, so children do not take them."""
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    names = environ.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise ValueError(f"file descriptor {fd} is not a socket: {err.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.close()
            raise ValueError(
                f"passed socket {fd} ({names or 'unnamed'}) is not a listening TCP socket"
            )
        sock.setblocking(False)
        sockets.append(sock)
    if sockets:
        log.info(
            "listening sockets passed by the service manager: %d (%s)",
            len(sockets),
            names.replace(":", ", ") or "unnamed",
        )
    return sockets


class SignalWakeup:
    """The signals the daemon handles, for its loop: a handler notes each one, and a byte
    on a socket pair wakes the loop's select (signal.set_wakeup_fd)."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.pending: list[int] = []
        self._reader, self._writer = socket.socketpair()
        for sock in (self._reader, self._writer):
            sock.setblocking(False)
        selector.register(self._reader, selectors.EVENT_READ, self._drain)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle the signals while inside; the previous handlers come back after."""
        previous = {signum: signal.signal(signum, self._note) for signum in self.HANDLED}
        previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        try:
            yield
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def take(self) -> Iterator[int]:
        """The signals that came, oldest first, each once."""
        while self.pending:
            yield self.pending.pop(0)

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def _drain(self, mask: int) -> None:
        try:
            while self._reader.recv(512):
                pass
        except BlockingIOError:
            pass
