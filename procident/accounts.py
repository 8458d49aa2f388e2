"""Facts about accounts for policy: login names, groups, whether a name is an account,
and what users' own files say; each cached for a while (NSS lookups scan /etc/passwd or
ask a directory service on every call).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
from collections.abc import Callable
from typing import Generic, TypeVar

from procident import policy
from procident.config import Config
from procident.homes import HELPER_TIMEOUT, FileState, HomeHelper, user_files_from
from procident.protocol import printable
from procident.userfiles import UserFiles

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


def passwd_name(uid: int) -> str | None:
    """The login name of `uid`, or None when passwd has no entry for it."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def account_groups(name: str) -> frozenset[str]:
    """The names of the groups of account `name`, primary and supplementary."""
    try:
        gid = pwd.getpwnam(name).pw_gid
    except KeyError:
        return frozenset()
    names = set()
    for group in _group_ids(name, gid):
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(group).gr_name)
    return frozenset(names)


def _group_ids(name: str, gid: int) -> list[int]:
    try:
        return os.getgrouplist(name, gid)
    except OSError:
        return [gid]


def is_account(name: str) -> bool:
    """Whether passwd has an account of that name."""
    try:
        pwd.getpwnam(name)
    except (KeyError, ValueError):
        return False
    return True


NAME_TTL = 60.0  # seconds a uid's name (or its absence) is reused
NAME_CACHE_SIZE = 4096  # uids remembered at most
PROBLEM_LOG_INTERVAL = 10.0  # seconds between two lines about one user's unusable files


class TimedCache(Generic[K, V]):
    """key -> value, each remembered for `ttl` seconds; the oldest makes room when full.

    NSS lookups scan /etc/passwd (or ask a directory service) on every call;
    on a host with many accounts that would be most of a query's cost. A
    renamed or deleted account is therefore named the old way for up to `ttl`.
    """

    def __init__(
        self, lookup: Callable[[K], V], ttl: float = NAME_TTL, size: int = NAME_CACHE_SIZE
    ):
        self.lookup = lookup
        self.ttl = ttl
        self.size = size
        self._values: dict[K, tuple[V, float]] = {}  # key -> (value, expiry)

    def get(self, key: K, now: float) -> V:
        """The value for `key` as of `now`."""
        cached = self._values.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        value = self.lookup(key)
        self.put(key, value, now)  # re-inserted last: the dict stays in expiry order
        return value

    def forget(self, key: K) -> None:
        self._values.pop(key, None)

    def put(self, key: K, value: V, now: float) -> None:
        """Remember `value` for `key` as of `now`, as get would have."""
        self._values.pop(key, None)
        if len(self._values) >= self.size:
            del self._values[next(iter(self._values))]
        self._values[key] = (value, now + self.ttl)


class UserNames(TimedCache[int, "str | None"]):
    """uid -> login name, remembered for NAME_TTL seconds."""

    def __init__(
        self,
        lookup: Callable[[int], str | None] = passwd_name,
        ttl: float = NAME_TTL,
        size: int = NAME_CACHE_SIZE,
    ) -> None:
        super().__init__(lookup, ttl, size)

    def name(self, uid: int, now: float) -> str | None:
        """The login name of `uid` as of `now`, or None when passwd has no entry."""
        return self.get(uid, now)


FileReader = Callable[[int, int], dict[str, FileState]]  # (uid, max size) -> states


class FilesPending(Exception):
    """A user's files are being read by the helper: the query waits for them (or for
    HELPER_TIMEOUT), and other queries go on meanwhile."""

    def __init__(self, uid: int) -> None:
        super().__init__(uid)
        self.uid = uid


