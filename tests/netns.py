"""Hosts on one machine: network namespaces joined by veth pairs, with real NAT between.

A Chain is a line of hosts: the outer host (an IRC server, say), one or more gateways
that masquerade the network behind them, and the inner host at the end:

    outer 198.51.100.7 -- .1 gw1 10.1.0.1 -- 10.1.0.2 [gw2 10.2.0.1 -- 10.2.0.2] ...

with IPv6 beside (2001:db8:100::/64 outside, fd0K::/64 on inner link K). Each gateway
forwards, and masquerades TCP leaving by its outer link onto ports 61000-61999, so the
port the outer host sees differs from the inner host's. Everything is created by the
test and removed at the end; only these namespaces' addresses are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
NAT_PORTS = "61000-61999"
_libc = ctypes.CDLL(None, use_errno=True)
TOOLS = ("ip", "iptables", "ip6tables", "conntrack")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def setns(path: str) -> None:
    """Move the calling thread into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block in namespace `name`: sockets made here stay there afterwards."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(f"/run/netns/{name}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back home")
    finally:
        os.close(home)


def run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


@dataclass
class Host:
    """One namespace: its name, and its address on each side, per family."""

    name: str
    up: dict[int, str] = field(default_factory=dict)  # toward the outer host: 4/6 -> address
    down: dict[int, str] = field(default_factory=dict)  # toward the inner host (gateways)
    up_link: str = ""  # the interface toward the outer host
    down_link: str = ""  # the interface toward the inner host (gateways)


class Chain:
    """outer -- gateway(s) -- inner, built at once; remove() takes it all down."""

    def __init__(self, gateways: int = 1) -> None:
        tag = f"pi{os.getpid() % 100000}x{id(self) % 1000}"
        self.hosts: list[Host] = []
        names = ["outer", *(f"gw{n + 1}" for n in range(gateways)), "inner"]
        try:
            for name in names:
                host = Host(f"{tag}-{name}")
                run("ip", "netns", "add", host.name)
                self.hosts.append(host)
                self.ip(host, "link", "set", "lo", "up")
            for k, (upper, lower) in enumerate(itertools.pairwise(self.hosts)):
                self._link(k, upper, lower, f"{tag[-9:]}{k}")
            for gateway in self.hosts[1:-1]:
                self._masquerade(gateway)
        except BaseException:
            self.remove()
            raise

    @property
    def outer(self) -> Host:
        return self.hosts[0]

    @property
    def gateways(self) -> list[Host]:
        return self.hosts[1:-1]

    @property
    def inner(self) -> Host:
        return self.hosts[-1]

    def ip(self, host: Host, *args: str) -> str:
        return run("ip", "-n", host.name, *args)

    def _link(self, k: int, upper: Host, lower: Host, stem: str) -> None:
        if k == 0:  # the outside: the outer host is .7, the first gateway .1
            nets = {4: "198.51.100.{}/24", 6: "2001:db8:100::{}/64"}
            upper_id, lower_id = "7", "1"
        else:
            nets = {4: f"10.{k}.0.{{}}/24", 6: f"fd0{k}::{{}}/64"}
            upper_id, lower_id = "1", "2"
        a, b = f"{stem}a", f"{stem}b"
        run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        run("ip", "link", "set", a, "netns", upper.name)
        run("ip", "link", "set", b, "netns", lower.name)
        for host, dev, host_id, side in ((upper, a, upper_id, "down"), (lower, b, lower_id, "up")):
            for family, net in nets.items():
                address = net.format(host_id)
                extra = ("nodad",) if family == 6 else ()
                self.ip(host, f"-{family}", "addr", "add", address, "dev", dev, *extra)
                getattr(host, side)[family] = address.split("/")[0]
            self.ip(host, "link", "set", dev, "up")
        lower.up_link = b
        upper.down_link = a
        for family in (4, 6):
            self.ip(lower, f"-{family}", "route", "add", "default", "via", upper.down[family])

    def _masquerade(self, gateway: Host) -> None:
        run(
            "ip", "netns", "exec", gateway.name, "sysctl", "-qw",
            "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
        )  # fmt: skip
        for tool in ("iptables", "ip6tables"):
            run(
                "ip", "netns", "exec", gateway.name, tool, "-t", "nat", "-A", "POSTROUTING",
                "-o", gateway.up_link, "-p", "tcp", "-j", "MASQUERADE", "--to-ports", NAT_PORTS,
            )  # fmt: skip

    def conntrack(self, host: Host) -> str:
        """The host's connection-tracking table as the conntrack tool lists it."""
        return run("ip", "netns", "exec", host.name, "conntrack", "-L", "-p", "tcp")

    def remove(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True, timeout=30)
        self.hosts = []
