"""A persistent redis-server child for tests that crash, stop and restart Redis in place."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from pipeq.ops.embedded import free_port, start_redis_server

#: AOF every second and no eviction: what survives a crash is what a deployment would keep.
PERSISTENCE = ["--appendonly", "yes", "--appendfsync", "everysec",
               "--maxmemory-policy", "noeviction"]


class RedisServer:
    """A redis-server child that can be crashed, stopped and started again in place."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        """Start on the same port and directory (reloading the AOF)."""
        self.proc, self.url = start_redis_server(self.workdir, self.port, extra=PERSISTENCE)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it: SIGTERM is a clean shutdown, SIGKILL a crash."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(10)

    def close(self) -> None:
        """Stop it if it still runs (fixture teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
