"""Faults inside a job, against real Redis and real worker processes with injected faults.

Three routes serve copies of the tiny text-classification model, each worker with its own
fault (see worker/faults.py):

- ``transient``: the first 5 pipeline calls raise ConnectionError; up to 2 retries with
  backoff from 0.2 s. The first job fails after 3 attempts, carrying the cause; the second
  meets the last 2 faults and succeeds on its third attempt.
- ``oom``: a call with more than 2 inputs, or with an input containing HUGE, raises a
  CUDA-style out-of-memory error.
- ``slow``: every call takes 2.5 s, and the routing table limits the route's jobs to 1 s.
  Before its worker starts, one job is queued with a 1 s deadline and one is cancelled.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import Deployment, WorkerProcess, wait_until
from fault_support import (
    TASK,
    copy_model,
    fields,
    queue_length,
    starts,
    states,
    texts,
)
from tiny_models import build_text_model

from pipeq import Job, RemotePipeline
from pipeq.core.store import JobStore
from pipeq.errors import JobCancelled, JobExpired, JobFailed

SLOW_S = 2.5
ROUTE_TIMEOUT_S = 1.0
BACKOFF_S = 0.2
WORKER_ENV = {
    "transient": {"PIPEQ_FAULTS": "transient=5", "PIPEQ_MAX_RETRIES": "2",
                  "PIPEQ_RETRY_BACKOFF_S": str(BACKOFF_S)},
    "oom": {"PIPEQ_FAULTS": "oom_above=2,oom_marker=HUGE"},
    "slow": {"PIPEQ_FAULTS": f"slow_ms={int(SLOW_S * 1000)}"},
}


@dataclass
class Served:
    """A route of this module and its one worker."""

    remote: RemotePipeline
    worker: WorkerProcess


@dataclass
class Queued:
    """Jobs of the slow route queued before its worker started."""

    expiring: Job
    cancelled: Job
    cancel_returned: bool


@dataclass
class Routes:
    """Everything the module's tests share."""

    dep: Deployment
    served: dict[str, Served]
    queued: Queued
    local: Any


@pytest.fixture(scope="module")
def routes(redis_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Routes]:
    """Three faulty routes with a worker each (started together), and the local truth."""
    workdir = tmp_path_factory.mktemp("job-faults")
    base = build_text_model(TASK, models_dir)
    paths = {name: copy_model(base, workdir, f"tc-{name}") for name in WORKER_ENV}
    (workdir / "routes.toml").write_text(
        f'[[route]]\ntask = "{TASK}"\nmodel = "{paths["slow"]}"\n'
        f"timeout_s = {ROUTE_TIMEOUT_S}\n")
    dep = Deployment(redis_url, workdir)
    slow = dep.remote(TASK, paths["slow"])
    cancelled = slow.submit("cancelled while queued", require_worker=False, timeout=120)
    queued = Queued(
        expiring=slow.submit("expired while queued", require_worker=False,
                             timeout=ROUTE_TIMEOUT_S),
        cancelled=cancelled, cancel_returned=cancelled.cancel())
    workers = {name: dep.start_worker(TASK, paths[name], ready=False, env=env)
               for name, env in WORKER_ENV.items()}
    for worker in workers.values():
        worker.wait_ready()
    served = {name: Served(dep.remote(TASK, paths[name]), workers[name]) for name in paths}
    yield Routes(dep, served, queued, transformers.pipeline(TASK, model=str(base)))
    dep.close()


def retry_delays(log: str) -> list[tuple[int, float]]:
    """(attempt, delay) of each transient retry the worker logged."""
    return [(int(a), float(d)) for a, d in re.findall(
        r"transient ConnectionError on a batch of \d+ \(attempt (\d+)/\d+\); retrying in "
        r"([\d.]+)s", log)]


def test_transient_errors_retry_with_backoff_then_fail_with_their_cause(routes: Routes
                                                                        ) -> None:
    served = routes.served["transient"]
    started = time.monotonic()
    failing = served.remote.submit("tried three times")
    with pytest.raises(JobFailed) as info:
        failing.result(timeout=30)
    assert info.value.error_type == "ConnectionError"
    assert info.value.retryable is True
    assert "injected transient fault: connection reset" in info.value.remote_message
    assert "gave up after 3 attempts" in info.value.remote_message
    assert "submitting again may succeed" in info.value.remote_message
    assert failing.status() == "FAILURE"

    # Two faults are left: the next job fails twice, then succeeds.
    assert_same(served.remote("retried twice", timeout=30), routes.local("retried twice"))
    took = time.monotonic() - started
    delays = retry_delays(served.worker.log())
    print(f"\ntransient faults: retries (attempt, delay s) = {delays}; both jobs {took:.2f}s")
    assert [a for a, _ in delays] == [1, 2, 1, 2]
    for attempt, delay in delays:  # exponential backoff with jitter: base * 2^n * [0.5, 1.5]
        base = BACKOFF_S * 2 ** (attempt - 1)
        assert 0.5 * base - 0.01 <= delay <= 1.5 * base + 0.01, (attempt, delay)
    assert any(abs(d - BACKOFF_S * 2 ** (a - 1)) > 0.005 for a, d in delays), "no jitter"
    assert took >= sum(d for _, d in delays)
    # Retries happen inside the worker: the jobs were started (delivered) once each.
    assert starts(routes.dep, [failing.id]) == [1]


def test_permanent_error_fails_at_once(routes: Routes) -> None:
    """An input the model cannot take (longer than its 512 positions) fails without retry."""
    served = routes.served["oom"]
    started = time.monotonic()
    job = served.remote.submit("word " * 700)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    took = time.monotonic() - started
    print(f"\npermanent error after {took:.2f}s: {info.value}")
    assert info.value.retryable is False
    assert info.value.error_type not in ("ConnectionError", "OutOfMemory")
    assert info.value.remote_message.startswith("input #0: ")
    assert took < 5
    assert "transient" not in served.worker.log()
    assert_same(served.remote("still serving", timeout=30), routes.local("still serving"))


