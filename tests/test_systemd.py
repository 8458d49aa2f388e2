"""procident.service under a real systemd: systemd 252 booted as PID 1 of a Debian 12
container (systemd-nspawn, no network), the daemon installed as an admin would, and
driven with systemctl (issue 16).

The root file system is built once with mmdebstrap and cached (about 20 s); each run
boots a copy-on-write overlay of it (--volatile=overlay) and stops it by its PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires_root
from harness import need, wait_for

REPO = Path(__file__).resolve().parent.parent
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-click,procps"
BOOT_TIMEOUT = 90.0

pytestmark = requires_root


def _root_tarball() -> Path:
    """Debian 12 with systemd and python3-click, built once (mmdebstrap) and cached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "procident-test"
    tarball = cache / "bookworm-systemd.tar"
    if not tarball.exists():
        mmdebstrap = need("mmdebstrap")
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / "bookworm-systemd.partial.tar"  # mmdebstrap: a tar by its name
        subprocess.run(
            [mmdebstrap, "--variant=apt", f"--include={PACKAGES}", "bookworm", str(partial)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        partial.rename(tarball)
    return tarball


class Container:
    """A booted container: `run` a shell command inside it (nsenter into its init)."""

    def __init__(self, process: subprocess.Popen[bytes], init: int, log: Path) -> None:
        self.process = process
        self.init = init
        self.log = log

    def run(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.init), "-a", "/bin/sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _cgroups_of_its_own() -> list[Path]:
    """A cgroup for the container's nspawn, made here and removed afterwards. On a host
    with mixed cgroup v1 and v2 (name=systemd beside the unified hierarchy), nspawn puts
    its payload and supervisor below its unified cgroup and at the same path in the
    name=systemd one, which must exist already: both are made."""
    name = f"procident-test-{os.getpid()}"
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.procs").exists() and (base / "cgroup.controllers").exists():
        made = [base / name]  # cgroup v2 only
    else:
        made = [p / name for p in (base / "unified", base / "systemd") if p.is_dir()]
    for path in made:
        path.mkdir(exist_ok=True)
        if path.parent.name == "systemd":
            for part in ("payload", "supervisor"):
                (path / part).mkdir(exist_ok=True)
    return made


def _enter(cgroups: list[Path]) -> None:
    """In nspawn's process, before exec: into its own cgroups."""
    for path in cgroups:
        (path / "cgroup.procs").write_text(str(os.getpid()))


def _init_of(nspawn: int) -> int | None:
    """The container's systemd: the process named systemd below nspawn (None until then,
    or while the processes read come and go)."""
    try:
        return _find_init(nspawn)
    except OSError:
        return None


def _find_init(nspawn: int) -> int | None:
    for child in Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split():
        for grandchild in Path(f"/proc/{child}/task/{child}/children").read_text().split():
            if Path(f"/proc/{grandchild}/comm").read_text().strip() == "systemd":
                return int(grandchild)
        if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
            return int(child)
    return None


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    nspawn = need("systemd-nspawn")
    need("nsenter")
    tarball = _root_tarball()
    top = tmp_path_factory.mktemp("systemd")
    root = top / "root"
    root.mkdir()
    # tar(1): owners, modes and device nodes as mmdebstrap made them
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(root)], check=True, timeout=120)
    # Installed as an admin installs it from the source tree: the package, the command,
    # the unit, the account, the configuration.
    shutil.copytree(REPO / "procident", root / "opt/procident/procident")
    command = root / "usr/local/bin/procident"
    command.write_text('#!/bin/sh\nPYTHONPATH=/opt/procident exec python3 -m procident "$@"\n')
    command.chmod(0o755)
    for unit in ("procident.service", "procident.socket", "procident-activated.service"):
        shutil.copy(REPO / "etc/systemd" / unit, root / "etc/systemd/system/")
    subprocess.run(
        ["chroot", str(root), "useradd", "--system", "--user-group", "--no-create-home"]
        + ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "procident"],
        check=True,
        timeout=60,
    )
    textfiles = root / "var/lib/prometheus/node-exporter"
    textfiles.mkdir(parents=True)
    subprocess.run(["chroot", str(root), "chown", "procident", str(textfiles)[len(str(root)) :]])
    (root / "etc/procident.toml").write_text(
        '[metrics]\ntextfile = "/var/lib/prometheus/node-exporter/procident.prom"\ninterval = 1\n'
    )
    cgroups = _cgroups_of_its_own()
    log = top / "console.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [nspawn, "--register=no", "--keep-unit", "--private-network"]
            + ["--volatile=overlay", "--console=passive", "-D", str(root), "-b"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=lambda: _enter(cgroups),
        )
    try:
        try:
            init = wait_for(lambda: process.poll() is None and _init_of(process.pid), BOOT_TIMEOUT)
            booted = Container(process, init, log)
            wait_for(
                lambda: (
                    booted.run("systemctl is-system-running").stdout.strip()
                    in ("running", "degraded")
                ),
                BOOT_TIMEOUT,
                interval=0.5,
            )
        except AssertionError as err:
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the container did not boot: {err}\n{tail}") from None
        yield booted
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # nspawn halts the container
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(top, ignore_errors=True)
        for cgroup in cgroups:  # the deepest first: rmdir removes an empty cgroup only
            for path in sorted(cgroup.glob("**/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    path.rmdir()


def _query(container: Container, host: str) -> str:
    return container.run(f"procident query {host} 1 1").stdout


def test_a_fresh_host_token_key_start_ready_and_answers(container: Container) -> None:
    """On a fresh host: token-key makes /var/lib/procident (0700) and the key (0600);
    procident.service starts (Type=notify: active only once READY), runs as procident,
    and answers over IPv4 and IPv6."""
    made = container.run("procident token-key /var/lib/procident/token.key")
    assert made.returncode == 0, made.stderr
    modes = container.run("stat -c '%a %U' /var/lib/procident /var/lib/procident/token.key")
    assert modes.stdout.split("\n")[:2] == ["700 root", "600 root"]
    started = container.run("systemctl start procident && systemctl is-active procident")
    assert started.stdout.strip() == "active", started.stderr
    users = container.run("ps -o user= -C python3").stdout.split()
    assert users == ["procident"]
    for host in ("127.0.0.1", "::1"):
        assert "error:   NO-USER" in _query(container, host)


def test_systemctl_reload_applies_the_new_configuration(container: Container) -> None:
    """ExecReload reaches the daemon, which runs as another user by then (it failed inside
    the sandbox: "kill: Operation not permitted"), and the new rule answers."""
    container.run("systemctl start procident")
    container.run(
        'printf \'[metrics]\\ntextfile = "/var/lib/prometheus/node-exporter/procident.prom"\\n'
        'interval = 1\\n[reply]\\nreply_all = "fromreload"\\n\' > /etc/procident.toml'
    )
    reload = container.run("systemctl reload procident")
    assert reload.returncode == 0, reload.stderr
    wait_for(lambda: "user id: fromreload" in _query(container, "127.0.0.1"), 10)
    journal = container.run("journalctl -u procident --no-pager").stdout
    assert "configuration reloaded" in journal


def test_the_metrics_textfile_is_written_where_node_exporter_reads(container: Container) -> None:
    """[metrics] textfile in Debian's node_exporter directory works under
    ProtectSystem=strict and UMask=0077: written, and readable by node_exporter (0644)."""
    container.run("systemctl start procident")
    path = "/var/lib/prometheus/node-exporter/procident.prom"
    wait_for(lambda: container.run(f"test -s {path}").returncode == 0, 10)
    assert container.run(f"stat -c %a {path}").stdout.strip() == "644"
    assert "procident_replies_total" in container.run(f"cat {path}").stdout


def test_the_journal_has_no_errors_denials_or_sigsys(container: Container) -> None:
    """After all of the above: nothing failed in the unit's journal, no seccomp kill."""
    journal = container.run("journalctl -u procident --no-pager -o cat").stdout
    for bad in ("Traceback", "SIGSYS", "Permission denied", "Read-only file system", "failed"):
        assert bad not in journal, journal
    assert container.run("systemctl is-failed procident").stdout.strip() != "failed"


# Ask about a connection root holds inside the container (made and asked about in one
# shell: its holder lives as long as the query takes).
ASK_ABOUT_ROOTS = (
    "python3 -c 'import socket, time\n"
    'l = socket.create_server(("127.0.0.1", 0)); c = socket.create_connection(l.getsockname())\n'
    "print(c.getsockname()[1], l.getsockname()[1], flush=True); time.sleep(20)' > /run/ports & "
    "for i in $(seq 100); do test -s /run/ports && break; sleep 0.05; done; "
    "procident query 127.0.0.1 $(cat /run/ports); kill $!"
)


def test_root_is_hidden_and_socket_activation_never_runs_as_root(container: Container) -> None:
    """root's own connection is answered HIDDEN-USER by procident.service; then with
    procident.socket instead, the first query starts procident-activated.service as a
    dynamic user (never root), which answers the same."""
    container.run("printf '' > /etc/procident.toml; systemctl restart procident")  # defaults
    assert "error:   HIDDEN-USER" in container.run(ASK_ABOUT_ROOTS).stdout
    container.run("systemctl stop procident")
    started = container.run(
        "systemctl start procident.socket && systemctl is-active procident.socket"
    )
    assert started.stdout.strip() == "active", started.stderr
    reply = container.run(ASK_ABOUT_ROOTS).stdout
    assert "error:   HIDDEN-USER" in reply, reply
    active = container.run("systemctl is-active procident-activated.service").stdout.strip()
    assert active == "active"
    uids = container.run("ps -o uid= -C python3").stdout.split()
    assert uids and "0" not in uids, uids
    container.run("systemctl stop procident.socket procident-activated.service")
