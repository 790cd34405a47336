"""The producer's result waiter and the bulk chunk scheduler, against a real Redis and the
in-process worker (pipeq.worker.testing): many jobs woken on one connection, from threads
and asyncio; bulk answers in input order, failing inputs answered alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest

from pipeq import RemotePipeline, Settings, pipeline
from pipeq.bulk import ItemError
from pipeq.client import Client
from pipeq.core.config import RouteSpec
from pipeq.worker.testing import EchoRunner, InProcessWorker

TASK = "text-classification"
MODEL = "org/echo"



@pytest.fixture
def remote(settings: Settings) -> RemotePipeline:
    return pipeline(TASK, model=MODEL, settings=settings)


@pytest.fixture
def worker(settings: Settings) -> Iterator[InProcessWorker]:
    runner = EchoRunner(TASK, fail_on="poison")
    spec = RouteSpec(task=TASK, model=MODEL, max_wait_ms=0, max_batch_size=8)
    with InProcessWorker(settings, spec, runner) as harness, harness.running():
        yield harness


def expected(text: str) -> list[dict[str, object]]:
    return [{"label": "LEN", "score": len(text)}]


def test_one_waiter_wakes_many_threads(remote: RemotePipeline,
                                       worker: InProcessWorker) -> None:
    def waiters() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "pipeq-result-waiter"}

    before = waiters()  # other tests' clients in this process have their own
    texts = [f"thread {i} " + "y" * (i % 7) for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda t: remote(t, timeout=20), texts))
    assert results == [expected(t) for t in texts]
    assert len(waiters() - before) == 1  # one thread serves every caller of the process


def test_asyncio_callers_share_the_waiter(remote: RemotePipeline,
                                          worker: InProcessWorker) -> None:
    async def main() -> list[object]:
        jobs = [remote.submit(f"async {i}") for i in range(10)]
        return list(await asyncio.gather(*(job.aresult(timeout=20) for job in jobs)))

    assert asyncio.run(main()) == [expected(f"async {i}") for i in range(10)]


def test_a_submitted_job_keeps_its_delivered_result_for_result(
        remote: RemotePipeline, worker: InProcessWorker, settings: Settings) -> None:
    job = remote.submit("kept for later")
    assert job.future is not None
    job.future.result(timeout=20)  # the wake-up carried the record: nothing more to read
    client = Client.for_settings(settings)
    client.redis.delete(client.keys.result(job.id))
    assert job.result(timeout=5) == expected("kept for later")


def test_one_request_at_a_time_reads_no_more_of_the_reply_list(
        remote: RemotePipeline, worker: InProcessWorker, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client.for_settings(settings)
    lpop = mock.Mock(wraps=client.waiter._conn.lpop)  # still reads Redis
    monkeypatch.setattr(client.waiter._conn, "lpop", lpop)
    assert [remote(f"alone {i}", timeout=20) for i in range(5)] == [
        expected(f"alone {i}") for i in range(5)]
    assert lpop.call_count == 0  # the caller was the only one waiting: no round trip for nothing
    # A stale wake-up left on the list (a job nobody waits for any more) is skipped.
    client.redis.rpush(client.waiter.reply_key, b"not-a-watched-job")
    assert remote("after a stale wake-up", timeout=20) == expected("after a stale wake-up")
    # Callers side by side: the rest of the list is read after each wake-up, as before.
    texts = [f"together {i}" for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda t: remote(t, timeout=20), texts)) == [
            expected(t) for t in texts]
    assert lpop.call_count > 0


def test_map_answers_in_input_order_through_chunks(remote: RemotePipeline,
                                                   worker: InProcessWorker) -> None:
    texts = [f"item {i} " + "z" * (i % 11) for i in range(100)]
    answers = list(remote.map(iter(texts), chunk_size=8, max_in_flight=3, timeout=20))
    assert answers == [expected(t)[0] for t in texts]
    assert worker.taken == 13  # 100 inputs in chunks of 8: 13 chunk jobs


def test_map_answers_only_the_failing_input_with_an_error(remote: RemotePipeline,
                                                          worker: InProcessWorker) -> None:
    texts = [f"item {i}" for i in range(20)]
    texts[13] = "poison 13"
    answers = list(remote.map(texts, chunk_size=5, on_error="record", timeout=20))
    assert [a for a in answers if isinstance(a, ItemError)] == [
        ItemError("ValueError", "input containing 'poison' refused")]
    assert isinstance(answers[13], ItemError)
    assert answers[:13] == [expected(t)[0] for t in texts[:13]]
