"""A Redis at maxmemory (noeviction) under load, then given room: nothing is lost, the worker
says it cannot work meanwhile, and the same worker goes on serving afterwards.

The module runs its own small redis-server (``--maxmemory 48mb``); the test fills it with
junk keys while jobs run, so the worker's record writes and claims are refused with
``OOM command not allowed``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from compare import assert_same
from conftest import Deployment, wait_until
from fault_support import TASK, local, model, texts  # noqa: F401 - fixtures

from pipeq.errors import BrokerUnavailable
from pipeq.ops.embedded import start_redis_server

JUNK = b"x" * 256 * 1024
CRUMB = b"x" * 1024


@pytest.fixture(scope="module")
def small_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of its own with a small memory limit and no eviction."""
    proc, url = start_redis_server(tmp_path_factory.mktemp("full-redis"), extra=[
        "--maxmemory", "48mb", "--maxmemory-policy", "noeviction"])
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def dep(small_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(small_redis, tmp_path_factory.mktemp("full-dep"))
    yield deployment
    deployment.close()


def fill(client: redis.Redis, junk: list[str]) -> None:
    """Write junk (big, then small) until Redis refuses even a small write."""
    for value in (JUNK, CRUMB):
        for _ in range(5000):  # 48 MB / 256 KB is ~190 keys; the bound is a safety net
            key = f"junk:{len(junk)}"
            try:
                client.set(key, value)
            except redis.exceptions.OutOfMemoryError:
                break
            junk.append(key)
        else:
            raise AssertionError("Redis never refused a write: is maxmemory set?")


def status(dep: Deployment, model: str) -> tuple[int, Any]:
    done = dep.cli("status", "--task", TASK, "--model", model, "--json")
    return done.returncode, json.loads(done.stdout or "[]")


def test_a_full_redis_loses_nothing_and_the_worker_goes_on(dep: Deployment, model: str,
                                                           local: Any) -> None:
    worker = dep.start_worker(TASK, model, env={"PIPEQ_FAULTS": "slow_ms=300"})
    remote = dep.remote(TASK, model)
    inputs = texts(40, "full ")
    jobs = [remote.submit(text) for text in inputs]
    junk: list[str] = []
    refused: BrokerUnavailable | None = None
    for _ in range(50):  # the worker frees a little as it acknowledges: fill until refused
        fill(dep.redis, junk)
        try:
            jobs.append(remote.submit(f"late {len(jobs)}", require_worker=False))
            inputs.append(f"late {len(jobs) - 1}")
        except BrokerUnavailable as exc:
            refused = exc
            break
    # While full: the producer is told so, and the worker reports that it cannot work. (The
    # worker frees a little whenever it acknowledges: keep Redis full meanwhile.)
    assert refused is not None and "it is full" in str(refused), refused
    stop = threading.Event()

    def keep_full() -> None:
        while not stop.wait(0.05):
            fill(dep.redis, junk)

    filler = threading.Thread(target=keep_full, daemon=True)
    filler.start()
    try:
        wait_until(lambda: status(dep, model)[0] == 3, 30, "pipeq status saying DOWN")
    finally:
        stop.set()
        filler.join(10)
    # Given room again: every job reaches its final state, with the local pipeline's result.
    dep.redis.delete(*junk)
    for job, text in zip(jobs, inputs, strict=True):
        assert_same(job.result(timeout=120), local(text))
    wait_until(lambda: status(dep, model)[0] == 0, 30, "pipeq status saying ok again")
    assert_same(remote("after the storm", timeout=60), local("after the storm"))
    assert worker.proc.poll() is None  # the same worker, still serving
    assert "Redis fails" in worker.log() and "answers again" in worker.log()


class KeptFull:
    """Keeps Redis full from a thread (the worker frees a little whenever it acknowledges,
    and a client's freed buffers make room for small writes), then deletes the junk."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.junk: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            fill(self.client, self.junk)

    def __enter__(self) -> KeptFull:
        fill(self.client, self.junk)
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        self.thread.join(10)
        self.client.delete(*self.junk)


def test_a_worker_started_against_a_full_redis_waits_saying_why(dep: Deployment, model: str,
                                                                 local: Any) -> None:
    with KeptFull(dep.redis):
        worker = dep.start_worker(TASK, model, ready=False, env={"PIPEQ_DRAIN_TIMEOUT_S": "5"})
        wait_until(lambda: "Redis is full" in worker.log(), 120, "the worker saying Redis is full")
        time.sleep(2)
        assert worker.proc.poll() is None, worker.log()  # waiting, not "Unrecoverable error"
    worker.wait_ready()
    remote = dep.remote(TASK, model)
    assert_same(remote("room again", timeout=60), local("room again"))
    # Full again: SIGTERM still ends the worker within its drain bound.
    with KeptFull(dep.redis):
        started = time.monotonic()
        worker.stop(timeout=60)
        took = time.monotonic() - started
    assert took < 5 + 20, worker.log()[-2000:]
    assert "Unrecoverable error" not in worker.log()
