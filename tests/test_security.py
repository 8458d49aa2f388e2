"""Attacks on procident, played for real: each test is one hole a hostile local user, a
remote client, a forward target or a reload could use, and fails on the code that had it.

The numbers in the section titles are the items of the security review (SECURITY.md
names the test for each promise).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires_root
from harness import USER_UID

from procident import process

pytestmark = requires_root

PROCIDENT = [sys.executable, "-m", "procident"]
NOBODY = 65534


def run(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROCIDENT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def as_user(uid: int, action) -> None:
    """Run `action()` in a child process that is `uid` (no groups), as the attacker."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(uid)
            action()
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the attacker's step failed"


def secret_file(workdir: Path) -> Path:
    """A root-only file an attacker would like truncated, made readable, or overwritten."""
    secret = workdir / "shadow"
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    return secret


def assert_untouched(secret: Path) -> None:
    info = secret.stat()
    assert secret.read_text() == "root:$6$secret-hash:19000:0:99999:7:::\n"
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single error line a refusal prints (no traceback; serve may have logged its
    start before), without its "Error: "."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0][len("Error: ") :]


# -- 1. the pid file -----------------------------------------------------------


def test_pid_file_in_a_directory_the_service_user_owns_is_refused(workdir: Path) -> None:
    """The service user (nobody) owns the pid file's directory and plants links to a
    root-only file at every name root could write there (the final name and the temporary
    name of each pid that may come next): serve refuses the directory in one line, exit 1,
    before writing anything, and the root-only file keeps its content and mode."""
    secret = secret_file(workdir)
    run_dir = workdir / "run"
    run_dir.mkdir(mode=0o755)
    os.chown(run_dir, NOBODY, NOBODY)
    pid_file = run_dir / "procident.pid"
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())

    def plant() -> None:
        pid_file.symlink_to(secret)
        for pid in range(last + 1, last + 400):
            (run_dir / f"procident.pid.{pid}.tmp").symlink_to(secret)
            (run_dir / f".procident.pid.{pid}.tmp").symlink_to(secret)

    as_user(NOBODY, plant)
    planted = sorted(os.listdir(run_dir))
    result = run("serve", "--listen", "127.0.0.1:0", "--pid-file", str(pid_file), timeout=15)
    reason = one_line_error(result)
    assert reason == (
        f"--pid-file {pid_file}: {run_dir} is owned by uid {NOBODY}: the pid file's "
        "directory must be owned by root"
    )
    assert_untouched(secret)
    assert sorted(os.listdir(run_dir)) == planted  # nothing created, nothing replaced


def test_pid_file_directory_writable_by_others_or_a_link_is_refused(workdir: Path) -> None:
    """A root-owned directory that a group or everyone may write, or a path through a
    symbolic link, is refused the same way."""
    for mode in (0o775, 0o1777):
        shared = workdir / f"shared-{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        result = run("serve", "--listen", "127.0.0.1:0", "--pid-file", f"{shared}/p.pid")
        assert f"{shared} is writable by group or others (mode {mode:04o})" in one_line_error(
            result
        )
        assert os.listdir(shared) == []
    real = workdir / "real"
    real.mkdir(mode=0o755)
    (workdir / "link").symlink_to(real)
    result = run("serve", "--listen", "127.0.0.1:0", "--pid-file", f"{workdir}/link/p.pid")
    assert f"{workdir}/link is not a directory (a symbolic link?)" in one_line_error(result)
    assert os.listdir(real) == []


def test_pid_file_links_are_replaced_never_followed(workdir: Path) -> None:
    """In a safe directory, links at the pid file's name and at this process's temporary
    name are replaced by a regular 0644 file holding the pid; their target is untouched."""
    secret = secret_file(workdir)
    pid_file = workdir / "procident.pid"
    pid_file.symlink_to(secret)
    for name in (f"procident.pid.{os.getpid()}.tmp", f".procident.pid.{os.getpid()}.tmp"):
        (workdir / name).symlink_to(secret)
    process.write_pid_file(str(pid_file))
    assert_untouched(secret)
    info = pid_file.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o644
    assert pid_file.read_text() == f"{os.getpid()}\n"
    with pytest.raises(process.PidFileError, match="owned by uid 3001"):
        os.chown(workdir, USER_UID, USER_UID)
        try:
            process.write_pid_file(str(pid_file))
        finally:
            os.chown(workdir, 0, 0)


# -- 10. the token key file ----------------------------------------------------


def _key_commands(key: Path, workdir: Path) -> dict[str, list[str]]:
    config = workdir / "tokens.toml"
    config.write_text(f'[tokens]\nkey_file = "{key}"\n[[rules]]\naction = "token"\n')
    config.chmod(0o644)
    return {
        "token-key": ["token-key", "-c", str(config)],
        "decode-token": ["decode-token", "-c", str(config), "AAAA"],
        "serve": ["serve", "-c", str(config), "--listen", "127.0.0.1:0"],
    }


def test_key_file_of_another_user_is_neither_read_nor_appended(workdir: Path) -> None:
    """A key file that another user owns (and so chose the keys of) is refused by
    token-key, decode-token and serve alike, and nothing is appended to it."""
    key = workdir / "token.key"
    assert run("token-key", str(key)).returncode == 0
    os.chown(key, USER_UID, USER_UID)
    before = key.read_bytes()
    for command in _key_commands(key, workdir).values():
        reason = one_line_error(run(*command, timeout=15))
        assert f"{key}: is owned by uid {USER_UID}; it must be owned by root" in reason
    assert key.read_bytes() == before


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink", "group-readable"])
def test_key_path_that_is_no_private_file_is_refused_at_once(workdir: Path, kind: str) -> None:
    """A FIFO (which would hang an open for reading), a directory, a link or a file others
    may read at the key path: each command says why in one line and exits 1, at once."""
    key = workdir / "token.key"
    if kind == "fifo":
        os.mkfifo(key, 0o600)
        expected = "is not a regular file"
    elif kind == "directory":
        key.mkdir(mode=0o700)
        expected = "is not a regular file"
    elif kind == "symlink":
        real = workdir / "real.key"
        assert run("token-key", str(real)).returncode == 0
        key.symlink_to(real)
        expected = "is a symbolic link"
    else:
        assert run("token-key", str(key)).returncode == 0
        key.chmod(0o640)
        expected = "must not be readable or writable by group or others"
    for command in _key_commands(key, workdir).values():
        # The old code blocked forever opening a FIFO: the timeout fails the test.
        reason = one_line_error(run(*command, timeout=15))
        assert f"{key}: {expected}" in reason, reason
