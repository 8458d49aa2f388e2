"""The answer's log line (procident.answerlog): the fast text path writes exactly what
the logging module would, escaped the same, and the daemon's loop flushes once a turn
(issue 19)."""

from __future__ import annotations

import io
import logging
import re

import pytest

from procident import answerlog
from procident.logsetup import TEXT_FORMAT, FastInfo, TextFormatter

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


class Counting(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def logger():
    """A logger set up as setup_logging sets procident's (text to a stream), a child
    of it as the daemon's modules log through, and the stream."""
    parent = logging.getLogger("procident-test-answerlog")
    stream = Counting()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    parent.handlers[:] = [handler]
    parent.setLevel(logging.INFO)
    parent.propagate = False
    yield parent.getChild("server"), stream, handler
    parent.handlers[:] = []


ANSWERS = [
    ("127.0.0.1", 40001, 6667, b"40001,6667:USERID:UNIX:alice\r\n", "rules[1]"),
    ("::1", 1, 2, b"1,2:ERROR:NO-USER\r\n", "default"),
    # What others wrote: escaped on either path, never a second line or a terminal code.
    (
        "10.0.0.1",
        3,
        4,
        b"3,4:USERID:OTHER:ev\xc2\x85il\r\n",
        "rules[0]+~/.oidentd.conf line 2\x1b[2J",
    ),
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_the_fast_line_is_the_logging_modules_line(logger, answer) -> None:
    child, stream, handler = logger
    assert FastInfo.for_logger(child) is not None
    answerlog.log_answer(child, *answer)
    fast = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    handler.addFilter(lambda record: True)  # any filter: the logging module's way
    assert FastInfo.for_logger(child) is None
    answerlog.log_answer(child, *answer)
    slow = stream.getvalue()
    assert STAMP.sub("", fast) == STAMP.sub("", slow) and fast.count("\n") == 1
    assert STAMP.match(fast) and "\x1b" not in fast and "\x85" not in fast


def test_other_handlers_json_and_propagation_take_the_logging_modules_way(logger) -> None:
    child, stream, handler = logger
    parent = child.parent
    assert isinstance(parent, logging.Logger)
    handler.setFormatter(logging.Formatter("%(message)s"))
    assert FastInfo.for_logger(child) is None
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    seen: list[logging.LogRecord] = []
    extra = logging.Handler()
    extra.emit = seen.append  # type: ignore[method-assign]
    parent.addHandler(extra)
    answerlog.log_answer(child, *ANSWERS[0])
    assert len(seen) == 1 and seen[0].fields["reply"] == "USERID:UNIX:alice"  # type: ignore[attr-defined]
    parent.removeHandler(extra)
    assert FastInfo.for_logger(child) is not None


def test_held_lines_are_flushed_once_in_order(logger) -> None:
    """In a turn of the loop, answer lines wait in the stream and go out in one flush at
    its end; a warning logged between them keeps its place."""
    child, stream, _ = logger
    answerlog.hold_lines()
    try:
        answerlog.log_answer(child, *ANSWERS[0])
        answerlog.log_answer(child, *ANSWERS[1])
        assert stream.flushes == 0
        child.warning("between")
        answerlog.log_answer(child, *ANSWERS[0])
    finally:
        answerlog.release_lines()
    lines = [STAMP.sub("", line) for line in stream.getvalue().splitlines()]
    assert [line.split()[0:2] for line in lines] == [
        ["INFO", "answer"],
        ["INFO", "answer"],
        ["WARNING", "between"],
        ["INFO", "answer"],
    ]
    flushes = stream.flushes
    answerlog.log_answer(child, *ANSWERS[1])  # outside a turn: at once
    assert stream.flushes == flushes + 1


def test_a_handler_changed_between_turns_is_seen_at_the_next(logger) -> None:
    """Which way a line goes is looked for once a turn: a filter added between two
    turns (as a reload does, between them) sends the next turn's lines through the
    logging module, and taking it away brings the fast way back."""
    child, stream, handler = logger
    seen: list[logging.LogRecord] = []

    def turn() -> None:
        answerlog.hold_lines()
        try:
            answerlog.log_answer(child, *ANSWERS[0])
            answerlog.log_answer(child, *ANSWERS[1])
        finally:
            answerlog.release_lines()

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    turn()
    assert seen == [] and stream.getvalue().count("\n") == 2
    handler.addFilter(keep)
    turn()
    assert len(seen) == 2 and stream.getvalue().count("\n") == 4
    handler.removeFilter(keep)
    turn()
    assert len(seen) == 2 and stream.getvalue().count("\n") == 6


class Broken(io.StringIO):
    """A stream that fails as a full disk or a closed pipe does."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


def test_a_log_that_cannot_be_written_costs_no_answer(logger, capsys) -> None:
    """The answer's line is lost, as logging's handlers lose it (saying so on standard
    error), and nothing is raised into the loop: the reply still goes out."""
    child, _, handler = logger
    handler.stream = Broken()
    answerlog.log_answer(child, *ANSWERS[0])  # no exception
    answerlog.hold_lines()
    answerlog.log_answer(child, *ANSWERS[1])
    answerlog.release_lines()  # no exception either
    assert "Logging error" in capsys.readouterr().err


def test_each_line_names_its_own_client_among_many_passing_addresses(logger) -> None:
    """The fast line keeps each client address's text by the address object: thousands
    of addresses made and dropped one after another (their memory, and ids, reused;
    past the bound, which empties the memo) and the same address in a new object are
    each written as their own text."""
    import ipaddress

    child, stream, _ = logger
    wanted = []
    for n in range(answerlog._TEXTS_SIZE + 500):
        address = ipaddress.ip_address(n) if n % 3 else ipaddress.IPv6Address(n << 64)
        answerlog.log_answer(child, address, 1, 2, b"1,2:ERROR:NO-USER\r\n", "default")
        wanted.append(str(address))
        answerlog.log_answer(child, ipaddress.ip_address(str(address)), 1, 2, b"1,2:X\r\n", "d")
        wanted.append(str(address))
    got = re.findall(r" client=(\S+) ", stream.getvalue())
    assert got == wanted
