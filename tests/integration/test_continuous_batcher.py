"""The continuous batcher alone, on a real tiny GPT-2 and transformers' manager (no Redis).

Streaming hook: each job's text sink gets pieces that join to each input's generated text,
then ``end()`` once; deadlines take a job's requests out of the running batch; jobs it
cannot honour go to the static batcher; each job is finished exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers
from tiny_models import build_text_model

from pipeq.core.contract import JobRequest, JobState, Route
from pipeq.worker.batching.batcher import BatchPolicy, MicroBatcher
from pipeq.worker.batching.continuous import ContinuousBatcher, ExclusiveRunner
from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.batching.textstreams import JobTextStreams
from pipeq.worker.model.generation import ContinuousEngine, GenerationPlan
from pipeq.worker.model.loader import prepare_for_batching
from pipeq.worker.model.runner import PipelineRunner
from pipeq.worker.testing import CallbackSink

PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "a"]


class RecordingSink:
    """A job's text sink (``JobTextSink``) that keeps every piece per input and counts how
    often the batcher closed the job's streams."""

    def __init__(self) -> None:
        self.pieces: dict[int, list[str]] = {}
        self.ends = 0

    def put(self, index: int, seq: int, at: int, text: str) -> None:
        assert self.ends == 0, "a piece after the job's streams were closed"
        assert at == sum(map(len, self.pieces.get(index, []))), "a piece out of place"
        self.pieces.setdefault(index, []).append(text)

    def flush(self) -> None:
        """Pieces are kept as they are put."""


class RecordingStreams(JobTextStreams):
    """The workers' own streams, over recording sinks: every job sent to the continuous
    loop streams (as if submitted with stream=True); closing counts per job."""

    def __init__(self, tokenizer: Any, sinks: dict[str, RecordingSink]):
        super().__init__(tokenizer)
        self.sinks = sinks

    def open(self, job: JobInFlight, index: int, plan: GenerationPlan) -> Any:
        if job.text is None:
            job.text = self.sinks.setdefault(job.job_id, RecordingSink())  # type: ignore[assignment]
        return super().open(job, index, plan)

    def close(self, jobs: list[JobInFlight]) -> None:
        for job in jobs:
            if job.job_id in self.sinks:
                self.sinks[job.job_id].ends += 1


@pytest.fixture(scope="module")
def pipe(models_dir: Path) -> Any:
    path = str(build_text_model("text-generation", models_dir))
    pipe = transformers.pipeline("text-generation", model=path, device="cpu")
    prepare_for_batching(pipe)
    return pipe


@pytest.fixture
def batcher(pipe: Any) -> Iterator[tuple[ContinuousBatcher, dict[str, RecordingSink],
                                         list[str]]]:
    sinks: dict[str, RecordingSink] = {}
    finished: list[str] = []
    lock = threading.Lock()

    def finish(jobs: list[JobInFlight]) -> None:
        with lock:
            finished.extend(j.job_id for j in jobs)

    sink = CallbackSink(finish=finish)
    engine = ContinuousEngine.for_pipeline(pipe, max_requests=8)
    static = MicroBatcher([ExclusiveRunner(PipelineRunner(pipe), engine)],
                          BatchPolicy(max_batch_size=4, max_wait_ms=0), sink)
    continuous = ContinuousBatcher(engine, static, sink,
                                   streams=RecordingStreams(pipe.tokenizer, sinks))
    continuous.start()
    yield continuous, sinks, finished
    continuous.stop(10)


def _job(inputs: list[str], job_id: str, single: bool = False, **params: Any) -> JobInFlight:
    route = Route(task="text-generation", model="tiny")
    return JobInFlight(JobRequest(job_id=job_id, route=route, inputs=inputs, single=single,
                                  params=params, submitted_at=time.time()))


def test_streamed_pieces_join_to_each_generated_text(batcher: Any, pipe: Any) -> None:
    continuous, sinks, finished = batcher
    jobs = [_job(PROMPTS, "list", max_new_tokens=20, do_sample=False),
            _job(PROMPTS[1:2], "single", single=True, max_new_tokens=9, do_sample=False,
                 return_full_text=False)]
    for job in jobs:
        continuous.submit(job)
    for job in jobs:
        assert job.done.wait(30), job.job_id
    assert jobs[0].outcome is not None and jobs[0].outcome.state == JobState.SUCCESS
    assert jobs[0].outcome.payload == pipe(PROMPTS, max_new_tokens=20, do_sample=False)
    single = pipe(PROMPTS[1], max_new_tokens=9, do_sample=False, return_full_text=False)
    assert jobs[1].outcome is not None and jobs[1].outcome.payload == single
    for index, prompt in enumerate(PROMPTS):
        text = jobs[0].outcome.payload[index][0]["generated_text"]
        assert prompt + "".join(sinks["list"].pieces[index]) == text
    # Text comes as it grows, not in one block at the end (this random model's text is
    # partly half characters, which are held back until they are whole: not everywhere).
    assert max(len(pieces) for pieces in sinks["list"].pieces.values()) > 3
    assert "".join(sinks["single"].pieces[0]) == single[0]["generated_text"]
    assert sinks["list"].ends == sinks["single"].ends == 1
    assert sorted(finished) == ["list", "single"]  # each job finished once


