"""Shared pieces of the benchmarks: rows, percentiles, closed-loop producers, workers."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def row(name: str, requests: int, seconds: float, latencies: list[float], **extra: Any
        ) -> dict[str, Any]:
    """One result row (latencies in seconds)."""
    return {
        "row": name, "requests": requests, "seconds": round(seconds, 3),
        "req_per_s": round(requests / seconds, 1),
        "p50_ms": round(1000 * percentile(latencies, 50), 2),
        "p99_ms": round(1000 * percentile(latencies, 99), 2), **extra,
    }


def concurrent(texts: list[Any], producers: int, call: Callable[[Any], Any]
               ) -> tuple[float, list[float]]:
    """Run ``call`` over ``texts`` from ``producers`` closed-loop threads; wall time and
    latencies."""
    latencies: list[float] = []
    lock = threading.Lock()
    shares = [texts[i::producers] for i in range(producers)]

    def produce(share: list[Any]) -> None:
        mine = []
        for text in share:
            started = time.perf_counter()
            call(text)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=produce, args=(s,)) for s in shares]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, latencies


def start(cmd: list[str], env: dict[str, str], ready: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a worker subprocess and wait for its ready line."""
    out = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if ready in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"worker failed:\n{log.read_text()}")
        time.sleep(0.1)
    raise SystemExit(f"worker not ready:\n{log.read_text()}")


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) used so far by process ``pid`` (default: this process)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Setup:
    """What every benchmark part shares: Redis, a work folder, the device and options."""

    redis_url: str
    workdir: Path
    device: str = "cpu"
    cpu_instances: int = 0
    batch: int = 32
    #: The benchmark's Redis server process, for CPU accounting.
    redis_pid: int | None = None


@contextlib.contextmanager
def pipeq_worker(setup: Setup, task: str, model: str, *extra: str) -> Iterator[Any]:
    """A pipeq worker serving (task, model) on a deployment of its own; yields the remote
    pipeline, and stops the worker afterwards."""
    from pipeq import pipeline
    from pipeq.core.config import Settings

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    routes = setup.workdir / "none.toml"
    env = dict(os.environ, PIPEQ_REDIS_URL=setup.redis_url, PIPEQ_QUEUE_PREFIX=prefix,
               PIPEQ_ROUTES_FILE=str(routes), PIPEQ_LOG_LEVEL="WARNING")
    proc = start([sys.executable, "-P", "-m", "pipeq", "worker", "--task", task, "--model",
                  model, "--device", setup.device, "--max-batch-size", str(setup.batch),
                  "--cpu-instances", str(setup.cpu_instances), *extra], env,
                 "pipeq worker ready", setup.workdir / f"pipeq-{prefix}.log")
    settings = Settings(redis_url=setup.redis_url, queue_prefix=prefix, routes_file=routes)
    try:
        remote = pipeline(task, model=model, settings=settings)
        remote.worker_pid = proc.pid  # type: ignore[attr-defined]  # for CPU accounting
        yield remote
    finally:
        proc.terminate()
        proc.wait(60)
