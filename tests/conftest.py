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
