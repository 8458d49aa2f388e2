"""procident.service under a real systemd: systemd 252 booted as PID 1 of a Debian 12
container (systemd-nspawn, no network), the daemon installed as an admin would, and
driven with systemctl (issue 16).

The root file system is built once with mmdebstrap and cached (about 20 s); each run
boots a copy-on-write overlay of it (--volatile=overlay) and stops it by its PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import requires_root
from harness import need, wait_for

REPO = Path(__file__).resolve().parent.parent
# python3-cryptography: tokens; the package's Depends and Recommends are all here, as
# the container has no network to fetch them.
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-click,python3-cryptography,procps"
BOOT_TIMEOUT = 90.0
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # Debian's python3 builds the package

pytestmark = requires_root


def _root_tarball() -> Path:
    """Debian 12 with systemd and procident's dependencies, built once (mmdebstrap) and
    cached, under a name that changes with PACKAGES."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "procident-test"
    digest = hashlib.sha256(PACKAGES.encode()).hexdigest()[:12]
    tarball = cache / f"bookworm-systemd-{digest}.tar"
    if not tarball.exists():
        mmdebstrap = need("mmdebstrap")
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f"bookworm-systemd-{digest}.partial.tar"  # a tar by its name
        subprocess.run(
            [mmdebstrap, "--variant=apt", f"--include={PACKAGES}", "bookworm", str(partial)],
            check=True,
            capture_output=True,
            timeout=600,
        )
        partial.rename(tarball)
    return tarball


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb, built from this tree as debian/ says: dpkg-buildpackage -us -uc -b with
    Debian 12's own Python and debhelper."""
    need("dpkg-buildpackage")
    top = tmp_path_factory.mktemp("deb")
    tree = top / "procident"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = REPO / os.fsdecode(name)
        if source.is_file():
            (tree / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / os.fsdecode(name))
    built = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        cwd=tree,
        env=dict(os.environ, PATH=SYSTEM_PATH),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (deb,) = top.glob("procident_*_all.deb")
    return deb


class Container:
    """A booted container: `run` a shell command inside it (nsenter into its init)."""

    def __init__(self, process: subprocess.Popen[bytes], init: int, log: Path) -> None:
        self.process = process
        self.init = init
        self.log = log
        self.install = ""  # "source" or "package"

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


