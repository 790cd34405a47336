"""Model instances: calls side by side on one worker, each job answered once and in order.

The batcher runs here with stand-in runners (pure logic), and the instance copies on real
tiny pipelines built by ``tiny_models`` (the real ``pipeline()`` loading code).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeq.core.config import RouteSpec
from pipeq.core.contract import JobRequest, Route
from pipeq.worker.batching.batcher import BatchPolicy, MicroBatcher
from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.model.instances import (
    LONE_CALL_WAIT_S,
    CoreShare,
    core_share,
    instance_plan,
    replicate,
)
from pipeq.worker.model.runner import PipelineRunner
from pipeq.worker.testing import CallbackSink

ROUTE = Route(task="feature-extraction", model="org/m")


@pytest.mark.parametrize(("device", "requested", "threads", "expected"), [
    ("cpu", 0, 2, (2, 1)),
    ("cpu", 0, 16, (2, 8)),
    ("cpu", 0, 1, (1, 1)),
    ("cpu", 4, 2, (4, 1)),
    ("cpu", 1, 8, (1, 8)),
    ("cuda:0", 0, 8, (1, 8)),
    ("cuda:1", 4, 8, (1, 8)),
])
def test_instance_plan(device: str, requested: int, threads: int,
                       expected: tuple[int, int]) -> None:
    assert instance_plan(device, requested, threads) == expected


class GatedRunner(PipelineRunner):
    """Answers each input with its length; the first ``barrier.parties`` calls wait for each other
    (so they must run side by side); records each call."""

    def __init__(self, barrier: threading.Barrier, log: list[tuple[str, list[str]]],
                 name: str):
        super().__init__(SimpleNamespace(task="feature-extraction", device="cpu"))
        self.barrier, self.log, self.name = barrier, log, name

    def run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        self.log.append((self.name, list(items)))
        if len(self.log) <= self.barrier.parties:  # one of the first calls: meet the others
            with contextlib.suppress(threading.BrokenBarrierError):  # the test asserts it
                self.barrier.wait(5)
        time.sleep(0.01)
        return [len(i) for i in items]


def _job(inputs: list[str], job_id: str) -> JobInFlight:
    return JobInFlight(JobRequest(job_id=job_id, route=ROUTE, inputs=inputs, single=False,
                                  submitted_at=time.time()))


def _call_site() -> tuple[str, int]:
    import torch

    return threading.current_thread().name, torch.get_num_threads()


@contextlib.contextmanager
def _core_share(instances: int, threads_per_call: int) -> Any:
    import torch

    before = torch.get_num_threads()  # CoreShare sets the process-wide count: restore it
    cores = CoreShare(instances, threads_per_call)
    try:
        yield cores
    finally:
        cores.close()
        torch.set_num_threads(before)


def test_a_lone_call_runs_on_every_core_and_calls_beside_it_on_their_share() -> None:
    with _core_share(2, 1) as cores:
        name, threads = cores.run(_call_site, alone=True)
        assert name.startswith("pipeq-lone-call") and threads == 2
        seen: list[tuple[str, int]] = []

        def instance_thread() -> None:
            cores.own_share()
            seen.append(cores.run(_call_site, alone=False))

        thread = threading.Thread(target=instance_thread, name="instance")
        thread.start()
        thread.join(10)
        assert seen == [("instance", 1)]


def test_calls_wait_while_a_lone_call_runs_and_a_busy_worker_has_no_lone_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeq.worker.model import instances

    monkeypatch.setattr(instances, "LONE_CALL_WAIT_S", 30.0)  # (the cap is tested below)
    with _core_share(2, 1) as cores:
        running, release = threading.Event(), threading.Event()
        order: list[str] = []

        def lone() -> None:
            running.set()
            release.wait(10)
            order.append("lone")

        first = threading.Thread(target=cores.run, args=(lone, True))
        first.start()
        assert running.wait(10)
        second = threading.Thread(target=cores.run, args=(lambda: order.append("next"), False))
        second.start()
        time.sleep(0.2)
        assert order == [], "a call started beside the lone call (threads beyond the cores)"
        release.set()
        first.join(10)
        second.join(10)
        assert order == ["lone", "next"]

        # A long lone call holds a call that becomes ready for LONE_CALL_WAIT_S at most.
        monkeypatch.setattr(instances, "LONE_CALL_WAIT_S", LONE_CALL_WAIT_S)
        running.clear()
        release.clear()
        first = threading.Thread(target=cores.run, args=(lone, True))
        first.start()
        assert running.wait(10)
        started = time.monotonic()
        beside = cores.run(_call_site, alone=False)
        waited = time.monotonic() - started
        release.set()
        first.join(10)
        assert LONE_CALL_WAIT_S <= waited < LONE_CALL_WAIT_S + 2, waited
        assert beside[0] == threading.current_thread().name

        # A call marked alone while another call runs keeps its own thread's share.
        busy, done = threading.Event(), threading.Event()
        other = threading.Thread(target=cores.run, args=(lambda: (busy.set(), done.wait(10)),
                                                         False))
        other.start()
        assert busy.wait(10)
        name, _ = cores.run(_call_site, alone=True)
        done.set()
        other.join(10)
        assert name == threading.current_thread().name


def test_a_lone_calls_results_are_stored_on_its_own_thread_once_others_may_start() -> None:
    """``then`` (the batcher stores the jobs' results) runs where the call ran, after the
    cores are free again: a call that becomes ready meanwhile does not wait for it."""
    with _core_share(2, 1) as cores:
        storing, stored = threading.Event(), threading.Event()
        seen: list[Any] = []

        def store() -> None:
            seen.append(threading.current_thread().name)
            storing.set()
            stored.wait(10)

        caller = threading.Thread(target=lambda: seen.append(
            cores.run(_call_site, alone=True, then=store)))
        caller.start()
        assert storing.wait(10)
        started = time.monotonic()
        beside = cores.run(_call_site, alone=False)  # while the results are being stored
        assert time.monotonic() - started < LONE_CALL_WAIT_S
        stored.set()
        caller.join(10)
        assert seen[0].startswith("pipeq-lone-call")
        assert seen[1] == (seen[0], 2)  # the call's own result, returned after ``then``
        assert beside[0] == threading.current_thread().name
    # Without a share, ``then`` runs on the caller's thread, after the call.
    with _core_share(2, 4) as cores:
        order: list[str] = []
        cores.run(lambda: order.append("call"), alone=True, then=lambda: order.append("then"))
        assert order == ["call", "then"]


def test_core_share_is_off_where_an_extra_team_would_exceed_the_cores() -> None:
    with _core_share(2, 4) as cores:  # 8 cores, 2 instances of 4 threads
        assert not cores.enabled
        assert cores.run(_call_site, alone=True)[0] == threading.current_thread().name
    gpu = PipelineRunner(SimpleNamespace(task="feature-extraction", device="cuda:0"))
    assert core_share([gpu, gpu]) is None


class ThreadRecordingRunner(PipelineRunner):
    """Answers each input with its length; records the thread of each call."""

    def __init__(self, calls: list[tuple[int, str]]):
        super().__init__(SimpleNamespace(task="feature-extraction", device="cpu"))
        self.calls = calls

    def run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        self.calls.append((len(items), threading.current_thread().name))
        time.sleep(0.005)
        return [len(i) for i in items]


def test_light_traffic_runs_lone_requests_on_every_core_and_load_side_by_side() -> None:
    calls: list[tuple[int, str]] = []
    with _core_share(2, 1) as cores:
        runners = [ThreadRecordingRunner(calls), ThreadRecordingRunner(calls)]
        batcher = MicroBatcher(runners, BatchPolicy(max_batch_size=4, max_wait_ms=20),
                               CallbackSink(), cores=cores)
        batcher.start()
        try:
            for n in range(4):  # one request at a time
                job = _job([f"alone {n}"], f"a{n}")
                batcher.submit(job)
                assert job.done.wait(10)
                assert job.outcome is not None and job.outcome.payload == [len(f"alone {n}")]
            lone = [name for _, name in calls]
            # The first has no lone gather before it; then every one runs on every core.
            assert not lone[0].startswith("pipeq-lone-call")
            assert all(name.startswith("pipeq-lone-call") for name in lone[1:]), lone
            calls.clear()
            burst = [_job([f"busy {j} {n}" for n in range(6)], f"b{j}") for j in range(8)]
            for job in burst:
                batcher.submit(job)
            for job in burst:
                assert job.done.wait(10)
            assert not any(name.startswith("pipeq-lone-call") for _, name in calls), calls
        finally:
            batcher.stop()


def test_two_instances_run_calls_side_by_side_and_finish_each_job_once() -> None:
    barrier = threading.Barrier(2)
    log: list[tuple[str, list[str]]] = []
    runners = [GatedRunner(barrier, log, "a"), GatedRunner(barrier, log, "b")]
    finished: list[str] = []
    lock = threading.Lock()

    def finish(jobs: list[JobInFlight]) -> None:
        with lock:
            finished.extend(j.job_id for j in jobs)

    batcher = MicroBatcher(runners, BatchPolicy(max_batch_size=4, max_wait_ms=0),
                           CallbackSink(finish=finish))
    jobs = [_job([f"{'x' * (n % 7 + 1)}-{j}-{n}" for n in range(10)], f"j{j}")
            for j in range(6)]
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    try:
        for job in jobs:
            assert job.done.wait(10), job.job_id
    finally:
        batcher.stop()
    assert not barrier.broken, "the first two calls never ran at the same time"
    assert {name for name, _ in log} == {"a", "b"}
    assert sorted(finished) == sorted(j.job_id for j in jobs)  # each job finished once
    for job in jobs:
        assert job.outcome is not None and job.outcome.state.value == "SUCCESS"
        assert job.outcome.payload == [len(i) for i in job.request.inputs]  # in input order
    assert sum(len(items) for _, items in log) == 60  # every input ran exactly once


def test_jobs_are_released_when_storing_their_records_fails() -> None:
    """A finish_jobs that raises must not leave a job in the batcher for ever (its message
    stays unacknowledged and is redelivered)."""
    barrier = threading.Barrier(1)
    log: list[tuple[str, list[str]]] = []
    attempts: list[list[str]] = []

    def failing_finish(jobs: list[JobInFlight]) -> None:
        attempts.append([j.job_id for j in jobs])
        raise ConnectionError("Redis went away")

    batcher = MicroBatcher([GatedRunner(barrier, log, "a"), GatedRunner(barrier, log, "b")],
                           BatchPolicy(max_batch_size=4, max_wait_ms=0),
                           CallbackSink(finish=failing_finish))
    jobs = [_job(["one", "two"], "j1"), _job(["three"], "j2")]
    batcher.start()
    try:
        for job in jobs:
            batcher.submit(job)
        for job in jobs:
            assert job.done.wait(5), f"{job.job_id}'s task would wait forever"
    finally:
        batcher.stop()
    assert sorted(i for ids in attempts for i in ids) == ["j1", "j2"]  # each stored once


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_text_model

    root = tmp_path_factory.mktemp("instances")
    build_text_model("text-generation", root)
    return root


def test_instances_share_the_model_and_answer_like_the_original_from_two_threads(
        tiny: Path) -> None:
    """Each instance has its own tokenizer (a fast tokenizer refuses concurrent calls:
    "Already borrowed") and the same model; concurrent calls give the sequential answers."""
    from pipeq.worker.model.loader import load_pipeline

    spec = RouteSpec(task="text-generation", model=str(tiny / "text-generation"))
    original = PipelineRunner(load_pipeline(spec, "cpu"))
    runners = replicate(original, 2)
    assert runners[0] is original
    assert runners[1].pipe.model is original.pipe.model
    assert runners[1].pipe.tokenizer is not original.pipe.tokenizer
    assert runners[1].pipe.tokenizer.padding_side == "left"  # the batching set-up is kept
    params = {"max_new_tokens": 3, "do_sample": False}
    prompts = [[f"prompt {n} " + "word " * (n % 5), f"another {n}"] for n in range(12)]
    expected = [original.run(p, params) for p in prompts]
    got: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def work(runner: PipelineRunner, offset: int) -> None:
        try:
            for n in range(offset, len(prompts), 2):
                got[n] = runner.run(prompts[n], params)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r, i)) for i, r in enumerate(runners)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert [got[n] for n in range(len(prompts))] == expected


def test_worker_openmp_threads_spin_briefly_unless_the_operator_says_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    from pipeq.worker.ops.devices import WORKER_OPENMP_SPIN, short_openmp_spin

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    short_openmp_spin()
    assert os.environ["GOMP_SPINCOUNT"] == str(WORKER_OPENMP_SPIN)
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    short_openmp_spin()
    assert os.environ["GOMP_SPINCOUNT"] == "5"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    short_openmp_spin()
    assert "GOMP_SPINCOUNT" not in os.environ
    # libgomp reads it once, when torch loads it: the worker command must not import torch
    # before WorkerRun.run sets it.
    loaded = subprocess.run(
        [sys.executable, "-P", "-c", "import sys, pipeq.ops.cli, pipeq.ops.worker_command, "
         "pipeq.worker.start; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"
