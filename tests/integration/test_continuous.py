"""Continuous batching (``pipeq worker --batching continuous``) with real workers.

Tiny GPT-2 and Llama-style models, each served by a real worker process with continuous
batching; every result is compared with ``transformers.pipeline()`` in this process. Jobs
that arrive while others decode join the running batch (they end before the long ones),
and jobs the continuous engine cannot honour still run, on the static path, with the same
results as the local pipeline.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import Deployment, wait_until
from tiny_models import build_llama_model, build_text_model

from pipeq.core.config import RouteSpec

PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "a",
           "Once upon a time there was a little robot who wanted to learn."]
GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def served(module_deployment: Deployment, models_dir: Path) -> dict[str, str]:
    """A continuous-batching worker per architecture; returns arch -> model directory."""
    paths = {"gpt2": str(build_text_model("text-generation", models_dir)),
             "llama": str(build_llama_model(models_dir))}
    workers = [module_deployment.start_worker("text-generation", path, "--batching",
                                              "continuous", ready=False)
               for path in paths.values()]
    for worker in workers:
        worker.wait_ready()
        assert "continuous batching" in worker.log(), worker.log()
    return paths


@pytest.fixture(scope="module")
def local(served: dict[str, str]) -> dict[str, Any]:
    """The local truth: plain transformers.pipeline() per architecture."""
    return {arch: transformers.pipeline("text-generation", model=path)
            for arch, path in served.items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(("inputs", "params"), [
    (PROMPTS[1], {"max_new_tokens": 12}),
    (PROMPTS, {"max_new_tokens": 7}),
    (PROMPTS[0], {"max_new_tokens": 5, "return_full_text": False}),
], ids=["single", "list", "new-text"])
def test_greedy_results_equal_local(module_deployment: Deployment, served: dict[str, str],
                                    local: dict[str, Any], arch: str, inputs: Any,
                                    params: dict[str, Any]) -> None:
    remote = module_deployment.remote("text-generation", served[arch])
    got = remote(inputs, timeout=60, **GREEDY, **params)
    assert_same(got, local[arch](inputs, **GREEDY, **params))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_concurrent_jobs_of_mixed_lengths_equal_local(
        module_deployment: Deployment, served: dict[str, str], local: dict[str, Any],
        arch: str) -> None:
    remote = module_deployment.remote("text-generation", served[arch])
    cases = [(PROMPTS[i % len(PROMPTS)], 4 + (i * 13) % 60) for i in range(16)]
    jobs = [remote.submit(prompt, max_new_tokens=n, **GREEDY) for prompt, n in cases]
    for job, (prompt, n) in zip(jobs, cases, strict=True):
        assert_same(job.result(timeout=120), local[arch](prompt, max_new_tokens=n, **GREEDY))


def test_jobs_join_while_a_long_one_decodes(module_deployment: Deployment,
                                            served: dict[str, str],
                                            local: dict[str, Any]) -> None:
    """Short jobs sent while a long one decodes start after it and end before it."""
    remote = module_deployment.remote("text-generation", served["gpt2"])
    ended: dict[str, float] = {}

    def wait(job: Any) -> Any:
        result = job.result(timeout=120)
        ended[job.id] = time.monotonic()
        return result

    with ThreadPoolExecutor(8) as pool:
        long_job = remote.submit(PROMPTS[0], max_new_tokens=480, **GREEDY)
        long_result = pool.submit(wait, long_job)
        wait_until(lambda: long_job.status() == "STARTED", 30, "the long job to start")
        short_jobs = [remote.submit(PROMPTS[i % 4], max_new_tokens=4, **GREEDY)
                      for i in range(4)]
        short_results = [pool.submit(wait, job) for job in short_jobs]
        for job, future in zip(short_jobs, short_results, strict=True):
            assert_same(future.result(), local["gpt2"](job_prompt(job, short_jobs),
                                                       max_new_tokens=4, **GREEDY))
        assert long_job.status() == "STARTED", "the long job ended before the short ones"
        assert_same(long_result.result(), local["gpt2"](PROMPTS[0], max_new_tokens=480,
                                                        **GREEDY))
    started = {job.id: float(module_deployment.redis.hget(
        f"{module_deployment.prefix}:job:{job.id}", "started_at") or 0)
        for job in [long_job, *short_jobs]}
    for job in short_jobs:
        assert started[job.id] > started[long_job.id]
        assert ended[job.id] < ended[long_job.id]


def job_prompt(job: Any, jobs: list[Any]) -> str:
    """The prompt a short job of the test above was sent with."""
    return PROMPTS[jobs.index(job) % 4]


@pytest.mark.parametrize(("inputs", "params"), [
    ([PROMPTS[0], PROMPTS[1]], {"max_new_tokens": 4, "do_sample": False, "num_beams": 2,
                                "num_return_sequences": 2}),
    (PROMPTS[1], {"max_new_tokens": 5, "do_sample": False, "repetition_penalty": 1.5}),
], ids=["beams", "repetition-penalty"])
def test_calls_it_cannot_honour_run_statically(module_deployment: Deployment,
                                               served: dict[str, str], local: dict[str, Any],
                                               inputs: Any, params: dict[str, Any]) -> None:
    remote = module_deployment.remote("text-generation", served["gpt2"])
    assert_same(remote(inputs, timeout=60, **params), local["gpt2"](inputs, **params))
    worker = module_deployment.workers[0]
    assert "runs on the static path" in worker.log()


def test_sampling_runs_statically(module_deployment: Deployment,
                                  served: dict[str, str]) -> None:
    """The pipeline's default (sampling) still works on a continuous route."""
    remote = module_deployment.remote("text-generation", served["llama"])
    got = remote([PROMPTS[0], PROMPTS[2]], max_new_tokens=3, timeout=60)
    assert [len(g) for g in got] == [1, 1]
    assert got[0][0]["generated_text"].startswith(PROMPTS[0])
    assert "sampling" in "".join(w.log() for w in module_deployment.workers)


