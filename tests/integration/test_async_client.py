"""asyncio on a par with the sync API, against a real Redis and a real worker.

``await remote.asubmit()`` is a Job; ``aresult``/``astatus``/``acancel`` never block the
loop and never use asyncio's default executor; an unknown id is JobNotFound; a Client
closes, also as ``async with``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from compare import assert_same
from conftest import ROOT, Deployment
from tiny_models import build_text_model

from pipeq import Job, RemotePipeline, get_job
from pipeq.client import Client
from pipeq.errors import JobNotFound, JobTimeout

TASK = "text-classification"


class NoDefaultExecutor(ThreadPoolExecutor):
    """An event loop's default executor that refuses work: pipeq must not use it."""

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pipeq used asyncio's default executor")


def run(coro: Any) -> Any:
    """Run ``coro`` on a fresh loop whose default executor refuses work."""
    loop = asyncio.new_event_loop()
    loop.set_default_executor(NoDefaultExecutor())
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.fixture(scope="module")
def remote(module_deployment: Deployment, models_dir: Path) -> Iterator[RemotePipeline]:
    model = str(build_text_model(TASK, models_dir))
    module_deployment.start_worker(TASK, model)
    yield module_deployment.remote(TASK, model)


def test_asubmit_returns_a_job_whose_async_methods_work(remote: RemotePipeline) -> None:
    async def scenario() -> tuple[Any, ...]:
        job = await remote.asubmit("I love it")
        status = await job.astatus()
        result = await job.aresult(timeout=30)
        awaited = await job
        return job, status, result, awaited, await job.astatus(), await job.acancel()

    job, status, result, awaited, final, cancelled = run(scenario())
    assert isinstance(job, Job)
    assert status in ("PENDING", "STARTED", "SUCCESS")
    assert result == awaited
    assert_same(result, remote("I love it"))
    assert final == "SUCCESS" and cancelled is False


def test_acall_returns_the_result_and_many_run_at_once(remote: RemotePipeline) -> None:
    texts = [f"text number {i}" for i in range(20)]

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(*(remote.acall(t, timeout=60) for t in texts)))

    assert_same(run(scenario()), [remote(t) for t in texts])


def test_aresult_of_an_unknown_id_is_job_not_found(remote: RemotePipeline) -> None:
    job = get_job("no-such-job-id", remote.client.settings)
    with pytest.raises(JobNotFound, match="no-such-job-id"):
        run(job.aresult(timeout=5))
    with pytest.raises(JobNotFound):
        run(job.astatus())
    with pytest.raises(JobNotFound):
        run(job.acancel())


def test_a_job_that_does_not_end_in_time_is_a_timeout_and_can_be_cancelled(
        module_deployment: Deployment, tmp_path: Path, remote: RemotePipeline) -> None:
    other = module_deployment.remote(TASK, str(tmp_path / "unserved"))

    async def scenario() -> tuple[Any, ...]:
        job = await other.asubmit("queued", require_worker=False, timeout=60)
        with pytest.raises(JobTimeout):
            await job.aresult(timeout=0.3)
        return await job.acancel(), await job.astatus()

    assert run(scenario()) == (True, "CANCELLED")


def test_a_client_closes_also_as_async_with(module_deployment: Deployment,
                                           remote: RemotePipeline) -> None:
    async def scenario() -> Client:
        async with Client(module_deployment.settings) as client:
            job = await RemotePipeline(remote.route, client).asubmit("closing time")
            assert_same(await job.aresult(timeout=30), remote("closing time"))
        return client

    client = run(scenario())
    assert client._executor is None and client.waiter._stopping.is_set()
    with Client(module_deployment.settings) as again:
        assert_same(RemotePipeline(remote.route, again)("and again"), remote("and again"))


def test_the_fastapi_example_app(module_deployment: Deployment, remote: RemotePipeline,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/fastapi_app.py against the real worker (last here: it closes the shared
    Client of the deployment on shutdown, as an app should)."""
    from fastapi.testclient import TestClient

    for name, value in module_deployment.env().items():
        if name.startswith("PIPEQ_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("PIPEQ_EXAMPLE_MODEL", remote.model)
    spec = importlib.util.spec_from_file_location("fastapi_app",
                                                  ROOT / "examples" / "fastapi_app.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    expected = remote("great")
    with TestClient(example.app) as http:
        assert_same(http.post("/classify", json={"text": "great"}).json(), expected)
        job_id = http.post("/jobs", json={"text": "great"}).json()["id"]
        deadline = time.monotonic() + 30
        while (read := http.get(f"/jobs/{job_id}").json())["status"] != "SUCCESS":
            assert time.monotonic() < deadline, read
            time.sleep(0.1)
        assert_same(read["result"], expected)
        assert http.get("/jobs/no-such-job").status_code == 404
        assert http.post("/classify", json={"text": ""}).status_code in (200, 422)