class Accounts:
    """policy.Facts from passwd, group and the users' files, each cached for a while.

    Users' files come from `read_files` (a blocking call: inetd mode, the CLI) or from
    `helper`, asked from the event loop without waiting: user_files then raises
    FilesPending, the server calls `collect` when the helper's answers come, or
    `give_up` for a uid whose answer is late (its queries are then answered without the
    files, as if unreadable), and `settle` once the waiting queries are answered; every
    other query goes on in the meantime.
    """

    def __init__(
        self,
        config: Config,
        read_files: FileReader | None = None,
        groups: Callable[[str], frozenset[str]] = account_groups,
        account: Callable[[str], bool] = is_account,
        helper: HomeHelper | None = None,
    ) -> None:
        self.now = 0.0
        self.read_files = read_files
        self.helper = helper
        # uid -> the files that came (or the verdict that they will not in time), for
        # the queries that waited for them
        self._fresh: dict[int, UserFiles] = {}
        self._groups = TimedCache(groups)
        self._accounts = TimedCache(account)
        # uid -> (the problems last logged, when): see _report
        self._reported: dict[int, tuple[tuple[str, ...], float]] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Use a new configuration's [users] settings (forgetting files read before)."""
        self.users = config.users
        # uid -> (the files as last read, what they said): parsing is skipped when the
        # same bytes come again
        self._parses: dict[int, tuple[dict[str, FileState], UserFiles]] = {}
        self._files: TimedCache[int, UserFiles] = TimedCache(
            self._read, ttl=config.users.cache_seconds
        )

    def groups(self, owner: policy.Owner) -> frozenset[str]:
        return self._groups.get(owner.name, self.now) if owner.name else frozenset()

    def is_account(self, name: str) -> bool:
        return self._accounts.get(name, self.now)

    def user_files(self, owner: policy.Owner) -> UserFiles:
        return self._files.get(owner.uid, self.now)

    def read_again(self, uid: int) -> None:
        """The next query about `uid` reads its files again, whatever cache_seconds says
        (a bouncer may be writing them: see responder.FILE_RACE_WAIT)."""
        self._files.forget(uid)

    def collect(self, now: float) -> list[int]:
        """Take the helper's answers that have come; the uids they are for. Each serves
        the queries waiting for it (until `settle`), and is cached like any read."""
        assert self.helper is not None
        self.now = now
        uids = []
        for uid, states in self.helper.collect():
            if states is None:
                files = UserFiles(problems=("malformed answer of the helper",), unreadable=True)
            else:
                files = self._parsed(uid, states)
            self._report(uid, files.problems)
            self._fresh[uid] = files
            self._files.put(uid, files, now)
            uids.append(uid)
        return uids

    def _parsed(self, uid: int, states: dict[str, FileState]) -> UserFiles:
        """What `states` say. Files are read again at every use (cache_seconds = 0, the
        default: bouncers rewrite them for each connection, and a stale file would give
        one user another's ident), but parsed again only when what was read changed."""
        last = self._parses.get(uid)
        if last is not None and last[0] == states:
            return last[1]
        files = user_files_from(states, self.users)
        if len(self._parses) >= NAME_CACHE_SIZE:
            self._parses.clear()
        self._parses[uid] = (states, files)
        return files

    def give_up(self, uid: int) -> None:
        """The helper has not answered about `uid` in time: the queries waiting for it are
        answered without the files (until `settle`); its answer is still taken if it comes."""
        files = UserFiles(
            problems=(f"not read in time: the helper did not answer in {HELPER_TIMEOUT:g}s",),
            unreadable=True,
        )
        self._report(uid, files.problems)
        self._fresh[uid] = files

    def settle(self, uid: int) -> None:
        """The queries that waited for `uid`'s files are answered."""
        self._fresh.pop(uid, None)

    def _from_helper(self, uid: int) -> UserFiles:
        assert self.helper is not None
        fresh = self._fresh.get(uid)
        if fresh is not None:
            return fresh
        if self.helper.overdue(self.now):
            # Stuck on another user's files: ask (the answer is cached when it comes), but
            # make no one wait behind them.
            self.helper.ask(uid, self.users.max_file_size, self.now)
            files = UserFiles(problems=("not read: the helper is not answering",), unreadable=True)
        elif not self.helper.ask(uid, self.users.max_file_size, self.now):
            files = UserFiles(problems=("not read: the helper cannot be asked",), unreadable=True)
        else:
            raise FilesPending(uid)
        self._report(uid, files.problems)
        return files

    def _read(self, uid: int) -> UserFiles:
        if self.helper is not None:
            return self._from_helper(uid)
        if self.read_files is None:
            return UserFiles(problems=("user files are not read here",), unreadable=True)
        try:
            states = self.read_files(uid, self.users.max_file_size)
        except Exception as err:  # the helper died or hangs: fail closed
            files = UserFiles(problems=(f"cannot read: {err}",), unreadable=True)
        else:
            files = self._parsed(uid, states)
        self._report(uid, files.problems)
        return files

    def _report(self, uid: int, problems: tuple[str, ...]) -> None:
        """One short line for what cannot be used of a user's files: when it changes, and
        else at most once per cache period (and PROBLEM_LOG_INTERVAL), however often the
        files are read; a file cannot flood the log."""
        if not problems:
            self._reported.pop(uid, None)
            return
        now = self.now
        interval = max(float(self.users.cache_seconds), PROBLEM_LOG_INTERVAL)
        last = self._reported.get(uid)
        if last is not None and last[0] == problems and now - last[1] < interval:
            return
        if len(self._reported) >= NAME_CACHE_SIZE:
            self._reported.clear()
        self._reported[uid] = (problems, now)
        log.warning("uid %d: %s", uid, printable("; ".join(problems), 300))


class FileWaits(Generic[V]):
    """What waits for the helper to read a user's files: uid -> waiters (a driver's
    connections), and the time past which they are answered without the files."""

    def __init__(self) -> None:
        self.waiting: dict[int, list[V]] = {}
        self.deadlines: dict[int, float] = {}  # in order of insertion; one timeout for all

    def add(self, uid: int, waiter: V, deadline: float) -> None:
        self.waiting.setdefault(uid, []).append(waiter)
        self.deadlines.setdefault(uid, deadline)

    def remove(self, uid: int, waiter: V) -> None:
        waiting = self.waiting.get(uid, [])
        if waiter in waiting:
            waiting.remove(waiter)

    def pop(self, uid: int) -> list[V]:
        """The waiters for `uid`, no longer waiting."""
        self.deadlines.pop(uid, None)
        return self.waiting.pop(uid, [])

    def next_deadline(self) -> float | None:
        return next(iter(self.deadlines.values()), None)

    def overdue(self, now: float) -> list[int]:
        """The uids whose waiters have waited until their deadline."""
        due = []
        for uid, deadline in self.deadlines.items():
            if deadline > now:
                break
            due.append(uid)
        return due

    def uids(self) -> list[int]:
        return list(self.deadlines)
