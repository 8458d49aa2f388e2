"""Shared test helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from procident.lookup import ConnectionId, Found, SocketEntry


class DictBackend:
    """A lookup backend that is a dict from ConnectionId to socket entry (not a mock)."""

    name = "dict"

    def __init__(
        self, table: dict[ConnectionId, SocketEntry], listening: frozenset[int] = frozenset()
    ):
        self.table = table
        self.listening = listening  # local ports that have a listening socket
        self.batches = 0  # batches entered so far
        self.in_batch = False
        self.finds: list[tuple[int, bool]] = []  # (batch number, inside it) for each find

    def find(self, conn: ConnectionId) -> Found | None:
        self.finds.append((self.batches, self.in_batch))
        entry = self.table.get(conn)
        return None if entry is None else Found(entry, entry.local.port in self.listening)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self.batches += 1
        self.in_batch = True
        try:
            yield
        finally:
            self.in_batch = False


import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory the daemon can still read after dropping root to nobody
    (pytest's tmp_path lies under a directory only root may enter)."""
    path = Path(tempfile.mkdtemp(prefix="procident-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_daemon(workdir: Path):
    """Start procident serve processes; every one is stopped (by its pid) at the end."""
    from harness import Daemon

    daemons: list[Daemon] = []

    def start(config: str = "", listen=("127.0.0.1:0", "[::1]:0"), **kwargs) -> Daemon:
        daemon = Daemon(workdir, config, tuple(listen), **kwargs)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: setuid() and privilege drop"
)


@pytest.fixture(autouse=True)
def _restore_procident_logger() -> Iterator[None]:
    """The CLI configures the 'procident' logger (handlers, level, propagate) as a program
    should; put it back after each test so caplog in later tests still sees records."""
    import logging

    logger = logging.getLogger("procident")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


# -- a test account whose home directory is real, for the daemon's eyes only --------

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18


def _call(libc, result: int) -> None:
    import ctypes

    if result != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


@pytest.fixture
def home(workdir: Path) -> Path:
    """The home directory of the test account `pidtest` (harness.USER_UID), owned by it."""
    from harness import USER_UID

    path = workdir / "pidtest"
    path.mkdir()
    os.chown(path, USER_UID, USER_UID)
    return path


@pytest.fixture
def accounts(workdir: Path, home: Path):
    """A preexec function that gives the daemon passwd and group files with `pidtest`
    (in a mount namespace of its own: the host's accounts are untouched)."""
    import ctypes
    import ctypes.util

    from harness import USER_UID

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    passwd = workdir / "passwd"
    group = workdir / "group"
    passwd.write_text(
        Path("/etc/passwd").read_text() + f"pidtest:x:{USER_UID}:{USER_UID}::{home}:/bin/false\n"
    )
    group.write_text(Path("/etc/group").read_text() + f"pidguests:x:{USER_UID}:\n")
    for path in (passwd, group):
        path.chmod(0o644)

    def enter() -> None:  # runs in the daemon's process, before exec
        _call(libc, libc.unshare(CLONE_NEWNS))
        _call(libc, libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
        _call(libc, libc.mount(bytes(passwd), b"/etc/passwd", None, MS_BIND, None))
        _call(libc, libc.mount(bytes(group), b"/etc/group", None, MS_BIND, None))

    return enter