def test_the_package_holds_what_an_admin_looks_for_and_lintian_finds_no_error(
    package: Path,
) -> None:
    """The .deb: the command, the units (the packaged command in ExecStart), the account
    (sysusers.d), /var/lib/procident (tmpfiles.d, 0700), /etc/procident.toml as a
    conffile, the man pages; Depends on Debian's click, tomli only for Pythons before
    3.11; lintian reports no error and no warning."""
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(package)], check=True, capture_output=True, text=True
    ).stdout
    for path in (
        "./usr/bin/procident",
        "./lib/systemd/system/procident.service",
        "./lib/systemd/system/procident-helper.socket",
        "./lib/systemd/system/procident-helper@.service",
        "./lib/systemd/system/procident.socket",
        "./usr/share/doc/procident/examples/per-connection/procident.socket",
        "./usr/lib/sysusers.d/procident.conf",
        "./usr/lib/tmpfiles.d/procident.conf",
        "./etc/procident.toml",
        "./usr/share/man/man8/procident.8.gz",
        "./usr/share/man/man5/procident.toml.5.gz",
    ):
        assert f" {path}\n" in listing, path
    depends = subprocess.run(
        ["dpkg-deb", "--field", str(package), "Depends", "Recommends"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "python3-click, python3-tomli | python3 (>> 3.11)," in depends
    assert "Recommends: python3-cryptography\n" in depends
    extracted = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(package)], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(extracted)) as control_files:
        member = control_files.extractfile("./conffiles")
        assert member is not None
        assert member.read().decode().split() == ["/etc/procident.toml"]
    lintian = subprocess.run(
        [need("lintian"), "--allow-root", "--fail-on", "error,warning", str(package)],
        env=dict(os.environ, PATH=SYSTEM_PATH),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert lintian.returncode == 0, lintian.stdout + lintian.stderr


# Made in the container before it boots: a connection held by USER and its two ports
# printed, for `procident query` to ask about.
HOLD = """import socket, sys, time
host = sys.argv[1]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
server = socket.create_server((host, 0), family=family)
client = socket.create_connection(server.getsockname()[:2])
print(client.getsockname()[1], server.getsockname()[1], flush=True)
time.sleep(20)
"""
UNITS = ("procident.service", "procident.socket", "procident-activated.service")
HELPER_UNITS = ("procident-helper.socket", "procident-helper@.service", "procident@.service")
# Two users: alice's home is hers alone (0700), with the file a bouncer writes; carol is
# answered with audit tokens.
USERS = {"alice": 3101, "carol": 3102}
CONFIG = (
    '[metrics]\ntextfile = "/var/lib/prometheus/node-exporter/procident.prom"\ninterval = 1\n'
    '[[rules]]\nusers = ["root"]\naction = "hide"\n'
    '[[rules]]\nusers = ["carol"]\naction = "token"\n'
)
BOUNCER = '[[rules]]\nusers = ["alice"]\naction = "real"\nuser_may = ["spoof"]\n'


def _install_from_source(root: Path) -> None:
    """As an admin installs from the source tree: the package, the command, the units,
    the account (README: Running under systemd)."""
    shutil.copytree(REPO / "procident", root / "opt/procident/procident")
    command = root / "usr/local/bin/procident"
    command.write_text('#!/bin/sh\nPYTHONPATH=/opt/procident exec python3 -m procident "$@"\n')
    command.chmod(0o755)
    for unit in UNITS + HELPER_UNITS:
        shutil.copy(REPO / "etc/systemd" / unit, root / "etc/systemd/system/")
    shutil.copy(REPO / "etc/systemd/per-connection/procident.socket", root / "opt/procident")
    subprocess.run(
        ["chroot", str(root), "useradd", "--system", "--user-group", "--no-create-home"]
        + ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "procident"],
        check=True,
        timeout=60,
    )


def _prepare(root: Path) -> None:
    """What both installs share: the users, node_exporter's textfile directory."""
    (root / "usr/local/lib/hold.py").write_text(HOLD)
    for user, uid in USERS.items():
        subprocess.run(
            ["chroot", str(root), "useradd", "--uid", str(uid), "--create-home", user],
            check=True,
            timeout=60,
        )
        (root / "home" / user).chmod(0o700)
    spoof = root / "home/alice/.oidentd.conf"
    spoof.write_text('global { reply "nick" }\n')
    os.chown(spoof, USERS["alice"], USERS["alice"])
    (root / "var/lib/prometheus/node-exporter").mkdir(parents=True)


@pytest.fixture(scope="module", params=["source", "package"])
def container(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Container]:
    """A booted Debian 12 with procident installed from the source tree, or from the .deb
    with apt (which enables and starts procident.service and procident-helper.socket)."""
    nspawn = need("systemd-nspawn")
    need("nsenter")
    deb = request.getfixturevalue("package") if request.param == "package" else None
    tarball = _root_tarball()
    top = tmp_path_factory.mktemp("systemd")
    root = top / "root"
    root.mkdir()
    # tar(1): owners, modes and device nodes as mmdebstrap made them
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(root)], check=True, timeout=120)
    _prepare(root)
    if deb is None:
        _install_from_source(root)
    else:
        shutil.copy(deb, root / "root")
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
        booted.install = request.param
        if deb is not None:
            installed = booted.run(f"cd /root && apt-get install -y ./{deb.name}", 180)
            assert installed.returncode == 0, installed.stdout + installed.stderr
        booted.run("chown procident /var/lib/prometheus/node-exporter")
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


def _configure(container: Container, text: str) -> None:
    container.run(f"cat > /etc/procident.toml <<'EOF'\n{text}EOF\n")


