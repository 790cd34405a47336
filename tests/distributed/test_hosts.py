"""pipeq over several hosts: Redis, three worker hosts and a producer host, each a network
namespace of its own on a private bridge (netbed), real ``pipeq worker`` processes and real
producer processes, each on its host.

Every pipeline call of the route sleeps SLOW_MS first (fault injection, ``slow_ms``): a fixed
cost per call that does not use the CPU, as a GPU call would not (the machine has 2 cores),
so that throughput measures the hosts and not the cores. Each scenario counts the jobs
answered, lost, stored twice and wrong (compared with the local ``transformers.pipeline()``).

1. Scaling: throughput with 1, 2 and 3 worker hosts.
2. A worker host's link is cut mid-batch: the jobs it held finish on the other hosts once its
   holder lease expires (hand-over), long before the visibility timeout; when it comes back
   it learns it was declared dead, and its late results change nothing.
3. A producer host is cut off: BrokerUnavailable within the connect timeout, never a hang.

And the bed cleans up after itself: namespaces of a run that crashed are removed by the next.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers
from cluster import PRODUCE, Cluster
from compare import assert_same
from conftest import ROOT, wait_until
from netbed import NAME_PREFIX, NetBed, ip, remove_stale, short_tempdir, why_unusable
from tiny_models import CORPUS, build_text_model

from pipeq.core.registry import MISSED_BEATS

pytestmark = pytest.mark.distributed

TASK = "text-classification"
HOSTS = ["redis", "w1", "w2", "w3", "prod"]
WORKER_HOSTS = ["w1", "w2", "w3"]
SLOW_MS = 500
BATCH = 8
BEAT_S = 1.0
CONNECT_TIMEOUT_S = 2.0
#: Messages a worker holds: the batch it runs and the next one (claimed while the first
#: runs); a deeper prefetch would leave hosts idle at the end.
WORKER_ARGS = ("--cpu-instances", "1", "--max-batch-size", str(BATCH), "--prefetch",
               str(2 * BATCH), "--max-wait-ms", "5")
#: Jobs per worker host in the scaling runs (~4 s of work each).
JOBS_PER_HOST = 64


@pytest.fixture(scope="module")
def bed() -> Iterator[NetBed]:
    """Five hosts on one bridge; removed afterwards, whatever happened."""
    reason = why_unusable()
    if reason:
        pytest.skip(f"distributed tests need Linux network namespaces: {reason}")
    net = NetBed(HOSTS).create()
    try:
        yield net
    finally:
        net.close()
    assert not net.leftovers(), net.leftovers()


@pytest.fixture(scope="module")
def model(models_dir: Path) -> str:
    """The tiny text-classification model."""
    return str(build_text_model(TASK, models_dir))


@pytest.fixture(scope="module")
def local(model: str) -> Any:
    """The local truth: transformers.pipeline() on the same model."""
    return transformers.pipeline(TASK, model=model)


@pytest.fixture(scope="module")
def cluster(bed: NetBed, model: str) -> Iterator[Cluster]:
    """Redis on its host; workers start as the scenarios need them."""
    workdir = short_tempdir(bed.tag)
    dep = Cluster(bed, workdir, TASK, model, heartbeat_s=BEAT_S,
                  faults=f"slow_ms={SLOW_MS}", connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        dep.start_redis()
        yield dep
    finally:
        for host in HOSTS:
            bed.mend(host)
        dep.close()


def serving(cluster: Cluster, count: int) -> list[str]:
    """The first ``count`` worker hosts, started where needed and announced as live."""
    hosts = WORKER_HOSTS[:count]
    started = [cluster.start_worker(h, *WORKER_ARGS) for h in hosts
               if h not in cluster.workers]
    for worker in started:
        worker.wait_ready()
    names = {cluster.hostname(h) for h in hosts}
    wait_until(lambda: names <= cluster.live_workers(), 10, f"{names} announced")
    return hosts


def texts(count: int, tag: str) -> list[str]:
    """``count`` different inputs."""
    return [f"{CORPUS[i % len(CORPUS)]} {tag}{i}" for i in range(count)]


def tally(cluster: Cluster, report: dict[str, Any], local: Any, stored_before: int
          ) -> dict[str, int]:
    """Jobs answered, lost (no answer), duplicated (stored twice) and wrong."""
    answers = report["answers"]
    answered = [a for a in answers if "error" not in a]
    wrong = 0
    for answer in answered:
        try:
            assert_same(answer["result"], local(answer["input"]))
        except AssertionError:
            wrong += 1
    stored = cluster.stored() - stored_before
    return {"jobs": len(answers), "answered": len(answered),
            "lost": len(answers) - len(answered), "duplicated": stored - len(answered),
            "wrong": wrong}


def progress(cluster: Cluster, base: int, total: int, timeout: float
             ) -> list[tuple[float, int]]:
    """(time, jobs stored) every ~20 ms until ``total`` jobs are stored."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = cluster.stored() - base
        samples.append((time.monotonic(), done))
        if done >= total:
            return samples
        time.sleep(0.02)
    raise AssertionError(f"{samples[-1][1]} of {total} jobs stored after {timeout}s")


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """Jobs per second between 10% and 90% done (start-up and tail left out)."""
    low = next(t for t, n in samples if n >= total * 0.1)
    high = next(t for t, n in samples if n >= total * 0.9)
    return (total * 0.8) / max(high - low, 1e-6)


