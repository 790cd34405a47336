"""Redis going away: queued jobs survive a crash, workers and producers reconnect by
themselves, and a producer that cannot reach Redis is told so within a bounded time.

This module runs its own redis-server, on a fixed port and directory so that it can be
stopped and started again, with the persistence of ``settings/redis.conf``: AOF with fsync
every second, no eviction. (The shipped file itself needs Redis 7 for ``appenddirname``;
the embedded server is 6.2, so the same settings are given on the command line.)
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from compare import assert_same
from conftest import Deployment, wait_until
from fault_support import (  # noqa: F401 - model, local, remote: module fixtures
    TASK,
    local,
    model,
    queue_length,
    remote,
    texts,
)
from redis_server import RedisServer

from pipeq import Job, RemotePipeline
from pipeq.client import Client
from pipeq.errors import BrokerUnavailable

CONNECT_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own persistent Redis."""
    redis_server = RedisServer(tmp_path_factory.mktemp("redis-restart"))
    redis_server.start()
    yield redis_server
    redis_server.close()


@pytest.fixture(scope="module")
def dep(server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A deployment on that Redis; producers give up on it after CONNECT_TIMEOUT_S."""
    deployment = Deployment(server.url, tmp_path_factory.mktemp("restart-dep"),
                            connect_timeout_s=CONNECT_TIMEOUT_S)
    yield deployment
    for worker in deployment.workers:
        worker.stop()
    Client.discard(deployment.settings)


def test_queued_jobs_survive_a_redis_crash(server: RedisServer, dep: Deployment, model: str,
                                           remote: RemotePipeline, local: Any) -> None:
    inputs = texts(20, "survivor ")
    jobs = [remote.submit(text, require_worker=False, timeout=600) for text in inputs]
    assert queue_length(dep, remote.route) == len(jobs)
    time.sleep(1.2)  # appendfsync everysec: what is older than a second is on disk
    server.stop(signal.SIGKILL)
    server.start()
    assert queue_length(dep, remote.route) == len(jobs)
    assert [job.status() for job in jobs] == ["PENDING"] * len(jobs)

    dep.start_worker(TASK, model)
    for text, job in zip(inputs, jobs, strict=True):
        assert_same(job.result(timeout=60), local(text))


def test_worker_and_producer_reconnect_after_a_restart(
        server: RedisServer, dep: Deployment, model: str, remote: RemotePipeline,
        local: Any) -> None:
    (worker,) = [w for w in dep.workers if w.proc.poll() is None] or [
        dep.start_worker(TASK, model)]
    assert_same(remote("before the restart", timeout=30), local("before the restart"))
    server.stop()
    time.sleep(1.0)  # the worker and the producer notice that Redis is gone
    server.start()
    inputs = texts(10, "after a restart ")
    # The producer's first calls may meet closed connections: they are retried, not raised.
    jobs = [remote.submit(text, timeout=120) for text in inputs]
    for text, job in zip(inputs, jobs, strict=True):
        assert_same(job.result(timeout=60), local(text))
    assert worker.proc.poll() is None  # the same worker process reconnected
    assert "pipeq worker ready" in worker.log()


def test_producer_without_redis_gets_broker_unavailable_in_bounded_time(
        server: RedisServer, dep: Deployment, model: str, remote: RemotePipeline,
        local: Any) -> None:
    job = remote.submit("submitted while Redis is up", timeout=120)
    answer = job.result(timeout=60)
    server.stop()
    # The handle keeps the result it was woken with: no Redis needed to read it again.
    assert job.result(timeout=1) == answer
    other_handle = Job(remote.client, job.id)
    url = f"redis://127.0.0.1:{server.port}/0"
    calls = {
        "submit": lambda: remote.submit("hello"),
        "submit(require_worker=False)": lambda: remote.submit("hello", require_worker=False),
        "job.status()": job.status,
        "job.result() of another handle": lambda: other_handle.result(timeout=30),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as info:
            call()
        took = time.monotonic() - started
        print(f"\nRedis down: {name} -> BrokerUnavailable after {took:.1f}s: {info.value}")
        assert f"cannot reach Redis at {url}" in str(info.value)
        assert took < CONNECT_TIMEOUT_S + 5, f"{name} took {took:.1f}s"

    started = time.monotonic()
    cli = dep.cli("submit", "--task", TASK, "--model", model, "--no-require-worker", "hello")
    assert cli.returncode == 5, cli.stdout + cli.stderr  # documented: Redis unreachable
    assert "cannot reach Redis" in cli.stderr
    assert time.monotonic() - started < CONNECT_TIMEOUT_S + 20

    # Redis back: the worker announces itself again (its heartbeat reconnects), and the same
    # producer and worker go on.
    server.start()
    wait_until(lambda: remote.client.registry.workers(remote.route), 10,
               "the worker's heartbeat to reach the restarted Redis")
    assert_same(remote("Redis is back", timeout=60), local("Redis is back"))
