"""Reading users' files safely: as the user, no links, owner and size checked; the helper."""

from __future__ import annotations

import functools
import os
import pwd
from pathlib import Path

import pytest
from conftest import requires_root

from procident.config import UsersConfig
from procident.homes import (
    ABSENT,
    CONTENT,
    PRESENT,
    REFUSED,
    USER_FILES,
    FileState,
    HomeHelper,
    decode_states,
    encode_states,
    read_home_files,
    user_files_from,
)

NOBODY = 65534


def account(home: Path, uid: int = NOBODY):
    """A passwd entry for `uid` whose home is `home` (pwd.struct_passwd, as getpwuid gives)."""
    entry = pwd.getpwuid(uid)
    fields = list(entry)
    fields[5] = str(home)
    return lambda asked: pwd.struct_passwd(fields) if asked == uid else pwd.getpwuid(asked)


@pytest.fixture
def home(workdir: Path) -> Path:
    """A home directory owned by nobody."""
    path = workdir / "home"
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    return path


def write(path: Path, text: str, uid: int = NOBODY, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chown(path, uid, NOBODY)
    os.chmod(path, mode)


def read(home: Path, max_size: int = 1000) -> dict[str, FileState]:
    return read_home_files(NOBODY, max_size, account(home))


@requires_root
def test_reads_the_files_that_exist(home: Path) -> None:
    """Present files are read (or noted present), absent ones are absent."""
    write(home / ".noident", "")
    write(home / ".config" / "oidentd.conf", 'global { reply "x" }\n')
    states = read(home)
    assert set(states) == set(USER_FILES)
    assert states[".noident"] == FileState(PRESENT)
    assert states[".ident"] == FileState(ABSENT)
    assert states[".config/oidentd.conf"] == FileState(CONTENT, b'global { reply "x" }\n')


@requires_root
def test_symlink_is_not_followed(home: Path) -> None:
    """A link planted in place of a user file is refused, whatever it points to."""
    (home / ".oidentd.conf").symlink_to("/etc/shadow")
    (home / ".noident").symlink_to("/etc/passwd")
    states = read(home)
    assert states[".oidentd.conf"] == FileState(REFUSED, b"is a symbolic link")
    assert states[".noident"] == FileState(REFUSED, b"is a symbolic link")


@requires_root
def test_read_as_the_user(home: Path) -> None:
    """A file the user cannot read is not read for them, although the reader is root."""
    write(home / ".procident.toml", 'action = "hide"\n', uid=NOBODY, mode=0o000)
    os.chown(home / ".procident.toml", 0, 0)
    states = read(home)
    assert states[".procident.toml"].status == REFUSED
    assert "Permission denied" in states[".procident.toml"].reason


@requires_root
def test_wrong_owner_refused(home: Path) -> None:
    """A file owned by another user is refused (root's is accepted: an admin may place one)."""
    write(home / ".oidentd.conf", 'global { reply "x" }\n', uid=1)
    write(home / ".procident.toml", 'action = "hide"\n', uid=0)
    states = read(home)
    assert states[".oidentd.conf"] == FileState(REFUSED, b"is owned by uid 1, not the user")
    assert states[".procident.toml"].status == CONTENT


@requires_root
def test_oversized_and_odd_files_refused(home: Path) -> None:
    """Too large, writable by everyone, or not a regular file: refused with the reason."""
    write(home / ".oidentd.conf", "#" * 1001)
    write(home / ".procident.toml", 'action = "hide"\n', mode=0o666)
    os.mkfifo(home / ".config")  # .config/oidentd.conf cannot be reached through a fifo
    os.mkfifo(home / ".ident")
    os.chown(home / ".ident", NOBODY, NOBODY)
    states = read(home)
    assert states[".oidentd.conf"] == FileState(REFUSED, b"is larger than 1000 bytes")
    assert states[".procident.toml"] == FileState(REFUSED, b"is writable by everyone")
    assert states[".ident"] == FileState(REFUSED, b"is not a regular file")
    assert states[".config/oidentd.conf"] == FileState(ABSENT)


@requires_root
def test_identity_restored_after_reading(home: Path) -> None:
    """The reader is root again afterwards, with its groups, so the next user can be read."""
    before = (os.getresuid(), os.getresgid(), os.getgroups())
    read(home)
    assert (os.getresuid(), os.getresgid(), os.getgroups()) == before


def test_no_account_no_files() -> None:
    """A uid without a passwd entry has no home, so no files."""
    assert read_home_files(3_000_000_000, 1000) == {}


def test_states_round_trip() -> None:
    """The helper's reply encodes every state and decodes to the same; garbage is refused."""
    states = {
        ".noident": FileState(PRESENT),
        ".ident": FileState(ABSENT),
        ".procident.toml": FileState(CONTENT, b"x" * 300),
        ".config/oidentd.conf": FileState(REFUSED, b"is a symbolic link"),
        ".oidentd.conf": FileState(CONTENT, b""),
    }
    assert decode_states(encode_states(states)) == states
    assert decode_states(encode_states({})) == {}
    for bad in (b"", b"\x07", encode_states(states)[:-5]):
        with pytest.raises(ValueError):
            decode_states(bad)


def test_user_files_from_states() -> None:
    """~/.procident.toml is preferred; ~/.config/oidentd.conf hides ~/.oidentd.conf (as in
    oidentd); a broken file is a problem, not an error; oidentd files can be switched off."""
    oidentd = FileState(CONTENT, b'global { reply "o" }')
    both = {
        ".config/oidentd.conf": FileState(CONTENT, b"global { hide }"),
        ".oidentd.conf": oidentd,
    }
    files = user_files_from(both, UsersConfig())
    assert files.choices is not None and files.choices.path == "~/.config/oidentd.conf"
    files = user_files_from({".oidentd.conf": oidentd}, UsersConfig())
    assert files.choices is not None and files.choices.path == "~/.oidentd.conf"
    files = user_files_from(
        {".procident.toml": FileState(CONTENT, b'action = "hide"'), ".oidentd.conf": oidentd},
        UsersConfig(),
    )
    assert files.choices is not None and files.choices.path == "~/.procident.toml"
    assert (
        user_files_from({".oidentd.conf": oidentd}, UsersConfig(oidentd_files=False)).choices
        is None
    )
    broken = user_files_from(
        {".procident.toml": FileState(CONTENT, b"action = 5"), ".oidentd.conf": oidentd},
        UsersConfig(),
    )
    assert broken.choices is not None and broken.choices.path == "~/.oidentd.conf"
    assert broken.problems == (
        "~/.procident.toml: action: must be one of reply, hide, random, "
        "random-numeric, numeric, forward, not 5",
    )
    binary = user_files_from({".oidentd.conf": FileState(CONTENT, b"\xff\xfe")}, UsersConfig())
    assert binary.choices is None and binary.problems == ("~/.oidentd.conf: not UTF-8 text",)
    refused = user_files_from(
        {".noident": FileState(REFUSED, b"is a symbolic link")}, UsersConfig()
    )
    assert refused.noident  # a ~/.noident of any kind is a wish to hide: honoured, and noted
    assert refused.problems == ("~/.noident is a symbolic link",)


@requires_root
def test_helper_reads_for_the_unprivileged_daemon(home: Path) -> None:
    """The forked helper answers requests over its socket; it ends when the socket closes."""
    write(home / ".oidentd.conf", 'global { reply "x" }\n')
    helper = HomeHelper(functools.partial(read_home_files, accounts=account(home)))
    try:
        states = helper.read(NOBODY, 1000)
        assert states[".oidentd.conf"] == FileState(CONTENT, b'global { reply "x" }\n')
        assert helper.read(3_000_000_000, 1000) == {}
    finally:
        helper.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(helper.pid, os.WNOHANG)  # reaped by close()


def test_a_late_answer_is_never_taken_for_the_next(monkeypatch) -> None:
    """When the helper answers one request late, that answer (about another user) is
    skipped: the next request gets its own answer or none."""
    import time

    from procident import homes

    monkeypatch.setattr(homes, "HELPER_TIMEOUT", 0.2)

    def slow_for_uid_1(uid: int, max_size: int) -> dict[str, FileState]:
        if uid == 1:
            time.sleep(0.5)
        return {".noident": FileState(PRESENT if uid == 1 else ABSENT)}

    helper = HomeHelper(slow_for_uid_1)
    try:
        with pytest.raises(homes.HelperError, match="did not answer"):
            helper.read(1, 100)
        time.sleep(0.5)  # uid 1's answer is now waiting in the socket
        assert helper.read(2, 100)[".noident"] == FileState(ABSENT)
    finally:
        helper.close()


def test_asked_from_the_loop_answers_go_to_their_own_uid() -> None:
    """ask() sends and returns at once; collect() takes what has come, each answer for the
    uid its request named, whatever the order; a slow request makes the helper overdue;
    once the helper exits, collect() says it is gone and ask() fails at once."""
    import os
    import select
    import signal
    import time

    from procident import homes

    def slow_for_uid_1(uid: int, max_size: int) -> dict[str, FileState]:
        if uid == 1:
            time.sleep(homes.HELPER_TIMEOUT + 0.2)
        return {".noident": FileState(PRESENT if uid == 1 else ABSENT)}

    helper = HomeHelper(slow_for_uid_1)
    try:
        started = time.monotonic()
        assert helper.ask(1, 100, started) and helper.ask(2, 100, started)
        assert helper.ask(1, 100, started)  # already asked: not sent twice
        assert len(helper.outstanding) == 2 and helper.collect() == []
        answers: dict[int, object] = {}
        while len(answers) < 2:
            assert select.select([helper], [], [], 5)[0], "the helper did not answer"
            answers.update(helper.collect())
        assert helper.overdue(started + homes.HELPER_TIMEOUT) is False  # all answered
        assert answers == {
            1: {
                name: FileState(PRESENT if name == ".noident" else ABSENT)
                for name in homes.USER_FILES
            },
            2: {name: FileState(ABSENT) for name in homes.USER_FILES},
        }
        assert helper.ask(1, 100, time.monotonic())
        assert not helper.overdue(time.monotonic())
        assert helper.overdue(time.monotonic() + homes.HELPER_TIMEOUT)
        os.kill(helper.pid, signal.SIGKILL)
        os.waitpid(helper.pid, 0)
        assert select.select([helper], [], [], 5)[0]
        helper.collect()
        assert helper.gone and not helper.ask(3, 100, time.monotonic())
    finally:
        helper.sock.close()


def test_files_are_read_at_every_use_and_parsed_only_when_changed() -> None:
    """With the default cache_seconds = 0, every use reads the files again (a bouncer's
    rewrite is seen at once), and the same bytes are not parsed again."""
    from procident.accounts import Accounts
    from procident.config import Config
    from procident.policy import Owner

    content = {"text": b'global { reply "one" }\n'}
    reads = []

    def reader(uid: int, max_size: int) -> dict[str, FileState]:
        reads.append(uid)
        return {".oidentd.conf": FileState(CONTENT, content["text"])}

    accounts = Accounts(Config(), reader)
    owner = Owner(3001, "pidtest")
    first = accounts.user_files(owner)
    again = accounts.user_files(owner)
    assert len(reads) == 2 and again is first  # read twice, parsed once
    assert first.choices is not None and first.choices.default.reply == ("one",)
    content["text"] = b'global { reply "two" }\n'
    changed = accounts.user_files(owner)
    assert len(reads) == 3 and changed.choices.default.reply == ("two",)