def test_throughput_grows_with_worker_hosts(cluster: Cluster, local: Any) -> None:
    rates: dict[int, float] = {}
    spans: dict[int, float] = {}
    for count in (1, 2, 3):
        serving(cluster, count)
        inputs = texts(JOBS_PER_HOST * count, f"scale{count} ")
        base = cluster.stored()
        producer = cluster.produce(inputs)
        samples = progress(cluster, base, len(inputs), timeout=120)
        report = cluster.report(producer, timeout=60)
        counts = tally(cluster, report, local, base)
        assert counts["lost"] == counts["duplicated"] == counts["wrong"] == 0, counts
        rates[count] = steady_rate(samples, len(inputs))
        spans[count] = report["last_answer"] - report["first_submit"]
        print(f"\n{count} worker host(s): {len(inputs)} jobs, steady {rates[count]:.1f} jobs/s, "
              f"first submit to last answer {spans[count]:.2f}s "
              f"({len(inputs) / spans[count]:.1f} jobs/s); {counts}")
    per_host = BATCH / (SLOW_MS / 1000)
    print(f"scaling (steady rate): 2 hosts {rates[2] / rates[1]:.2f}x, 3 hosts "
          f"{rates[3] / rates[1]:.2f}x; end to end: 3 hosts "
          f"{(3 * JOBS_PER_HOST / spans[3]) / (JOBS_PER_HOST / spans[1]):.2f}x "
          f"(ideal {per_host:.1f} jobs/s per host)")
    assert rates[1] > 0.7 * per_host, rates
    # The goal is 2.7x (3.1-3.2x in most runs); 2.3x leaves room for a 2-core machine that
    # other test runs load at the same time (2.4-2.5x seen then).
    assert rates[3] / rates[1] >= 2.3, rates
    # Nobody was taken for dead while working: the leases held under full load.
    assert all(cluster.worker_info(h).get("declared_dead") == 0 for h in WORKER_HOSTS)


def mid_batch(cluster: Cluster, host: str) -> set[str]:
    """Wait until the worker on ``host`` runs a batch; the ids of its started jobs."""
    name = cluster.hostname(host)

    def running() -> set[str]:
        held = sorted(cluster.held_jobs(host))
        return {j for j, r in zip(held, cluster.records(held), strict=True)
                if r.get("state") == "STARTED" and r.get("worker") == name}

    return wait_until(running, 60, f"a batch running on {host}", interval=0.01)