def test_concurrent_threads_share_one_route(module_deployment: Deployment,
                                            served: dict[str, str],
                                            local: dict[str, Any]) -> None:
    remote = module_deployment.remote("text-generation", served["llama"])
    errors: list[BaseException] = []

    def call(n: int) -> None:
        try:
            prompt = PROMPTS[n % 4]
            assert_same(remote(prompt, max_new_tokens=3 + n, timeout=60, **GREEDY),
                        local["llama"](prompt, max_new_tokens=3 + n, **GREEDY))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors


def test_continuous_needs_text_generation() -> None:
    with pytest.raises(ValueError, match="text-generation routes only"):
        RouteSpec(task="text-classification", model="m", batching="continuous")


def test_worker_refuses_continuous_for_other_tasks(deployment: Deployment,
                                                   models_dir: Path) -> None:
    path = str(build_text_model("text-classification", models_dir))
    worker = deployment.start_worker("text-classification", path, "--batching", "continuous",
                                     ready=False)
    assert worker.wait_exit(60) == 2
    assert "text-generation routes only" in worker.log()


def test_warm_shutdown_finishes_the_running_batch(deployment: Deployment, models_dir: Path
                                                  ) -> None:
    """SIGTERM while a job decodes: it ends with its full result and the worker exits 0;
    a job sent meanwhile waits in the queue for the next worker."""
    path = str(build_text_model("text-generation", models_dir))
    worker = deployment.start_worker("text-generation", path, "--batching", "continuous")
    remote = deployment.remote("text-generation", path)
    running = remote.submit(PROMPTS[0], max_new_tokens=480, **GREEDY)
    wait_until(lambda: running.status() == "STARTED", 30, "the job to start")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait_exit(60) == 0, worker.log()
    local = transformers.pipeline("text-generation", model=path)
    assert_same(running.result(timeout=5), local(PROMPTS[0], max_new_tokens=480, **GREEDY))
    queued = remote.submit(PROMPTS[1], max_new_tokens=5, require_worker=False, **GREEDY)
    deployment.start_worker("text-generation", path, "--batching", "continuous")
    assert_same(queued.result(timeout=60), local(PROMPTS[1], max_new_tokens=5, **GREEDY))


