"""Hand-over on lease expiry with real worker processes, on one host (no root needed; the
network version, with a host's link cut, is tests/distributed).

Two workers of one route whose every pipeline call takes 2.5 s (fault injection), longer
than their holder lease (3 heartbeats of 0.5 s); the visibility timeout is 300 s.

1. Slow but alive: every job runs once; neither worker is taken for dead.
2. Frozen (SIGSTOP) mid-batch: the jobs it held finish on the other worker within the lease
   plus a renewal period and one call; thawed (SIGCONT), it learns it was declared dead,
   and its late results change no record.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
from compare import assert_same
from conftest import Deployment, WorkerProcess, wait_until
from fault_support import (  # noqa: F401 - model, local, remote: module fixtures
    TASK,
    fields,
    local,
    model,
    remote,
    stored_count,
    texts,
)

from pipeq import RemotePipeline
from pipeq.core.registry import MISSED_BEATS

BEAT_S = 0.5
CALL_S = 2.5
WORKER_ARGS = ("--cpu-instances", "1", "--max-batch-size", "8", "--prefetch", "8")


@pytest.fixture(scope="module")
def dep(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A deployment whose calls outlast the workers' leases."""
    deployment = Deployment(redis_url, tmp_path_factory.mktemp("handover"),
                            heartbeat_s=BEAT_S, visibility_timeout_s=300,
                            faults=f"slow_ms={int(CALL_S * 1000)}")
    yield deployment
    for worker in deployment.workers:  # a frozen worker cannot stop
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGCONT)
    deployment.close()


def hostname(dep: Deployment, name: str) -> str:
    return f"{name}@{dep.prefix}"


def workers(dep: Deployment, model: str) -> dict[str, WorkerProcess]:
    """Workers a and b (started once, together)."""
    if not dep.workers:
        started = [dep.start_worker(TASK, model, *WORKER_ARGS, "--hostname",
                                    hostname(dep, name), ready=False) for name in "ab"]
        for worker in started:
            worker.wait_ready()
    return dict(zip("ab", dep.workers, strict=True))


def info(dep: Deployment, name: str) -> dict[str, Any]:
    raw = dep.redis.get(dep.settings.keys.worker_info(hostname(dep, name)))
    return dict(json.loads(raw)) if raw else {}


def held_jobs(dep: Deployment, name: str) -> set[str]:
    """Job ids of the messages worker ``name`` holds, as its holder record says."""
    keys = dep.settings.keys
    tags = dep.redis.hkeys(keys.held(hostname(dep, name)))
    entries = dep.redis.hmget(keys.unacked(), tags) if tags else []
    return {json.loads(e)[0]["headers"]["id"] for e in entries if e}


def snapshot(dep: Deployment, job_ids: list[str]) -> list[list[bytes | None]]:
    """Each job's state, worker and result bytes as stored."""
    pipe = dep.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(dep.settings.keys.result(job_id), "state", "worker", "data")
    return list(pipe.execute())


def test_a_slow_live_worker_keeps_its_jobs(dep: Deployment, model: str,
                                           remote: RemotePipeline, local: Any) -> None:
    workers(dep, model)
    inputs = texts(16, "slow ")
    jobs = [remote.submit(text, timeout=120) for text in inputs]
    results = [job.result(timeout=60) for job in jobs]
    for text, got in zip(inputs, results, strict=True):
        assert_same(got, local(text))
    starts = [row[0] for row in fields(dep, [j.id for j in jobs], "starts")]
    assert starts == ["1"] * len(jobs)  # no job was handed over from a live worker
    assert [info(dep, n).get("declared_dead") for n in "ab"] == [0, 0]
    assert [info(dep, n).get("handed_over") for n in "ab"] == [0, 0]


def test_a_frozen_workers_jobs_finish_on_the_other(dep: Deployment, model: str,
                                                   remote: RemotePipeline, local: Any) -> None:
    frozen = workers(dep, model)["a"]
    base = stored_count(dep, remote.route)
    inputs = texts(24, "frozen ")
    jobs = [remote.submit(text, timeout=120) for text in inputs]
    ids = [j.id for j in jobs]

    def running() -> set[str]:
        held = sorted(held_jobs(dep, "a"))
        rows = fields(dep, held, "state", "worker")
        return {j for j, (state, by) in zip(held, rows, strict=True)
                if state == "STARTED" and by == hostname(dep, "a")}

    in_hand = wait_until(running, 30, "a batch running on worker a", interval=0.01)
    frozen.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    # What it held and had not finished (one stored a moment before may not be acknowledged
    # yet: its record is a's, and stays so).
    holding = sorted(held_jobs(dep, "a"))
    held = [j for j, (state,) in zip(holding, fields(dep, holding, "state"), strict=True)
            if state != "SUCCESS"]
    assert in_hand <= set(held)
    wait_until(lambda: all(r == ["SUCCESS"] for r in fields(dep, held, "state")), 30,
               "the frozen worker's jobs finished by the other")
    took = time.monotonic() - frozen_at
    print(f"\nfrozen worker: {len(held)} jobs held, finished by the other worker after "
          f"{took:.2f}s (lease {MISSED_BEATS * BEAT_S}s, one call {CALL_S}s)")
    assert took <= (MISSED_BEATS + 1) * BEAT_S + 2 * CALL_S + 2, took
    assert all(r == [hostname(dep, "b")] for r in fields(dep, held, "worker"))
    results = [job.result(timeout=60) for job in jobs]
    for text, got in zip(inputs, results, strict=True):
        assert_same(got, local(text))
    before = snapshot(dep, ids)

    frozen.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: info(dep, "a").get("declared_dead", 0) >= 1
               and info(dep, "a").get("in_flight") == 0, 30,
               "worker a thawed, told it was declared dead, its late jobs settled")
    assert "was declared dead" in frozen.log()
    assert snapshot(dep, ids) == before
    assert stored_count(dep, remote.route) - base == len(ids)
    assert dep.redis.hlen(dep.settings.keys.unacked()) == 0