def test_out_of_memory_batch_is_split_in_halves(routes: Routes) -> None:
    served = routes.served["oom"]
    failures_before = served.worker.log().count("OutOfMemory")
    # Equal lengths: the worker plans one call for all 8 (no padding to save by splitting).
    inputs = [f"the same length, input number {i}" for i in range(8)]
    # One job of 8 inputs: one batch of 8, split down to calls of 2.
    assert_same(served.remote(inputs, timeout=30), routes.local(inputs))
    log = served.worker.log()
    assert "batch of 8 failed (RuntimeError: CUDA out of memory: batch of 8 (injected above " \
           "2)); retrying in halves" in log
    assert log.count("batch of 4 failed (RuntimeError: CUDA out of memory") >= 2
    # Eight jobs at once: whatever batches they form, each gets its own, right result.
    jobs = [served.remote.submit(text) for text in inputs]
    for text, job in zip(inputs, jobs, strict=True):
        assert_same(job.result(timeout=30), routes.local(text))
    assert served.worker.log().count("OutOfMemory") == failures_before  # no job failed


def test_input_that_never_fits_fails_alone(routes: Routes) -> None:
    served = routes.served["oom"]
    inputs = texts(5, "fits ")
    jobs = [served.remote.submit(text) for text in inputs[:3]]
    huge = served.remote.submit("a HUGE input")
    jobs += [served.remote.submit(text) for text in inputs[3:]]
    mixed = served.remote.submit(["this one fits", "this HUGE one does not"])
    with pytest.raises(JobFailed) as info:
        huge.result(timeout=30)
    assert info.value.error_type == "OutOfMemory"
    assert "does not fit in device memory even alone" in info.value.remote_message
    assert "CUDA out of memory" in info.value.remote_message
    with pytest.raises(JobFailed) as mixed_info:
        mixed.result(timeout=30)
    assert mixed_info.value.error_type == "OutOfMemory"
    assert mixed_info.value.remote_message.startswith("input #1 does not fit")
    for text, job in zip(inputs, jobs, strict=True):
        assert_same(job.result(timeout=30), routes.local(text))
    assert served.worker.proc.poll() is None
    assert_same(served.remote("after the OOM", timeout=30), routes.local("after the OOM"))


def test_job_whose_deadline_passed_while_queued_expires(routes: Routes) -> None:
    job = routes.queued.expiring
    with pytest.raises(JobExpired) as info:
        job.result(timeout=30)
    assert re.search(r"the job's deadline passed [\d.]+s before a worker could run it",
                     str(info.value)), info.value
    assert job.status() == "EXPIRED"
    assert fields(routes.dep, [job.id], "starts", "worker") == [[None, None]]  # never ran


def test_cancelled_pending_job_never_runs(routes: Routes) -> None:
    queued = routes.queued
    assert queued.cancel_returned is True
    # The worker has taken every message queued before it started.
    route = routes.served["slow"].remote.route
    wait_until(lambda: queue_length(routes.dep, route) == 0, 30, "the slow route's queue")
    wait_until(lambda: queued.expiring.done(), 30, "the expired job to be recorded")
    with pytest.raises(JobCancelled):
        queued.cancelled.result(timeout=5)
    assert queued.cancelled.status() == "CANCELLED"
    assert fields(routes.dep, [queued.cancelled.id], "starts", "worker") == [[None, None]]
    record = JobStore(routes.dep.redis, routes.dep.settings.keys, 60).get(queued.cancelled.id)
    assert record is not None and record.result is None
    assert record.error == {"type": "JobCancelled", "message": "the job was cancelled",
                            "retryable": False}


def test_cancelling_a_running_job_is_best_effort(routes: Routes) -> None:
    served = routes.served["slow"]
    job = served.remote.submit("cancelled while running")
    wait_until(lambda: job.status() == "STARTED", 30, "the job to start")
    shown = routes.dep.cli("cancel", job.id)
    assert shown.returncode == 0, shown.stderr
    assert "it was running: its batch finishes, its result is discarded" in shown.stdout
    assert job.status() == "CANCELLED"
    assert job.cancel() is False  # already cancelled; the call in hand is not interrupted
    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    # The call ends; its result is discarded and the job stays cancelled.
    wait_until(lambda: f"jobs={job.id}" in served.worker.log(), 30, "the batch to end")
    assert job.status() == "CANCELLED"
    with pytest.raises(JobCancelled):
        job.result(timeout=5)


def test_route_timeout_is_enforced(routes: Routes) -> None:
    served = routes.served["slow"]
    started = time.monotonic()
    job = served.remote.submit("runs past the route's limit")
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    took = time.monotonic() - started
    print(f"\nroute timeout_s={ROUTE_TIMEOUT_S}: JobTimeout after {took:.2f}s "
          f"(the call takes {SLOW_S}s): {info.value.remote_message}")
    assert info.value.error_type == "JobTimeout"
    assert info.value.remote_message == (
        f"the job ran longer than its route's limit of {ROUTE_TIMEOUT_S:g}s (timeout_s in the "
        "routing table); its result is discarded")
    assert job.status() == "FAILURE"
    assert took < SLOW_S, "the failure waited for the call to end: the limit is not enforced"
    # The call ends later; its result does not replace the failure.
    wait_until(lambda: f"jobs={job.id}" in served.worker.log(), 30, "the batch to end")
    assert states(routes.dep, [job.id]) == ["FAILURE"]
    with pytest.raises(JobFailed):
        job.result(timeout=5)
