"""The worker's job path in process (pipeq.worker.testing): real Redis, the real service,
batcher and job store, a stand-in runner. Each test reads what a caller or an operator sees:
results, errors, job records and the unacked hash."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from pipeq import RemotePipeline, Settings, pipeline
from pipeq.core.config import RouteSpec
from pipeq.core.contract import JobState
from pipeq.errors import JobCancelled, JobExpired, JobFailed, ValidationError
from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.testing import EchoRunner, InProcessWorker

TASK = "text-classification"
MODEL = "org/echo"



@pytest.fixture
def remote(settings: Settings) -> RemotePipeline:
    return pipeline(TASK, model=MODEL, settings=settings)


def harness(settings: Settings, runner: EchoRunner, **spec: Any) -> InProcessWorker:
    return InProcessWorker(settings, RouteSpec(task=TASK, model=MODEL, max_wait_ms=0, **spec),
                           runner)


def unacked(settings: Settings, client: redis.Redis) -> int:
    return int(client.hlen(settings.keys.unacked()))


def test_jobs_run_batched_are_recorded_and_acknowledged(settings: Settings,
                                                        remote: RemotePipeline) -> None:
    runner = EchoRunner(TASK)
    with harness(settings, runner) as worker:
        jobs = [remote.submit(f"text {'x' * i}") for i in range(10)]
        worker.drain()
        assert [job.result(timeout=5) for job in jobs] == [
            [{"label": "LEN", "score": len(f"text {'x' * i}")}] for i in range(10)]
        assert sum(len(call) for call in runner.calls) == 10
        assert len(runner.calls) < 10  # batched, not one call per job
        assert unacked(settings, worker.client) == 0 and len(worker.acked) == 10


def test_a_malformed_message_is_a_failure_of_its_job(settings: Settings,
                                                     remote: RemotePipeline) -> None:
    request = remote.build_request("hi", {}, None)
    too_long = "x" * (settings.max_input_chars + 1)  # what no producer would send
    remote.client.send(request.model_copy(update={"inputs": [too_long]}))  # (not validated)
    with harness(settings, EchoRunner(TASK)) as worker:
        worker.drain()
    with pytest.raises(JobFailed) as info:
        remote.job(request.job_id).result(timeout=5)
    assert info.value.error_type == "ValidationError"
    assert "characters, over the limit of" in info.value.remote_message
    assert unacked(settings, worker.client) == 0


def test_a_forged_reply_list_never_touches_another_key_nor_the_batch(
        settings: Settings, remote: RemotePipeline) -> None:
    client = remote.client.redis
    victim = f"{settings.keys.prefix}:not-a-list"
    client.hset(victim, "kept", "yes")  # a key of another type: RPUSH would fail WRONGTYPE
    good = [remote.submit(f"good {i}") for i in range(5)]
    bad_request = remote.build_request("bad reply", {}, None).model_copy(
        update={"reply_to": victim})
    remote.client.send(bad_request)
    with harness(settings, EchoRunner(TASK)) as worker:
        worker.drain()
    assert all(job.result(timeout=5) for job in good)
    assert remote.job(bad_request.job_id).status() == "SUCCESS"
    assert client.hgetall(victim) == {b"kept": b"yes"}


def test_expired_and_cancelled_jobs_never_run(settings: Settings,
                                              remote: RemotePipeline) -> None:
    runner = EchoRunner(TASK)
    late = remote.build_request("too late", {}, None)
    remote.client.send(late.model_copy(update={"deadline": time.time() - 1}))
    expired = remote.job(late.job_id)
    cancelled = remote.submit("never mind")
    assert cancelled.cancel() is True
    with harness(settings, runner) as worker:
        worker.drain()
    with pytest.raises(JobExpired):
        expired.result(timeout=5)
    with pytest.raises(JobCancelled):
        cancelled.result(timeout=5)
    assert runner.calls == []
    assert unacked(settings, worker.client) == 0


def test_a_job_past_its_deadline_while_running_times_out_alone(
        settings: Settings, remote: RemotePipeline) -> None:
    gate = threading.Event()
    runner = EchoRunner(TASK, gate=gate)
    with harness(settings, runner) as worker, worker.running():
        slow = remote.submit("stuck", timeout=0.5)
        with pytest.raises(JobFailed) as info:
            slow.result(timeout=10)
        gate.set()
        assert info.value.error_type == "JobTimeout"
        assert "ran past its deadline" in info.value.remote_message
        assert remote("after", timeout=10) == [{"label": "LEN", "score": 5}]
    assert remote.job(slow.id).status() == "FAILURE"  # the late result changed nothing


def test_a_stopping_worker_hands_unstarted_jobs_back(settings: Settings,
                                                     remote: RemotePipeline) -> None:
    worker = harness(settings, EchoRunner(TASK))
    worker.service.start()
    worker.service.begin_shutdown()
    jobs = [remote.submit(f"later {i}") for i in range(3)]
    assert worker.claim() == 3
    assert worker.service.drain(5)
    worker.service.stop()
    assert len(worker.requeued) == 3 and worker.acked == []
    assert worker.client.llen(settings.keys.lane_queue_key(remote.route, "interactive")) == 3
    with harness(settings, EchoRunner(TASK)) as again:  # the next worker runs them
        again.drain()
    assert all(job.result(timeout=5) for job in jobs)


def test_a_job_its_claim_started_runs_even_when_the_worker_stops(
        settings: Settings, remote: RemotePipeline) -> None:
    runner = EchoRunner(TASK)
    worker = harness(settings, runner)
    worker.service.start()
    worker.service.begin_shutdown()
    job = remote.submit("alone")
    assert worker.claim() == 1  # an idle worker's claim of one job starts it: it reads
    assert job.status() == "STARTED"  # STARTED, so the stopping worker runs it
    assert worker.service.drain(5)
    worker.service.stop()
    assert job.result(timeout=5) == [{"label": "LEN", "score": 5}]
    assert runner.calls == [["alone"]] and worker.requeued == []
    assert worker.client.hmget(settings.keys.result(job.id), "starts", "worker") == [
        b"1", b"pipeq.harness@localhost"]


def test_handing_back_a_job_its_claim_started_undoes_the_start(
        settings: Settings, remote: RemotePipeline) -> None:
    """(An image or audio job whose media a stopping worker had not decoded yet.)"""
    worker = harness(settings, EchoRunner(TASK))
    jobs = [remote.submit(text) for text in ("mine", "moved on", "final")]
    records = [settings.keys.result(job.id) for job in jobs]
    for record in records:  # each started by this worker's claim, as claim.lua writes it
        worker.client.hset(record, mapping={"state": "STARTED", "starts": 1,
                                            "worker": worker.service.hostname})
    worker.client.hset(records[1], "worker", "another-worker")  # handed over since
    worker.client.hset(records[2], "state", "SUCCESS")
    in_flight = [JobInFlight(remote.build_request(text, {}, None).model_copy(
        update={"job_id": job.id}), claim_start=(JobState.PENDING, 1))
        for text, job in zip(("mine", "moved on", "final"), jobs, strict=True)]
    worker.service.return_jobs(in_flight)
    assert worker.client.hgetall(records[0]) == {b"state": b"PENDING"}
    assert worker.client.hmget(records[1], "state", "starts") == [b"STARTED", b"1"]
    assert worker.client.hmget(records[2], "state", "starts") == [b"SUCCESS", b"1"]


def test_one_failing_input_fails_only_its_job(settings: Settings,
                                              remote: RemotePipeline) -> None:
    with harness(settings, EchoRunner(TASK, fail_on="poison")) as worker:
        jobs = [remote.submit(text) for text in ("fine", "poison pill", "also fine")]
        worker.drain()
    assert jobs[0].result(timeout=5) and jobs[2].result(timeout=5)
    with pytest.raises(JobFailed) as info:
        jobs[1].result(timeout=5)
    assert info.value.error_type == "ValueError" and "refused" in info.value.remote_message


def test_a_malformed_message_says_what_is_wrong_in_plain_words(settings: Settings) -> None:
    """The job's error names each bad field with our own message, not pydantic's prefix."""
    with harness(settings, EchoRunner(TASK)) as worker, pytest.raises(ValidationError) as bad:
        worker.service.parse({"v": 2}, "job-1")
    message = str(bad.value)
    assert message.startswith("malformed job message: v: unsupported message schema version 2 "
                              "(this is 1); job_id: Field required"), message
    assert "Value error" not in message
