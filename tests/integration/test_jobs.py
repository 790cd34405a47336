"""The job life cycle against a real Redis and real worker processes.

Two routes serve the same tiny text-classification model from two directories, so each has
its own queue and worker. Route B's worker starts late, on purpose: jobs queued before it
show PENDING, time out, can be cancelled, and expire; when it arrives the cancelled and
expired jobs never run and the others do.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import Deployment, WorkerProcess
from tiny_models import build_text_model

from pipeq import Job, RemotePipeline, get_job
from pipeq.core.celery_config import make_celery
from pipeq.core.contract import JobRequest, JobState, Route, new_job_id
from pipeq.core.store import JobStore
from pipeq.errors import (
    JobCancelled,
    JobExpired,
    JobFailed,
    JobLost,
    JobNotFound,
    JobTimeout,
    NoWorkerError,
    ValidationError,
)

TASK = "text-classification"
TEXTS = [f"hello world {'again ' * (i % 5)}number {i}" for i in range(24)]


@dataclass
class Served:
    """A route served by one worker of this module."""

    remote: RemotePipeline
    path: str
    worker: WorkerProcess | None = None

    @property
    def route(self) -> Route:
        return self.remote.route


@dataclass
class LateArrival:
    """What was seen on route B before its worker started (the worker starts at the end)."""

    waiting: Job  # an ordinary job, queued before any worker
    cancelled: Job
    expired: Job
    status_before: str = ""
    timeout_error: BaseException | None = None
    cancel_returned: bool | None = None
    status_after_cancel: str = ""
    cancelled_result_error: BaseException | None = None
    queue_length_before: int = 0
    statuses: list[str] = field(default_factory=list)


def store(dep: Deployment) -> JobStore:
    """A job store of this deployment (to read job records as they are in Redis)."""
    return JobStore(dep.redis, dep.settings.keys, dep.settings.result_ttl_s)


def queue_length(dep: Deployment, route: Route) -> int:
    """Messages waiting in the route's queue."""
    return int(dep.redis.llen(dep.settings.keys.lane_queue_key(route, "interactive")))


def hostname_of(served: Served) -> str:
    """The Celery hostname of the one live worker of a route."""
    (info,) = served.remote.client.registry.workers(served.route)
    return str(info["hostname"])