def test_a_cut_worker_hosts_jobs_finish_on_the_others(cluster: Cluster, bed: NetBed,
                                                      local: Any) -> None:
    serving(cluster, 3)
    inputs = texts(240, "cut ")
    base = cluster.stored()
    producer = cluster.produce(inputs)
    running = mid_batch(cluster, "w1")
    time.sleep(SLOW_MS / 2000)
    bed.cut("w1")
    cut_at = time.monotonic()
    # What it held and had not finished (one stored a moment before the cut may not be
    # acknowledged yet: its record is w1's, and stays so).
    holding = sorted(cluster.held_jobs("w1"))
    held = [j for j, r in zip(holding, cluster.records(holding), strict=True)
            if r.get("state") != "SUCCESS"]
    assert set(running) <= set(held)
    holder = cluster.hostname("w1")

    def restored() -> bool:
        return cluster.observer.zscore(cluster.keys.holders(), holder) is None

    wait_until(restored, 30, "w1's held messages handed over", interval=0.02)
    restored_s = time.monotonic() - cut_at
    wait_until(lambda: all(r.get("state") == "SUCCESS" for r in cluster.records(held)), 60,
               "w1's jobs finished elsewhere", interval=0.02)
    handover_s = time.monotonic() - cut_at
    report = cluster.report(producer, timeout=120)
    counts = tally(cluster, report, local, base)
    ids = [a["id"] for a in report["answers"]]
    before = cluster.records(ids)
    by_id = dict(zip(ids, before, strict=True))
    print(f"\ncut worker host: {len(held)} jobs held ({len(running)} running), back in the "
          f"queue after {restored_s:.2f}s, all finished elsewhere after {handover_s:.2f}s "
          f"(heartbeat {BEAT_S}s, lease {MISSED_BEATS * BEAT_S}s, visibility timeout 300s); "
          f"{counts}")
    assert counts["lost"] == counts["duplicated"] == counts["wrong"] == 0, counts
    assert all(by_id[j]["worker"] != holder for j in held)
    # The bound: the lease, plus one renewal period of the peers (+ slack for a busy box).
    assert restored_s <= (MISSED_BEATS + 1) * BEAT_S + 1.5, restored_s
    assert handover_s <= (MISSED_BEATS + 1) * BEAT_S + 5, handover_s

    # w1 comes back: it learns it was declared dead, settles its late jobs, serves on, and
    # nothing it does changes a record.
    bed.mend("w1")
    wait_until(lambda: cluster.worker_info("w1").get("declared_dead", 0) >= 1
               and cluster.worker_info("w1").get("in_flight") == 0, 60,
               "w1 back, told it was declared dead, its late jobs settled")
    assert "was declared dead" in cluster.workers["w1"].log()
    assert cluster.records(ids) == before
    assert cluster.stored() - base == len(ids)
    assert cluster.observer.hlen(cluster.keys.unacked()) == 0  # nothing left to redeliver
    assert holder in cluster.live_workers()


def test_a_cut_producer_host_gets_broker_unavailable_in_time(cluster: Cluster, bed: NetBed
                                                             ) -> None:
    serving(cluster, 1)
    go = cluster.workdir / "go"
    out = cluster.workdir / "cut-report.json"
    argv = [sys.executable, "-P", str(PRODUCE), "cut", "--task", TASK, "--model",
            cluster.model, "--go", str(go), "--out", str(out)]
    proc = subprocess.Popen(bed.command("prod", argv), env=cluster.env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        # READY once its call went through (bounded: a producer that hangs fails the test)
        assert select.select([proc.stdout], [], [], 90)[0], "the producer never got going"
        line = proc.stdout.readline()
        assert line.strip() == "READY", line + proc.stdout.read()
        bed.cut("prod")
        go.touch()
        output, _ = proc.communicate(timeout=CONNECT_TIMEOUT_S * 4 + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        bed.mend("prod")
    report = json.loads(out.read_text())
    print(f"\ncut producer host (connect timeout {CONNECT_TIMEOUT_S}s): {report}")
    for step in ("submit", "status"):
        assert "pipeq.errors.BrokerUnavailable" in report[step]["outcome"], (report, output)
        assert report[step]["seconds"] <= CONNECT_TIMEOUT_S + 1.0, report


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    reason = why_unusable()
    if reason:
        pytest.skip(f"distributed tests need Linux network namespaces: {reason}")
    ended = subprocess.Popen(["true"])  # its pid no longer runs: a crashed run's
    ended.wait(10)
    stale = f"{NAME_PREFIX}{ended.pid}-w1"
    ip("netns", "add", stale)
    try:
        assert stale in remove_stale()
        assert stale not in ip("netns", "list").stdout.split()
    finally:
        ip("netns", "del", stale, check=False)
