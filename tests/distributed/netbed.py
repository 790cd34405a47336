"""A test bed of several "hosts" on one machine: Linux network namespaces on a private bridge.

Every host is a network namespace of its own (``ip netns add``) with one NIC, ``eth0``,
whose other end is a port of a bridge living in a further namespace, the *switch*. Nothing
is attached to the machine's own network: all traffic stays on the bridge, on a private
/24 of 10.231.0.0/16 chosen per run. Processes run on a host with ``ip netns exec``.

Cutting a host (:meth:`NetBed.cut`) takes its switch port down: its own NIC stays up, so
packets leave it and vanish, as when a cable is pulled or a switch fails, rather than
failing at once with "network unreachable".

Names start with ``pqd<pid>-`` (the pytest process); :meth:`NetBed.close` removes every
namespace it made (and so every link in them), killing what still runs inside, and a new
bed first removes the leftovers of earlier runs whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

#: Every namespace of a bed is named pqd<pid>-<host>.
NAME_PREFIX = "pqd"
_STALE = re.compile(rf"^{NAME_PREFIX}(\d+)-\S+")
#: Longest wait for one ``ip`` command.
IP_TIMEOUT_S = 10
SWITCH = "sw"


def why_unusable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces (ip netns add) needs root"
    # Everything a bed needs, once: two namespaces, a bridge, a veth pair between them.
    probe = NetBed(["probe"])
    probe.tag += "-probe"
    try:
        probe.create()
    except (RuntimeError, subprocess.SubprocessError) as exc:
        return f"a namespace, bridge or veth pair cannot be made here: {exc}"
    finally:
        probe.close()
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; fail saying what it printed."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_namespace(name: str) -> None:
    """Kill what still runs in namespace ``name`` (processes this bed started), delete it."""
    pids = ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(_alive(int(p)) for p in pids if p.isdigit()) and time.monotonic() < deadline:
        time.sleep(0.05)
    ip("netns", "del", name, check=False)


def remove_stale() -> list[str]:
    """Remove the namespaces of earlier beds whose pytest process is gone; their names."""
    removed = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        found = _STALE.match(line.strip())
        if found and not _alive(int(found.group(1))):
            name = line.split()[0]
            remove_namespace(name)
            removed.append(name)
    return removed


class NetBed:
    """Hosts (network namespaces) on one private bridge; see the module's docstring."""

    def __init__(self, hosts: list[str]):
        self.tag = f"{NAME_PREFIX}{os.getpid()}"
        # 10.231.<1..250>.0/24, per run: two beds at once (two pytest runs) never share one.
        self.subnet = f"10.231.{os.getpid() % 250 + 1}"
        self.hosts = list(hosts)
        self.made: list[str] = []

    def namespace(self, host: str) -> str:
        """The network namespace of ``host``."""
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        """The IPv4 address of ``host`` on the bridge."""
        return f"{self.subnet}.{10 + self.hosts.index(host)}"

    def port(self, host: str) -> str:
        """The name of ``host``'s port on the switch."""
        return f"p{self.hosts.index(host)}"

    def create(self) -> NetBed:
        """Make the switch and every host; on any failure remove what was made."""
        remove_stale()
        try:
            switch = self._add(SWITCH)
            ip("-n", switch, "link", "add", "br0", "type", "bridge")
            ip("-n", switch, "link", "set", "br0", "up")
            for host in self.hosts:
                name = self._add(host)
                ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name",
                   self.port(host), "netns", switch)
                ip("-n", switch, "link", "set", self.port(host), "master", "br0", "up")
                ip("-n", name, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
                ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, host: str) -> str:
        name = self.namespace(host)
        ip("netns", "add", name)
        self.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def cut(self, host: str) -> None:
        """Unplug ``host``: its switch port goes down (its packets vanish)."""
        ip("-n", self.namespace(SWITCH), "link", "set", self.port(host), "down")

    def mend(self, host: str) -> None:
        """Plug ``host`` back in."""
        ip("-n", self.namespace(SWITCH), "link", "set", self.port(host), "up")

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host``."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def close(self) -> None:
        """Remove every namespace this bed made (what runs inside is killed first)."""
        for name in reversed(self.made):
            remove_namespace(name)
        self.made.clear()

    def leftovers(self) -> list[str]:
        """Namespaces of this bed that still exist (none after close)."""
        names = ip("netns", "list", check=False).stdout.split()
        return [n for n in names if n.startswith(self.tag + "-")]


def short_tempdir(tag: str) -> Path:
    """A fresh folder with a short path (a Unix socket path must fit in 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=f"{tag}-", dir="/tmp"))