def _restart(container: Container) -> subprocess.CompletedProcess[str]:
    """systemctl restart procident, and the unit's state. The tests restart it more often
    than systemd's start limit allows (5 in 10 s): the count is reset first."""
    return container.run(
        "systemctl reset-failed procident; systemctl restart procident && "
        "systemctl is-active procident"
    )


def _ask_about(container: Container, user: str, host: str = "127.0.0.1") -> str:
    """`procident query` about a connection `user` holds in the container (made and
    asked about in one shell: its holder lives as long as the query takes)."""
    ports = f"/run/ports-{user}"
    hold = f"setpriv --reuid={user} --regid={user} --init-groups python3 /usr/local/lib/hold.py"
    asked = container.run(
        f"rm -f {ports}; {hold} {host} > {ports} & "
        f"for i in $(seq 100); do test -s {ports} && break; sleep 0.05; done; "
        f"procident query {host} $(cat {ports}); kill $!; wait $!"
    )
    return asked.stdout + asked.stderr  # stderr: why, when there is no reply


def _processes(container: Container) -> list[str]:
    """The users of procident's processes: python3 -m procident (from source) or
    /usr/bin/procident (the package's, named after its script)."""
    return container.run("ps -o user= -C python3,procident").stdout.split()


def test_fresh_host_token_key_start_ready_and_a_users_answer(container: Container) -> None:
    """token-key on a fresh host makes the key (0600) in /var/lib/procident (0700),
    procident.service starts (Type=notify: active only once READY) as the account
    procident, holding no capability and with no root process beside it, and answers
    alice's connection over IPv4 and IPv6, and carol's with a token root decodes."""
    if container.install == "package":  # made at install (tmpfiles.d), the account's
        made = container.run("stat -c '%a %U' /var/lib/procident").stdout
        assert made == "700 procident\n"
    made = container.run("procident token-key /var/lib/procident/token.key")
    assert made.returncode == 0, made.stderr
    _configure(container, CONFIG)
    started = _restart(container)
    assert started.stdout.strip() == "active", started.stderr
    modes = container.run("stat -c '%a %U' /var/lib/procident /var/lib/procident/token.key")
    assert modes.stdout.split("\n")[:2] == ["700 procident", "600 procident"]
    wait_for(lambda: _processes(container) == ["procident"], 10)
    main = "$(systemctl show --property MainPID --value procident)"
    status = container.run(f"grep -E '^Cap(Prm|Eff|Amb)' /proc/{main}/status")
    assert status.stdout.split()[1::2] == ["0000000000000000"] * 3, status.stdout
    for host in ("127.0.0.1", "::1"):
        assert "user id: alice" in _ask_about(container, "alice", host)
    reply = _ask_about(container, "carol")
    token = reply.split("user id: ")[1].split()[0]
    decoded = container.run(f"procident decode-token {token}")
    assert f"uid:        {USERS['carol']} (carol)" in decoded.stdout, decoded.stdout + reply


def test_systemctl_reload_applies_the_new_configuration(container: Container) -> None:
    """ExecReload reaches the daemon, and the new rule answers."""
    _configure(container, CONFIG)
    _restart(container)
    _configure(container, CONFIG + '[reply]\nreply_all = "fromreload"\n')
    reload = container.run("systemctl reload procident")
    assert reload.returncode == 0, reload.stderr
    wait_for(lambda: "user id: fromreload" in _ask_about(container, "alice"), 10)
    journal = container.run("journalctl -u procident --no-pager").stdout
    assert "configuration reloaded" in journal


def test_the_metrics_textfile_is_written_where_node_exporter_reads(container: Container) -> None:
    """[metrics] textfile in Debian's node_exporter directory works under
    ProtectSystem=strict and UMask=0077: written, and readable by node_exporter (0644)."""
    _configure(container, CONFIG)
    _restart(container)
    path = "/var/lib/prometheus/node-exporter/procident.prom"
    wait_for(lambda: container.run(f"test -s {path}").returncode == 0, 10)
    assert container.run(f"stat -c %a {path}").stdout.strip() == "644"
    assert "procident_replies_total" in container.run(f"cat {path}").stdout