def test_a_model_it_cannot_serve_falls_back_to_static_batching(deployment: Deployment,
                                                               models_dir: Path,
                                                               tmp_path: Path) -> None:
    """A generation config with a repetition penalty (a logits processor the manager may not
    apply): the worker says so, serves the route statically, results equal the local ones."""
    source = build_text_model("text-generation", models_dir)
    path = tmp_path / "penalised"
    shutil.copytree(source, path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config,
                                                             "repetition_penalty": 1.3}))
    worker = deployment.start_worker("text-generation", str(path), "--batching", "continuous")
    assert "continuous batching unavailable" in worker.log()
    assert "RepetitionPenaltyLogitsProcessor" in worker.log()
    assert "static batching" in worker.log()
    remote = deployment.remote("text-generation", str(path))
    local = transformers.pipeline("text-generation", model=str(path))
    assert_same(remote(PROMPTS, max_new_tokens=6, timeout=60, **GREEDY),
                local(PROMPTS, max_new_tokens=6, **GREEDY))


def test_sigkill_mid_decoding_loses_nothing_and_records_once(redis_url: str,
                                                             models_dir: Path,
                                                             tmp_path: Path) -> None:
    """A worker killed while its batch decodes: its messages come back after the visibility
    timeout, a new worker runs them, each job has one result equal to the local one."""
    dep = Deployment(redis_url, tmp_path, visibility_timeout_s=4)
    try:
        path = str(build_text_model("text-generation", models_dir))
        first = dep.start_worker("text-generation", path, "--batching", "continuous")
        remote = dep.remote("text-generation", path)
        cases = [(PROMPTS[i % 4], 300 + 20 * i) for i in range(6)]
        jobs = [remote.submit(prompt, max_new_tokens=n, **GREEDY) for prompt, n in cases]
        jobs.append(remote.submit(PROMPTS, max_new_tokens=200, **GREEDY))
        wait_until(lambda: all(j.status() == "STARTED" for j in jobs), 30, "jobs to start")
        first.proc.send_signal(signal.SIGKILL)
        assert first.wait_exit(30) == -signal.SIGKILL
        assert not any(j.status() == "SUCCESS" for j in jobs), "the batch ended before the kill"
        dep.start_worker("text-generation", path, "--batching", "continuous")
        local = transformers.pipeline("text-generation", model=path)
        for job, (prompt, n) in zip(jobs, cases, strict=False):
            assert_same(job.result(timeout=120), local(prompt, max_new_tokens=n, **GREEDY))
        assert_same(jobs[-1].result(timeout=120), local(PROMPTS, max_new_tokens=200, **GREEDY))
        stats = dep.redis.hgetall(dep.settings.keys.route_stats(remote.route))
        assert int(stats[b"jobs:SUCCESS"]) == len(jobs)  # each job stored once
    finally:
        dep.close()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_streams_from_the_running_batch_equal_local(module_deployment: Deployment,
                                                    served: dict[str, str],
                                                    local: dict[str, Any], arch: str) -> None:
    """stream() on a continuous route: one prompt's pieces, and each prompt of a list,
    join to the local pipeline's new text; the job's result is the local one."""
    remote = module_deployment.remote("text-generation", served[arch])
    params = {"max_new_tokens": 24, **GREEDY}
    pieces = list(remote.stream(PROMPTS[3], timeout=60, **params))
    assert "".join(pieces) == local[arch](PROMPTS[3], return_full_text=False,
                                          **params)[0]["generated_text"]
    texts: dict[int, str] = {}
    for piece in remote.stream(PROMPTS, timeout=60, **params):
        assert piece.seq == 0
        texts[piece.index] = texts.get(piece.index, "") + piece.text
    expected = local[arch](PROMPTS, return_full_text=False, **params)
    assert texts == {i: e[0]["generated_text"] for i, e in enumerate(expected)
                     if e[0]["generated_text"]}
    job = remote.submit(PROMPTS[1], stream=True, **params)
    streamed = "".join(p.text for p in job.stream(timeout=60))
    assert_same(job.result(10), local[arch](PROMPTS[1], **params))
    assert job.result(10)[0]["generated_text"] == PROMPTS[1] + streamed
    assert len(pieces) > 1, pieces  # as it grows, not in one lump at the end
