"""Fair lanes in the worker's batcher: interactive inputs never wait behind queued bulk chunks.

The batcher runs here with a recording stand-in for the pipeline runner (pure logic: no
model, no Redis), fed jobs the way RouteService feeds it.
"""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace
from typing import Any

from pipeq.core.contract import JobRequest, Route
from pipeq.worker.batching.batcher import BatchPolicy, MicroBatcher
from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.batching.lanes import LaneQueue
from pipeq.worker.model.runner import PipelineRunner
from pipeq.worker.testing import CallbackSink

ROUTE = Route(task="feature-extraction", model="org/m")


class RecordingRunner(PipelineRunner):
    """Records each batch's inputs; each call takes ``seconds``; the first one says it began
    (``entered``) and waits for a gate."""

    def __init__(self, seconds: float = 0.0):
        super().__init__(SimpleNamespace(task="feature-extraction", device="cpu"))
        self.seconds = seconds
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        if not self.batches:
            self.entered.set()
            self.gate.wait(10)
        self.batches.append(list(items))
        time.sleep(self.seconds)
        return [len(i) for i in items]


def _job(inputs: list[str], lane: str, job_id: str) -> JobInFlight:
    return JobInFlight(JobRequest(job_id=job_id, route=ROUTE, inputs=inputs, single=False,
                                  submitted_at=time.time(), lane=lane))  # type: ignore[arg-type]


def _batcher(runner: RecordingRunner, size: int = 8) -> MicroBatcher:
    return MicroBatcher(runner, BatchPolicy(max_batch_size=size, max_wait_ms=0),
                        CallbackSink())


def test_interactive_job_runs_in_the_next_batch_alone_despite_queued_bulk() -> None:
    runner = RecordingRunner()
    batcher = _batcher(runner)
    batcher.start()
    try:
        blocker = _job(["b" * 3], "bulk", "blocker")
        batcher.submit(blocker)
        assert runner.entered.wait(5)  # the batcher is inside the first call, held by the gate
        bulk = [_job([f"bulk-{c}-{i}" for i in range(16)], "bulk", f"c{c}") for c in range(4)]
        for job in bulk:
            batcher.submit(job)
        interactive = _job(["hi"], "interactive", "i1")
        batcher.submit(interactive)
        runner.gate.set()
        assert interactive.done.wait(5)
        for job in bulk:
            assert job.done.wait(5)
    finally:
        batcher.stop()
    # First the batch in hand, then the interactive input alone, then the 64 bulk inputs.
    assert runner.batches[1] == ["hi"]
    assert sorted(x for b in runner.batches[2:] for x in b) == sorted(
        x for j in bulk for x in j.request.inputs)
    assert all(len(b) <= 8 for b in runner.batches)


def test_bulk_inputs_are_planned_by_length_oldest_half_first() -> None:
    lanes: LaneQueue[tuple[str, str]] = LaneQueue(plan_size=16, bulk_batch=2,
                                                  lane_of=lambda s: s[0],
                                                  length_of=lambda s: len(s[1]))
    for text in ["cccc", "a", "bbb", "dd", "zzzzzz", "y", "xxxxx", "w"]:
        lanes.put(("bulk", text))
    batches = []
    for _ in range(4):
        batches.append([lanes.get(), lanes.get_nowait()])
    # Each plan: the oldest half of what waits, sorted by length, served two per batch.
    assert [[text for _, text in b] for b in batches] == [
        ["a", "dd"], ["bbb", "cccc"], ["y", "zzzzzz"], ["w", "xxxxx"]]


def test_an_interactive_batch_is_not_filled_with_bulk_inputs() -> None:
    lanes: LaneQueue[tuple[str, str]] = LaneQueue(lane_of=lambda s: s[0],
                                                  length_of=lambda s: len(s[1]))
    lanes.put(("bulk", "x"))
    lanes.put(("interactive", "now"))
    assert lanes.get() == ("interactive", "now")
    try:
        got = lanes.get(timeout=0.05)
    except queue.Empty:
        got = None
    assert got is None, "a bulk input joined an interactive batch"
    assert lanes.get() == ("bulk", "x")  # the next batch begins with it
    lanes.put(None)
    assert lanes.get() is None  # the stop signal comes first


def test_interactive_waits_for_one_bulk_call_not_a_whole_gather() -> None:
    # The batcher gathers several calls' worth of inputs; bulk gathers stop at one call.
    runner = RecordingRunner(seconds=0.05)
    runner.gate.set()
    batcher = _batcher(runner, size=4)
    batcher.start()
    try:
        bulk = [_job([f"b{c}-{i}" for i in range(16)], "bulk", f"c{c}") for c in range(4)]
        for job in bulk:
            batcher.submit(job)
        assert runner.entered.wait(5)
        in_hand = len(runner.batches) + 1  # (the first call may be recorded after this)
        interactive = _job(["hi"], "interactive", "i1")
        batcher.submit(interactive)
        assert interactive.done.wait(5)
        for job in bulk:
            assert job.done.wait(10)
    finally:
        batcher.stop()
    assert runner.batches.index(["hi"]) <= in_hand + 1, runner.batches[:in_hand + 3]


def test_a_full_bulk_batch_ends_at_once() -> None:
    lanes: LaneQueue[tuple[str, str]] = LaneQueue(bulk_batch=2, lane_of=lambda s: s[0],
                                                  length_of=lambda s: len(s[1]))
    for text in ["a", "b", "c"]:
        lanes.put(("bulk", text))
    assert [lanes.get(), lanes.get_nowait()] == [("bulk", "a"), ("bulk", "b")]
    started = time.monotonic()
    try:
        lanes.get(timeout=1.0)
    except queue.Empty:
        pass
    else:
        raise AssertionError("a third bulk input joined a batch of two")
    assert time.monotonic() - started < 0.5, "a full batch waited for more inputs"
    assert lanes.get() == ("bulk", "c")