def test_a_deadline_takes_a_job_out_of_the_running_batch(batcher: Any) -> None:
    continuous, sinks, finished = batcher
    long_job = _job(PROMPTS[:1], "long", max_new_tokens=500, do_sample=False)
    continuous.submit(long_job)
    deadline = time.monotonic() + 10
    while "long" not in continuous._running and time.monotonic() < deadline:
        time.sleep(0.01)
    continuous.end_early([(long_job, JobState.FAILURE, "JobTimeout", "past its deadline")])
    assert long_job.done.wait(5)
    assert long_job.outcome is not None and long_job.outcome.payload["type"] == "JobTimeout"
    short = _job(PROMPTS[1:2], "short", max_new_tokens=3, do_sample=False)
    continuous.submit(short)
    assert short.done.wait(30)
    assert short.outcome is not None and short.outcome.state == JobState.SUCCESS
    assert finished.count("long") == 1 and sinks["long"].ends == 1
    assert not continuous._requests, "the long job's request is still in the running batch"


def test_calls_it_cannot_honour_go_to_the_static_batcher(batcher: Any, pipe: Any) -> None:
    continuous, sinks, finished = batcher
    job = _job(PROMPTS[:2], "beams", max_new_tokens=4, do_sample=False, num_beams=2,
               num_return_sequences=2)
    continuous.submit(job)
    assert job.done.wait(30)
    assert job.outcome is not None
    assert job.outcome.payload == pipe(PROMPTS[:2], max_new_tokens=4, do_sample=False,
                                       num_beams=2, num_return_sequences=2)
    assert "beams" not in sinks  # the static path streams nothing here
    assert finished == ["beams"]


def test_a_failing_generation_loop_fails_its_jobs_and_starts_again(batcher: Any,
                                                                   pipe: Any) -> None:
    """An out-of-memory error inside a decoding step kills transformers' loop: the jobs in
    it fail with OutOfMemory (nothing hangs), the loop starts again, later jobs run."""
    continuous, sinks, finished = batcher
    manager = continuous.engine.manager
    real_step = manager._generation_step

    def out_of_memory() -> None:
        manager._generation_step = real_step  # once
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    manager._generation_step = out_of_memory
    doomed = _job(PROMPTS[:2], "doomed", max_new_tokens=50, do_sample=False)
    continuous.submit(doomed)
    assert doomed.done.wait(30)
    assert doomed.outcome is not None and doomed.outcome.payload["type"] == "OutOfMemory"
    later = _job(PROMPTS[1:2], "later", single=True, max_new_tokens=6, do_sample=False)
    continuous.submit(later)
    assert later.done.wait(30)
    assert later.outcome is not None
    assert later.outcome.payload == pipe(PROMPTS[1], max_new_tokens=6, do_sample=False)
    assert continuous.alive
    assert finished == ["doomed", "later"] and sinks["doomed"].ends == 1


def test_a_sequence_too_long_for_the_model_fails_alone_on_the_static_path(
        batcher: Any, pipe: Any) -> None:
    """Prompt + max_new_tokens over the model's 512 positions would break the running
    batch's step for everyone: that job runs statically (and fails there, alone)."""
    continuous, sinks, _ = batcher
    fine = _job(PROMPTS[1:2], "fine", single=True, max_new_tokens=60, do_sample=False)
    too_long = _job(["hello world " * 60], "too-long", single=True, max_new_tokens=450,
                    do_sample=False)
    continuous.submit(fine)
    continuous.submit(too_long)
    assert fine.done.wait(30) and too_long.done.wait(60)
    assert fine.outcome is not None
    assert fine.outcome.payload == pipe(PROMPTS[1], max_new_tokens=60, do_sample=False)
    assert too_long.outcome is not None and too_long.outcome.state == JobState.FAILURE
    with pytest.raises(IndexError):  # position 512 of a 512-position model
        pipe("hello world " * 60, max_new_tokens=450, do_sample=False)
    assert too_long.outcome.payload["type"] == "IndexError"
    assert "too-long" not in sinks  # never joined the running batch
    # The static call ran while the loop decoded "fine": they took turns on the model.
    # Overlapping, transformers' forwards left the shared config.is_causal False for good
    # (every later call then attended to future tokens).
    assert getattr(pipe.model.config, "is_causal", None) is not False
    assert pipe(PROMPTS[1], max_new_tokens=60, do_sample=False) == fine.outcome.payload