def test_users_files_are_read_by_the_helper_and_root_runs_only_there(
    container: Container,
) -> None:
    """With a rule that lets alice choose, her ~/.oidentd.conf (in a home of mode 0700,
    which the daemon's account cannot enter) is read by procident-helper.socket's helper,
    the one process running as root; her choice is answered."""
    _configure(container, CONFIG + BOUNCER)
    _restart(container)
    assert "user id: nick" in _ask_about(container, "alice")
    wait_for(lambda: sorted(_processes(container)) == ["procident", "root"], 10)
    helpers = container.run("systemctl list-units --no-legend 'procident-helper@*'").stdout
    assert "running" in helpers, helpers
    journal = container.run("journalctl -u procident --no-pager -o cat").stdout
    assert "user files are read by the helper at /run/procident/helper.sock" in journal
    _configure(container, CONFIG)
    _restart(container)
    wait_for(lambda: _processes(container) == ["procident"], 10)  # the helper ended


def test_root_is_hidden_and_socket_activation_never_runs_as_root(container: Container) -> None:
    """root's own connection is answered HIDDEN-USER by procident.service; then with
    procident.socket instead, the first query starts procident-activated.service as a
    dynamic user (never root), which answers the same."""
    _configure(container, "")  # the defaults
    restarted = _restart(container)
    assert restarted.returncode == 0, container.run("journalctl -u procident -n 30").stdout
    assert "error:   HIDDEN-USER" in _ask_about(container, "root")
    container.run("systemctl stop procident")
    started = container.run(
        "systemctl start procident.socket && systemctl is-active procident.socket"
    )
    assert started.stdout.strip() == "active", started.stderr
    reply = _ask_about(container, "root")
    assert "error:   HIDDEN-USER" in reply, reply
    active = container.run("systemctl is-active procident-activated.service").stdout.strip()
    assert active == "active"
    uids = container.run("ps -o uid= -C python3,procident").stdout.split()
    assert uids and "0" not in uids, uids
    container.run("systemctl stop procident.socket procident-activated.service")


def test_per_connection_instances_answer_as_dynamic_users(container: Container) -> None:
    """The per-connection procident.socket (Accept=yes) starts one procident@.service per
    query, in inetd mode, as a dynamic user: alice's connection is answered."""
    example = {
        "source": "/opt/procident/procident.socket",
        "package": "/usr/share/doc/procident/examples/per-connection/procident.socket",
    }[container.install]
    _configure(container, "")
    prepared = container.run(
        "systemctl stop procident; cd /etc/systemd/system; "
        "test ! -e procident.socket || mv procident.socket procident.socket.saved; "
        f"cp {example} procident.socket && systemctl daemon-reload && "
        "systemctl start procident.socket"
    )
    assert prepared.returncode == 0, prepared.stderr
    try:
        assert "user id: alice" in _ask_about(container, "alice")
        journal = container.run("journalctl --no-pager -o cat -u 'procident@*'").stdout
        assert "alice" in journal, journal
    finally:
        container.run(
            "systemctl stop procident.socket; cd /etc/systemd/system; rm procident.socket; "
            "test ! -e procident.socket.saved || mv procident.socket.saved procident.socket; "
            "systemctl daemon-reload"
        )


def test_the_journal_has_no_errors_denials_or_sigsys(container: Container) -> None:
    """After all of the above: nothing failed in any of procident's units, no seccomp
    kill, no denial."""
    journal = container.run("journalctl -u 'procident*' --no-pager -o cat").stdout
    for bad in ("Traceback", "SIGSYS", "Permission denied", "Read-only file system", "failed"):
        assert bad not in journal, journal
    assert container.run("systemctl is-failed procident").stdout.strip() != "failed"
