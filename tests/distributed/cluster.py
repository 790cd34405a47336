"""A pipeq deployment spread over the hosts of a NetBed: Redis on one, workers on others,
producers on another, and the test itself watching Redis through a Unix socket (which
crosses network namespaces: the observer sees everything, whatever link is cut).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from conftest import ROOT, WorkerProcess, wait_until
from netbed import NetBed

from pipeq.core.contract import Route
from pipeq.core.keys import Keys
from pipeq.core.redis_io import as_text
from pipeq.core.store import JOBS_IN_STATE
from pipeq.ops.embedded import redis_server_binary

PRODUCE = Path(__file__).with_name("produce.py")
REDIS_PORT = 6379  # inside the bed's own namespace: nothing else listens there


class Cluster:
    """Redis, workers and producers on the bed's hosts, one deployment (key prefix)."""

    def __init__(self, bed: NetBed, workdir: Path, task: str, model: str, **settings: Any):
        self.bed = bed
        self.workdir = workdir
        self.task = task
        self.model = model
        self.prefix = f"d{uuid.uuid4().hex[:8]}"
        self.keys = Keys(self.prefix)
        self.route = Route(task=task, model=model)
        self.settings = {"heartbeat_s": 0.5, **settings}
        self.url = f"redis://{bed.address('redis')}:{REDIS_PORT}/0"
        self.socket = workdir / "redis.sock"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.observer = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=10)
        self.workers: dict[str, WorkerProcess] = {}

    # --- processes ---------------------------------------------------------------------------

    def start_redis(self) -> None:
        """redis-server on the redis host, bound to its bridge address (and a Unix socket)."""
        argv = [redis_server_binary(), "--bind", self.bed.address("redis"),
                "--port", str(REDIS_PORT), "--unixsocket", str(self.socket),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log")]
        self.redis_proc = subprocess.Popen(self.bed.command("redis", argv),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 15, "redis-server on the redis host")

    def _answers(self) -> bool:
        try:
            return bool(self.observer.ping())
        except (redis.RedisError, OSError):
            return False

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a pipeq process of this deployment on any host."""
        env = dict(os.environ)
        env.update({"PIPEQ_REDIS_URL": self.url, "PIPEQ_QUEUE_PREFIX": self.prefix,
                    "PIPEQ_ROUTES_FILE": str(self.workdir / "routes.toml"),
                    "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1"})
        env.update({f"PIPEQ_{k.upper()}": str(v) for k, v in self.settings.items()})
        env.update(extra)
        return env

    def hostname(self, host: str) -> str:
        """The Celery hostname (and holder name) of the worker on ``host``."""
        return f"{host}@{self.bed.tag}"

    def start_worker(self, host: str, *args: str) -> WorkerProcess:
        """``pipeq worker`` on ``host`` (not waiting for it to be ready)."""
        argv = [sys.executable, "-P", "-m", "pipeq", "worker", "--task", self.task,
                "--model", self.model, "--device", "cpu", "--hostname", self.hostname(host),
                *args]
        worker = WorkerProcess(self.bed.command(host, argv), self.env(),
                               self.workdir / f"worker-{host}.log")
        self.workers[host] = worker
        return worker

    def produce(self, inputs: list[str], wait_s: float = 120) -> subprocess.Popen[str]:
        """A producer on the producer host submitting ``inputs``; ``report()`` reads it."""
        name = uuid.uuid4().hex[:8]
        (self.workdir / f"in-{name}.json").write_text(json.dumps(inputs))
        argv = [sys.executable, "-P", str(PRODUCE), "jobs", "--task", self.task, "--model",
                self.model, "--inputs", str(self.workdir / f"in-{name}.json"), "--wait",
                str(wait_s), "--out", str(self.workdir / f"out-{name}.json")]
        proc = subprocess.Popen(self.bed.command("prod", argv), env=self.env(), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc.report_path = self.workdir / f"out-{name}.json"  # type: ignore[attr-defined]
        return proc

    @staticmethod
    def report(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        """The report of a producer started by :meth:`produce` (waits for it to end)."""
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate(timeout=10)
            raise AssertionError(f"the producer did not end in {timeout}s:\n{output}") from None
        assert proc.returncode == 0, output
        return dict(json.loads(proc.report_path.read_text()))  # type: ignore[attr-defined]

    def close(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL) and Redis."""
        for worker in self.workers.values():
            worker.stop(timeout=15)
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)

    # --- what the observer sees -------------------------------------------------------------

    def live_workers(self) -> set[str]:
        """Hostnames of the route's workers whose heartbeat is current."""
        names = self.observer.zrangebyscore(self.keys.route_workers(self.route), time.time(),
                                            "+inf")
        return {as_text(n) for n in names}

    def worker_info(self, host: str) -> dict[str, Any]:
        """The self-description the worker on ``host`` last announced ({} if none)."""
        raw = self.observer.get(self.keys.worker_info(self.hostname(host)))
        return dict(json.loads(raw)) if raw else {}

    def records(self, job_ids: list[str]) -> list[dict[str, str]]:
        """Each job's record (state, worker, starts, data), as Redis holds it."""
        pipe = self.observer.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.result(job_id))
        return [{as_text(k): (v if k == b"data" else as_text(v)) for k, v in row.items()}
                for row in pipe.execute()]

    def stored(self, state: str = "SUCCESS") -> int:
        """How many final records of ``state`` the route's workers stored (each once)."""
        raw = self.observer.hget(self.keys.route_stats(self.route), JOBS_IN_STATE + state)
        return int(raw or 0)

    def held_jobs(self, host: str) -> set[str]:
        """Job ids of the messages the worker on ``host`` holds, as its holder record says."""
        tags = self.observer.hkeys(self.keys.held(self.hostname(host)))
        if not tags:
            return set()
        entries = self.observer.hmget(self.keys.unacked(), tags)
        return {json.loads(e)[0]["headers"]["id"] for e in entries if e}
