"""Workers that die or stop, against real Redis and real worker processes.

One route (the tiny text-classification model), workers started one after another as the
story goes, all with injected faults: every pipeline call sleeps 300 ms (batches take time,
so a signal lands mid-batch) and an input containing BOOM kills its worker (SIGKILL, as a
segfaulting model would). Messages a dead worker held come back after 4 s (visibility
timeout); a job started more than twice is a poison message.

1. SIGKILL mid-batch with 300 jobs queued and in flight; a new worker finishes them all.
2. SIGTERM: the batch in hand finishes, unstarted jobs go back to the queue, exit 0.
3. A job that kills every worker that runs it ends as PoisonMessage in the dead-letter list;
   ``pipeq dead requeue`` runs it again once a fixed worker serves the route.
4. A job longer than the visibility timeout runs once (leases are renewed).
5. A message is never popped without being recorded as unacknowledged in the same step:
   a frozen waiting worker takes nothing, one killed the instant it takes a message loses
   nothing.
"""

from __future__ import annotations

import json
import re
import signal
import time
from typing import Any

import pytest
from compare import assert_same
from conftest import Deployment, WorkerProcess, wait_until
from fault_support import (  # noqa: F401 - model, local, remote: module fixtures
    TASK,
    dead_letters,
    hostname_pid,
    local,
    model,
    queue_length,
    ran_on,
    remote,
    starts,
    states,
    stored_count,
    tally,
    texts,
    unacked_count,
    whereabouts,
)

from pipeq import Job, RemotePipeline
from pipeq.errors import JobFailed

