"""Process-level start-up: dropping root, detaching from the terminal, the pid file.

Kept apart from the loop (server.py) and the commands (cli.py) because both the
daemon and its tests need it, and none of it is about ident.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from collections.abc import Callable

log = logging.getLogger(__name__)


class PrivilegeError(Exception):
    """Privileges that could not be dropped as configured."""


def drop_privileges(user: str, group: str, keep_root: bool) -> str:
    """Become `user` (and `group`, or the user's primary group), with no supplementary
    groups, and prove root cannot be regained. Return a sentence saying what happened."""
    if os.geteuid() != 0:
        return f"running as uid {os.geteuid()}, gid {os.getegid()} (not started as root)"
    if keep_root:
        return "running as root, because server.keep_root is true"
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


def write_pid_file(path: str) -> None:
    """Write this process's pid to `path`, replacing it atomically."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="ascii") as file:
        file.write(f"{os.getpid()}\n")
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def remove_pid_file(path: str) -> None:
    """Remove the pid file if this process may (after dropping root it often may not)."""
    try:
        os.unlink(path)
    except OSError as err:
        log.debug("pid file %s left in place: %s", path, err.strerror)