@pytest.fixture(scope="module")
def model_paths(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The tiny model, and a copy of it in another directory (hence another route)."""
    path = build_text_model(TASK, models_dir)
    copy = tmp_path_factory.mktemp("copy") / "text-classification-b"
    shutil.copytree(path, copy)
    return str(path), str(copy)


@pytest.fixture(scope="module")
def route_a(module_deployment: Deployment, model_paths: tuple[str, str]) -> Served:
    """Route A, with a live worker from the start."""
    worker = module_deployment.start_worker(TASK, model_paths[0])
    return Served(module_deployment.remote(TASK, model_paths[0]), model_paths[0], worker)


@pytest.fixture(scope="module")
def local(model_paths: tuple[str, str]) -> Any:
    """The local truth: transformers.pipeline() on the same model."""
    return transformers.pipeline(TASK, model=model_paths[0])


@pytest.fixture(scope="module")
def late(module_deployment: Deployment, model_paths: tuple[str, str]
         ) -> tuple[Served, LateArrival]:
    """Route B: jobs are queued, timed out, cancelled and left to expire; then its worker starts."""
    dep = module_deployment
    remote = dep.remote(TASK, model_paths[1])
    seen = LateArrival(
        waiting=remote.submit(TEXTS[0], require_worker=False, timeout=120),
        cancelled=remote.submit(TEXTS[1], require_worker=False, timeout=120),
        expired=remote.submit(TEXTS[2], require_worker=False, timeout=1.0),
    )
    seen.queue_length_before = queue_length(dep, remote.route)
    seen.status_before = seen.waiting.status()
    try:
        seen.waiting.result(timeout=0.5)
    except Exception as exc:
        seen.timeout_error = exc
    seen.cancel_returned = seen.cancelled.cancel()
    seen.status_after_cancel = seen.cancelled.status()
    try:
        seen.cancelled.result(timeout=5)
    except Exception as exc:
        seen.cancelled_result_error = exc
    time.sleep(1.2)  # the expiring job's deadline passes while it is still queued
    worker = dep.start_worker(TASK, model_paths[1])
    return Served(remote, model_paths[1], worker), seen


# --- route A: a worker is there ------------------------------------------------------------


def test_submit_and_result(route_a: Served, local: Any) -> None:
    job = route_a.remote.submit(TEXTS[3])
    got = job.result(timeout=30)
    assert_same(got, local(TEXTS[3]))
    assert job.status() == "SUCCESS" and job.done()
    assert job.cancel() is False  # too late: it ended
    assert job.status() == "SUCCESS"
    assert job.result(timeout=1) == got  # a result can be read again


def test_call_with_a_list_returns_a_list(route_a: Served, local: Any) -> None:
    assert_same(route_a.remote(TEXTS[:3], timeout=30, top_k=2), local(TEXTS[:3], top_k=2))


def test_sixteen_threads_share_one_remote_pipeline(route_a: Served, local: Any) -> None:
    expected = {text: local(text) for text in TEXTS}
    scores = {round(r[0]["score"], 6) for r in expected.values()}
    assert len(scores) > len(TEXTS) // 2, "inputs must give distinguishable results"
    remote = route_a.remote

    def call(index: int) -> tuple[str, Any]:
        text = TEXTS[index % len(TEXTS)]
        if index % 2:
            return text, remote(text, timeout=60)
        return text, remote.submit(text).result(timeout=60)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(64)))
    for text, got in results:
        assert_same(got, expected[text])


def test_asyncio_gather_and_await_job(route_a: Served, local: Any) -> None:
    remote = route_a.remote

    async def main() -> tuple[list[Any], Any]:
        gathered = await asyncio.gather(*(remote.acall(t, timeout=60) for t in TEXTS[:20]))
        job = await asyncio.to_thread(remote.submit, TEXTS[5])
        return list(gathered), await job

    started = time.monotonic()
    gathered, awaited = asyncio.run(asyncio.wait_for(main(), 90))
    for text, got in zip(TEXTS[:20], gathered, strict=True):
        assert_same(got, local(text))
    assert_same(awaited, local(TEXTS[5]))
    assert time.monotonic() - started < 60


def test_no_worker_error_names_the_route_and_the_command(module_deployment: Deployment
                                                         ) -> None:
    remote = module_deployment.remote("sentiment-analysis", "pipeq-tests/nobody-serves-this")
    with pytest.raises(NoWorkerError) as info:
        remote.submit("hello")
    message = str(info.value)
    assert "text-classification:pipeq-tests/nobody-serves-this" in message
    assert ("`pipeq worker --task text-classification --model "
            "pipeq-tests/nobody-serves-this`") in message
    assert "require_worker=False" in message
    assert queue_length(module_deployment, remote.route) == 0
    with pytest.raises(NoWorkerError):
        remote("hello")


def test_validation_error_enqueues_nothing(module_deployment: Deployment) -> None:
    remote = module_deployment.remote(TASK, "pipeq-tests/no-worker-validation")
    jobs_before = module_deployment.keys(":job:*")
    for inputs, params in [("hi", {"top_k": "2"}), ("hi", {"max_new_tokens": 3}), ([], {}),
                           (7, {}), ("\ud800", {})]:
        with pytest.raises(ValidationError):
            remote.submit(inputs, require_worker=False, **params)
    assert queue_length(module_deployment, remote.route) == 0
    assert module_deployment.keys(":job:*") == jobs_before
    # The same route does take a valid job: the zero above is not a wrong key.
    remote.submit("hi", require_worker=False)
    assert queue_length(module_deployment, remote.route) == 1


def _send_raw(route_a: Served, body: Any, task_route: Route | None = None) -> Job:
    """Publish a message straight with Celery, bypassing the producer's checks."""
    client = route_a.remote.client
    job_id = body.get("job_id", new_job_id()) if isinstance(body, dict) else new_job_id()
    # The job's PENDING record, as pipeq's producer writes it, so the job id is known.
    client.redis.hset(client.keys.result(job_id), "state", "PENDING")
    make_celery(client.settings).send_task(
        client.keys.task_name(task_route or route_a.route), kwargs={"request": body},
        task_id=job_id, queue=client.keys.queue(route_a.route))
    return Job(client, job_id, route_a.route)


def _body(served_route: Route, **overrides: Any) -> dict[str, Any]:
    """A valid job message for ``served_route``, then ``overrides`` that break it."""
    request = JobRequest(job_id=new_job_id(), route=served_route, inputs=["hello"], single=True,
                         submitted_at=time.time(), deadline=time.time() + 60)
    return {**request.model_dump(mode="json"), **overrides}


@pytest.mark.parametrize(("make", "shown"), [
    (lambda r: _body(r, params={"top_k": "three"}), "parameter 'top_k'"),
    (lambda r: _body(r, params={"no_such_param": 1}), "unknown parameter 'no_such_param'"),
    (lambda r: _body(r, inputs=[5]), "inputs.0.str: Input should be a valid string"),
    (lambda r: _body(r, v=7), "unsupported message schema version 7"),
    (lambda r: _body(r, extra_field=True), "extra_field"),
    (lambda r: _body(r, route={"task": TASK, "model": "pipeq-tests/elsewhere"}),
     "job for route text-classification:pipeq-tests/elsewhere reached a worker of"),
    (lambda r: _body(r, route={"task": "summarization", "model": r.model}),
     "removed in transformers 5"),
], ids=["param-type", "param-unknown", "input-type", "schema-version", "extra-field",
        "other-route", "removed-task"])
def test_malformed_message_fails_and_the_worker_keeps_serving(
        route_a: Served, local: Any, make: Any, shown: str) -> None:
    job = _send_raw(route_a, make(route_a.route))
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    assert info.value.error_type == "ValidationError"
    assert shown in info.value.remote_message
    assert job.status() == "FAILURE"
    assert route_a.worker is not None and route_a.worker.proc.poll() is None
    assert_same(route_a.remote(TEXTS[4], timeout=30), local(TEXTS[4]))


def test_message_naming_an_unknown_route_fails(route_a: Served, local: Any) -> None:
    """A task name no worker on this queue serves: Celery drops it, pipeq records why."""
    other = Route(task=TASK, model="pipeq-tests/unregistered")
    job = _send_raw(route_a, _body(other), task_route=other)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    assert info.value.error_type == "ValidationError"
    assert f"no route 'pipeq.run[{other.id}]' on this queue" in info.value.remote_message
    assert route_a.route.describe() in info.value.remote_message
    assert_same(route_a.remote(TEXTS[4], timeout=30), local(TEXTS[4]))


def test_worker_that_cannot_load_its_model_exits_3(module_deployment: Deployment) -> None:
    model = f"pipeq-tests/no-such-model-{uuid.uuid4().hex[:6]}"
    remote = module_deployment.remote(TASK, model)
    queued = remote.submit("hello", require_worker=False)
    worker = module_deployment.start_worker(TASK, model, ready=False)
    assert worker.wait_exit(timeout=120) == 3
    log = worker.log()
    assert f"cannot load {TASK}:{model}" in log
    assert "worker not started" in log
    # ... and why: transformers' own reason follows the exception type.
    reason = log.split(f"cannot load {TASK}:{model}", 1)[1]
    assert "Error:" in reason.splitlines()[0], reason[:300]
    assert "pipeq worker ready" not in log
    # It never consumed the job it could not run, nor announced itself.
    assert queue_length(module_deployment, remote.route) == 1
    assert queued.status() == "PENDING"
    assert remote.client.registry.workers(remote.route) == []


# --- route B: the worker arrives late ------------------------------------------------------


def test_queued_job_is_pending_and_result_times_out(late: tuple[Served, LateArrival]) -> None:
    _, seen = late
    assert seen.queue_length_before == 3
    assert seen.status_before == "PENDING"
    assert isinstance(seen.timeout_error, JobTimeout)
    assert f"job {seen.waiting.id} did not finish within 0.5s (status PENDING)" in str(
        seen.timeout_error)


def test_queued_job_runs_when_the_worker_arrives(late: tuple[Served, LateArrival],
                                                 local: Any) -> None:
    _, seen = late
    assert_same(seen.waiting.result(timeout=60), local(TEXTS[0]))
    assert seen.waiting.status() == "SUCCESS"


def test_cancelled_pending_job_never_runs(module_deployment: Deployment,
                                          late: tuple[Served, LateArrival]) -> None:
    route_b, seen = late
    assert seen.cancel_returned is True
    assert seen.status_after_cancel == "CANCELLED"
    assert isinstance(seen.cancelled_result_error, JobCancelled)
    # Wait until the late worker has taken every message queued before it.
    seen.waiting.result(timeout=60)
    deadline = time.monotonic() + 30
    while queue_length(module_deployment, route_b.route) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queue_length(module_deployment, route_b.route) == 0
    record = store(module_deployment).get(seen.cancelled.id)
    assert record is not None and record.state == JobState.CANCELLED
    assert record.worker is None and record.result is None  # no worker touched it
    assert record.error is not None and record.error["type"] == "JobCancelled"
    with pytest.raises(JobCancelled):
        seen.cancelled.result(timeout=5)
    assert seen.cancelled.cancel() is False  # already final


def test_job_past_its_deadline_expires(module_deployment: Deployment,
                                       late: tuple[Served, LateArrival]) -> None:
    _, seen = late
    with pytest.raises(JobExpired) as info:
        seen.expired.result(timeout=60)
    assert "deadline passed" in str(info.value)
    assert seen.expired.status() == "EXPIRED"
    record = store(module_deployment).get(seen.expired.id)
    assert record is not None and record.result is None


def test_two_routes_do_not_steal_each_other_jobs(module_deployment: Deployment,
                                                 route_a: Served,
                                                 late: tuple[Served, LateArrival],
                                                 local: Any) -> None:
    route_b, _ = late
    host_a = hostname_of(route_a)
    host_b = hostname_of(route_b)
    assert host_a != host_b
    jobs = [(r, text, r.remote.submit(text)) for text in TEXTS[:10] for r in (route_a, route_b)]
    records = store(module_deployment)
    for route, text, job in jobs:
        assert_same(job.result(timeout=60), local(text))
        record = records.get(job.id)
        assert record is not None
        assert record.worker == (host_a if route is route_a else host_b), (
            f"job of {route.route.describe()} ran on {record.worker}")


# --- ids nobody submitted, and jobs whose record vanished ------------------------------------


def test_an_unknown_job_id_is_not_found_at_once(module_deployment: Deployment,
                                                route_a: Served) -> None:
    unknown = get_job("0123456789abcdef0123456789abcdef", route_a.remote.client.settings)
    started = time.monotonic()
    for ask in (unknown.status, lambda: unknown.result(timeout=30), unknown.cancel):
        with pytest.raises(JobNotFound) as info:
            ask()
        assert f"no job {unknown.id} in this deployment" in str(info.value)
        assert "PIPEQ_RESULT_TTL_S" in str(info.value)
    assert time.monotonic() - started < 5  # never a wait for the timeout
    assert store(module_deployment).get(unknown.id) is None  # cancel wrote nothing


def test_a_queued_job_is_known_before_any_worker_touches_it(module_deployment: Deployment
                                                            ) -> None:
    remote = module_deployment.remote(TASK, "pipeq-tests/known-while-queued")
    job = remote.submit("waits", require_worker=False)
    assert get_job(job.id, remote.client.settings).status() == "PENDING"
    assert job.cancel() is True


def test_a_job_whose_record_vanishes_is_lost_not_timed_out(module_deployment: Deployment
                                                          ) -> None:
    remote = module_deployment.remote(TASK, "pipeq-tests/record-vanishes")
    job = remote.submit("never runs", require_worker=False)
    waiting = ThreadPoolExecutor(1).submit(job.result, 60)
    deadline = time.monotonic() + 10
    while not remote.client.waiter.watching(job.id):  # the caller waits for it now
        assert time.monotonic() < deadline, "result() never started waiting"
        time.sleep(0.01)
    module_deployment.redis.delete(module_deployment.settings.keys.result(job.id))
    with pytest.raises(JobLost) as info:
        waiting.result(timeout=10)  # the waiter polls every second
    assert info.value.retryable and "submit it again" in str(info.value)
