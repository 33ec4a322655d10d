"""Two "hosts" on one machine: two network namespaces joined by a veth pair with private addresses
(a cable between two machines). Root only; `two_hosts()` says why it can't when it can't.

    with two_hosts() as hosts:
        hosts[0].popen([...])      # runs inside host 0's network stack
        hosts.cut()                # the cable is pulled (both ends down)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess

SUBNET = "10.231.{}.{}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces can't be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = f"epi-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()[:200]}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclasses.dataclass
class Host:
    netns: str
    ifname: str
    addr: str

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *cmd], **kwargs)

    def pids(self) -> list[int]:
        """The processes running in this host's namespace."""
        return [int(p) for p in _ip("netns", "pids", self.netns, check=False).stdout.split()]


@dataclasses.dataclass
class Hosts:
    hosts: list[Host]

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def cut(self) -> None:
        """The cable is pulled: both ends of the link go down."""
        for h in self.hosts:
            _ip("-n", h.netns, "link", "set", h.ifname, "down")


@contextlib.contextmanager
def two_hosts(subnet: int = 0):
    """Two namespaces with loopback up and one veth end each (10.231.<subnet>.1 and .2); both are
    deleted on exit, whatever still runs in them is killed first."""
    tag = f"{os.getpid() % 100000}{subnet}"
    hosts = [Host(f"epi-h{i}-{tag}", f"epi{i}-{tag}"[:15], SUBNET.format(subnet, i + 1)) for i in range(2)]
    try:
        for h in hosts:
            _ip("netns", "add", h.netns)
        _ip("link", "add", hosts[0].ifname, "type", "veth", "peer", "name", hosts[1].ifname)
        for h in hosts:
            _ip("link", "set", h.ifname, "netns", h.netns)
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
        yield Hosts(hosts)
    finally:
        for h in hosts:
            for pid in h.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            _ip("netns", "del", h.netns, check=False)