VISIBILITY_S = 4
SLOW_MS = 300
#: The worker that serves the route once the crashing input is known (test 3, 4): no crash
#: marker, long calls, a visibility timeout shorter than one call.
FIXED_WORKER_ENV = {"PIPEQ_FAULTS": "slow_ms=5000", "PIPEQ_VISIBILITY_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def dep(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A deployment whose workers are slow, die on BOOM, and give up on a job after 2 starts."""
    deployment = Deployment(redis_url, tmp_path_factory.mktemp("death"),
                            visibility_timeout_s=VISIBILITY_S, max_deliveries=2,
                            faults=f"slow_ms={SLOW_MS},crash_marker=BOOM")
    yield deployment
    deployment.close()


def live_workers(dep: Deployment) -> list[WorkerProcess]:
    """Workers of this deployment still running."""
    return [w for w in dep.workers if w.proc.poll() is None]


def serving(dep: Deployment, model: str, count: int = 1, **env: str) -> list[WorkerProcess]:
    """The live workers, after starting enough (at once) for ``count`` to be serving."""
    started = [dep.start_worker(TASK, model, ready=False, env=env)
               for _ in range(count - len(live_workers(dep)))]
    for worker in started:
        worker.wait_ready()
    return live_workers(dep)


def finished(dep: Deployment, remote: RemotePipeline, job_ids: list[str], timeout: float
             ) -> None:
    """Wait until every job is final; fail saying where the others are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "PENDING" not in (now := states(dep, job_ids)) and "STARTED" not in now:
            return
        time.sleep(0.2)
    left = {j: w for j, w in whereabouts(dep, remote.route, job_ids).items()
            if not w.startswith(("SUCCESS", "FAILURE"))}
    raise AssertionError(f"{len(left)} job(s) not finished after {timeout}s: {left}")


def fixed_worker(dep: Deployment, model: str) -> WorkerProcess:
    """The one worker serving the route, with FIXED_WORKER_ENV and one model instance (calls
    run one at a time), the others stopped."""
    fixed = None
    for worker in live_workers(dep):
        if fixed is None and "FAULT INJECTION ACTIVE: slow_ms=5000" in worker.log():
            fixed = worker
        else:
            worker.stop()
    return fixed or dep.start_worker(TASK, model, "--cpu-instances", "1", env=FIXED_WORKER_ENV)


def signal_at_batch_start(dep: Deployment, worker: WorkerProcess, job_ids: list[str],
                          sig: int, min_done: int, delay: float = 0.0) -> None:
    """Send ``sig`` to ``worker`` ``delay`` seconds after one of its batches began.

    A batch has begun when jobs turn STARTED that were not a poll ago (polls are ~10 ms
    apart, a batch lasts at least SLOW_MS).
    """
    before: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = dict(zip(job_ids, states(dep, job_ids), strict=True))
        started = {j for j, s in now.items() if s == "STARTED"}
        done = sum(s == "SUCCESS" for s in now.values())
        if done >= min_done and started - before:
            time.sleep(delay)
            worker.proc.send_signal(sig)
            return
        before = started
        time.sleep(0.01)
    raise AssertionError(f"no batch began after {min_done} jobs were done:\n{worker.log()}")


def test_sigkill_mid_batch_loses_nothing(dep: Deployment, model: str, remote: RemotePipeline,
                                         local: Any) -> None:
    first = serving(dep, model)[0]
    inputs = texts(300, "killed ")
    jobs = [remote.submit(text, timeout=600) for text in inputs]
    ids = [j.id for j in jobs]

    # Half-way into a batch (see test_message_popped_by_a_killed_worker_is_not_lost for the
    # moment a kill can lose a message).
    signal_at_batch_start(dep, first, ids, signal.SIGKILL, min_done=40, delay=SLOW_MS / 2000)
    assert first.wait_exit(30) == -signal.SIGKILL
    at_kill = dict(zip(ids, states(dep, ids), strict=True))
    in_hand = [j for j, s in at_kill.items() if s == "STARTED"]
    done_before = [j for j, s in at_kill.items() if s == "SUCCESS"]
    assert in_hand, f"the kill did not land mid-batch: {tally(list(at_kill.values()))}"
    assert len(done_before) < len(ids)

    second = dep.start_worker(TASK, model)
    finished(dep, remote, ids, timeout=90)
    results = [job.result(timeout=10) for job in jobs]

    final = states(dep, ids)
    counts = starts(dep, ids)
    hosts = dict(zip(ids, ran_on(dep, ids), strict=True))
    by_id = dict(zip(ids, counts, strict=True))
    completed = final.count("SUCCESS")
    stored = stored_count(dep, remote.route)
    redeliveries = sum(c - 1 for c in counts)
    print(f"\nSIGKILL mid-batch: submitted={len(ids)} completed={completed} "
          f"lost={len(ids) - completed} duplicated results={stored - completed} "
          f"re-deliveries={redeliveries} (jobs in the killed batch: {len(in_hand)}, "
          f"done before the kill: {len(done_before)}, pending then: "
          f"{len(ids) - len(in_hand) - len(done_before)})")

    assert final == ["SUCCESS"] * len(ids), tally(final)
    assert stored == len(ids), "a result was stored more than once (or not at all)"
    for text, got in zip(inputs, results, strict=True):
        assert_same(got, local(text))
    # The jobs of the killed batch were started again, once; no other job ran twice.
    assert sorted(j for j in ids if by_id[j] == 2) == sorted(in_hand)
    assert set(counts) <= {1, 2}, tally(counts)
    assert redeliveries == len(in_hand) > 0
    # Results stored before the kill are the first worker's and stayed as they were.
    assert all(hostname_pid(first) in str(hosts[j]) for j in done_before)
    assert all(hostname_pid(second) in str(hosts[j]) for j in in_hand)


def test_sigterm_finishes_the_batch_and_returns_the_rest(
        dep: Deployment, model: str, remote: RemotePipeline, local: Any) -> None:
    worker = serving(dep, model)[0]
    # More jobs than one gather (4 calls' worth): the worker holds some it has not started.
    inputs = texts(400, "stopped ")
    jobs = [remote.submit(text, timeout=600) for text in inputs]
    ids = [j.id for j in jobs]

    # Mid-batch: messages keep arriving while the batch runs (acks free prefetch slots).
    signal_at_batch_start(dep, worker, ids, signal.SIGTERM, min_done=20, delay=SLOW_MS / 2000)
    asked = time.monotonic()
    in_hand = [j for j, s in zip(ids, states(dep, ids), strict=True) if s == "STARTED"]
    code = worker.wait_exit(60)
    took = time.monotonic() - asked
    assert code == 0, worker.log()[-3000:]
    assert took < 15, f"the worker took {took:.1f}s to stop"
    assert "finishing the jobs in hand" in worker.log()

    after = dict(zip(ids, states(dep, ids), strict=True))
    hosts = dict(zip(ids, ran_on(dep, ids), strict=True))
    returned = [j for j, s in after.items() if s == "PENDING"]
    # The batch in hand was finished and stored by the stopping worker ...
    assert in_hand and all(after[j] == "SUCCESS" for j in in_hand), tally(list(after.values()))
    assert all(hostname_pid(worker) in str(hosts[j]) for j in in_hand)
    # ... nothing was left half-done, and every job not run is back in the queue.
    assert set(after.values()) <= {"SUCCESS", "PENDING"}, tally(list(after.values()))
    # The jobs it had received and not started were handed back (rejected with requeue).
    prefetched = set(re.findall(r"job ([0-9a-f]{32}) handed back to the queue: the worker "
                                "stops before it started", worker.log()))
    assert prefetched, "the worker handed back no message it had received"
    assert prefetched <= set(ids)
    assert all(after[j] == "PENDING" for j in prefetched), tally([after[j] for j in prefetched])
    assert queue_length(dep, remote.route) == len(returned)
    assert unacked_count(dep) == 0

    # Two new workers (they also serve test 3) finish the rest.
    serving(dep, model, count=2)
    results = [job.result(timeout=120) for job in jobs]
    counts = starts(dep, ids)
    print(f"\nSIGTERM: submitted={len(ids)} stopped in {took:.1f}s, exit {code}; "
          f"finished by the stopping worker={len(ids) - len(returned)} (batch in hand: "
          f"{len(in_hand)}), received and handed back={len(prefetched)}, in the queue after "
          f"the exit={len(returned)}; completed={states(dep, ids).count('SUCCESS')} "
          f"lost=0 re-deliveries={sum(c - 1 for c in counts)}")
    for text, got in zip(inputs, results, strict=True):
        assert_same(got, local(text))
    assert counts == [1] * len(ids), f"a job ran twice: {tally(counts)}"


def test_job_that_kills_every_worker_becomes_a_dead_letter(
        dep: Deployment, model: str, remote: RemotePipeline, local: Any) -> None:
    victims = serving(dep, model, count=2)
    text = "BOOM goes the model"
    job = remote.submit(text, timeout=600)

    def dead() -> list[WorkerProcess]:
        return [w for w in victims if w.proc.poll() is not None]

    wait_until(lambda: dead(), 30, "a worker to die running the job")
    # The survivor gets the message after the visibility timeout, and dies in turn.
    wait_until(lambda: len(dead()) == 2, 30, "the second worker to die running the job")
    assert [w.proc.returncode for w in victims] == [-signal.SIGKILL] * 2
    assert starts(dep, [job.id]) == [2]
    assert job.status() == "STARTED"

    # A worker without the crash: the third delivery is over the limit, so the job is not
    # run again but failed and kept as a dead letter.
    fixed = fixed_worker(dep, model)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=60)
    assert info.value.error_type == "PoisonMessage"
    assert "started 2 times without finishing" in info.value.remote_message
    assert "over the limit of 2 (PIPEQ_MAX_DELIVERIES)" in info.value.remote_message
    assert job.status() == "FAILURE"
    assert starts(dep, [job.id]) == [3]
    (entry,) = [e for e in dead_letters(dep) if e.job_id == job.id]
    assert entry.request is not None and entry.request["inputs"] == [text]
    assert "started 2 times without finishing" in entry.reason

    listing = dep.cli("dead", "list")
    assert listing.returncode == 0, listing.stderr
    assert entry.id in listing.stdout and f"job={job.id}" in listing.stdout
    assert "started 2 times without finishing" in listing.stdout

    requeued = dep.cli("dead", "requeue", entry.id)
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    new_id = json.loads(requeued.stdout)["job_id"]
    assert new_id != job.id
    assert_same(Job(remote.client, new_id).result(timeout=60), local(text))
    assert entry.id not in [e.id for e in dead_letters(dep)]
    assert fixed.proc.poll() is None


def test_job_longer_than_the_visibility_timeout_runs_once(
        dep: Deployment, model: str, remote: RemotePipeline, local: Any) -> None:
    """Calls of 5 s, visibility timeout 2 s: one job runs 5 s, the next waits 5 s held by the
    worker (visibility is counted from delivery) and then runs 5 s; neither runs twice."""
    worker = fixed_worker(dep, model)
    started = time.monotonic()
    first = remote.submit("a long job", timeout=120)
    wait_until(lambda: first.status() == "STARTED", 30, "the first job to start")
    # The idle worker's claim marked it STARTED a moment (its gather) before its call began:
    # sent within that moment, the second job would share the call.
    time.sleep(1.0)
    second = remote.submit("a long wait, then a long job", timeout=120)
    assert_same(first.result(timeout=60), local("a long job"))
    assert_same(second.result(timeout=60), local("a long wait, then a long job"))
    took = time.monotonic() - started
    assert took > 9, f"two 5 s calls took {took:.1f}s: the fault injection is not active"
    assert starts(dep, [first.id, second.id]) == [1, 1]
    assert worker.proc.poll() is None


def only_worker(dep: Deployment, model: str, **env: str) -> WorkerProcess:
    """A fresh worker serving the route alone (the others are stopped)."""
    for worker in live_workers(dep):
        worker.stop()
    return dep.start_worker(TASK, model, env=env or None)


def test_frozen_waiting_worker_takes_no_message(
        dep: Deployment, model: str, remote: RemotePipeline, local: Any) -> None:
    """kombu's BRPOP took a message off the queue before recording it: a worker frozen
    (SIGSTOP) while waiting took the next message with it, and killed then, lost it. pipeq's
    worker waits without taking (BLMOVE queue->queue): the message stays queued."""
    victim = only_worker(dep, model)
    time.sleep(1.0)  # idle: waiting on the queue
    victim.proc.send_signal(signal.SIGSTOP)
    text = "sent while the only worker is frozen"
    try:
        job = remote.submit(text, timeout=600)
        time.sleep(1.0)
        place = whereabouts(dep, remote.route, [job.id])[job.id]
        assert place.endswith("message queued"), place
    finally:
        victim.proc.kill()
        victim.wait_exit(10)
    serving(dep, model)
    assert_same(job.result(timeout=60), local(text))
    assert starts(dep, [job.id]) == [1]


def test_worker_killed_the_instant_it_takes_a_message_loses_nothing(
        dep: Deployment, model: str, remote: RemotePipeline, local: Any) -> None:
    """The worker dies (SIGKILL, by fault injection) right after it took the message off
    the queue, before Celery saw it: the one atomic claim already recorded it as
    unacknowledged, so the visibility timeout gives it to the next worker, which runs it once.

    The idle worker's claim also started the job (claiming.ClaimStart): its death counts as
    one start, towards the poison limit, as a death inside the model call would."""
    victim = only_worker(dep, model, PIPEQ_FAULTS="claim_crash_marker=CLAIMED")
    text = "CLAIMED, then the worker died"
    job = remote.submit(text, timeout=600)
    victim.wait_exit(30)
    assert victim.proc.returncode == -signal.SIGKILL
    place = whereabouts(dep, remote.route, [job.id])[job.id]
    assert place == "STARTED, started 1x, message held (unacked)", place
    serving(dep, model)
    assert_same(job.result(timeout=60), local(text))
    assert starts(dep, [job.id]) == [2]
