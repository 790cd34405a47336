"""Micro-batching: inputs of many jobs, from any producer, gathered into one pipeline call.

pipeq's Celery task strategy hands each received job to the :class:`MicroBatcher` (no
thread waits per job). The batcher gathers inputs until ``max_batch_size`` inputs or
``max_wait_ms`` after the first, keeps apart inputs whose call parameters differ, sorts
them by length so that padding stays small, plans the calls, runs them, and stores every
finished job's record in one Redis round trip. Each job keeps its own Celery task id,
events (Flower) and result.

Calls run on one thread per *model instance* (one runner each, ``pipeq.worker.model.instances``):
one on a GPU, several on a CPU, where independent single-threaded calls side by side beat
one call spread over every core. Each thread runs the calls planned by a gather; when none
are left it gathers the next ones itself, one thread at a time (``_gather_lock``), so the
inputs of a gather are sorted and planned together and any idle thread can run its calls.

Failures are isolated: a batch that fails is split in halves and retried, down to single
inputs, so one bad input (or an out-of-memory batch) fails only its own job.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pipeq.core.contract import JobState
from pipeq.worker.batching.jobs import (
    Failure,
    JobInFlight,
    JobSink,
    Slot,
    hand_back_unstarted,
    input_length,
)
from pipeq.worker.batching.lanes import LaneQueue
from pipeq.worker.batching.planning import plan_calls
from pipeq.worker.hooks import Middleware
from pipeq.worker.model.instances import CoreShare
from pipeq.worker.model.runner import PipelineRunner, is_out_of_memory, is_transient, shape_result
from pipeq.worker.model.streamer import TextTarget

log = logging.getLogger("pipeq.batcher")

#: How many calls' worth of inputs (x max_batch_size) one gather may collect under load.
GATHER_CALLS = 4


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a route forms batches."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    #: Cap on (longest input length x batch size) in one call; 0 means no cap.
    max_batch_tokens: int = 0
    #: Cost of one pipeline call in input-length units, measured at warm-up; None: unknown
    #: (calls are filled up to max_batch_size). Decides how uneven batches are split.
    call_overhead: float | None = None
    #: Transient errors: retries of the same call, with exponential backoff and jitter.
    max_retries: int = 3
    retry_backoff_s: float = 0.5


class MicroBatcher:
    """Gathers inputs of many jobs into batched pipeline calls, run by one thread per runner.

    ``runners``: one :class:`PipelineRunner` per model instance (the same model; each call
    runs on one of them at a time). ``cores``: how the instances share a CPU's cores (a
    lone call gets all of them); None: each call keeps its thread's torch threads.
    """

    def __init__(self, runners: PipelineRunner | Sequence[PipelineRunner], policy: BatchPolicy,
                 sink: JobSink, hooks: Middleware | None = None, cores: CoreShare | None = None):
        self.runners = [runners] if isinstance(runners, PipelineRunner) else list(runners)
        if not self.runners:
            raise ValueError("MicroBatcher needs at least one runner")
        self.runner = self.runners[0]
        self.policy = policy
        self.sink = sink
        self.hooks = hooks or Middleware()
        self.cores = cores or CoreShare(1, 1)
        # Interactive inputs before bulk chunks' (batching.lanes); bulk ones sorted by length.
        self._queue: LaneQueue[Slot] = LaneQueue(plan_size=16 * policy.max_batch_size,
                                                 bulk_batch=policy.max_batch_size)
        self._workers = [
            threading.Thread(target=self._loop, args=(runner,), daemon=True,
                             name="pipeq-batcher" if len(self.runners) == 1
                             else f"pipeq-batcher-{n}")
            for n, runner in enumerate(self.runners)
        ]
        self._stopping = threading.Event()
        self._returning = threading.Event()
        self._last_batch_size = 0
        #: Gathers in a row that found a single input: light traffic when it reaches 2.
        self._single_gathers = 0
        #: One thread gathers (and starts jobs, and plans calls) at a time.
        self._gather_lock = threading.Lock()
        #: Planned calls no thread has taken yet, in plan order.
        self._ready: deque[list[Slot]] = deque()
        #: Guards the jobs' outputs, counts and outcomes, written by every batcher thread.
        self._jobs_lock = threading.Lock()

    def start(self) -> None:
        """Start the batching threads."""
        for thread in self._workers:
            thread.start()

    def begin_shutdown(self) -> None:
        """Stop starting jobs: the calls in hand finish; jobs not yet started are handed
        back (``JobSink.return_jobs``), so their messages go back to the queue."""
        self._returning.set()

    @property
    def alive(self) -> bool:
        """True while every batching thread runs (a dead one would strand its jobs)."""
        return all(thread.is_alive() for thread in self._workers)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the calls in hand, then stop the threads."""
        self._stopping.set()
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not self.alive:  # (a thread still running may yet hand a lone call over)
            self.cores.close()

    def end_early(self, failures: list[Failure]) -> None:
        """End jobs before all their inputs ran (deadline, run-time limit, bad media): each
        gets its failure unless it has an outcome already; their records are stored now,
        and whatever of them still runs later is discarded."""
        with self._jobs_lock:
            for job, state, kind, message in failures:
                job.fail(state, kind, message)
        self._finish([job for job, *_ in failures])

    def submit(self, job: JobInFlight) -> None:
        """Queue every input of ``job`` for batching; ``job.done`` is set when it ends."""
        key = json.dumps(job.request.params, sort_keys=True)
        for index, item in enumerate(job.items):
            self._queue.put(Slot(job, index, item, input_length(item), key))

    # the batching threads
    def _loop(self, runner: PipelineRunner) -> None:
        self.cores.own_share()
        while True:
            call = self._next_call()
            if call is None:
                return
            try:
                # A lone request under light traffic (the gather before found one input
                # too) may run on every core (CoreShare); under load calls run side by side.
                alone = (len(call) == 1 and self._single_gathers >= 2 and not self._ready
                         and self._queue.empty())
                # Jobs whose inputs are all done end now, not after the whole gather.
                self.cores.run(functools.partial(self._run, runner, call), alone,
                               then=functools.partial(self._complete,
                                                      _unique(s.job for s in call)))
            except Exception:  # never let a batching thread die: fail the jobs instead
                log.exception("call of %d inputs failed unexpectedly", len(call))
                self._fail_unexpected(call)

    def _next_call(self) -> list[Slot] | None:
        """A planned call to run: one left by an earlier gather, else from a new gather.

        None once stopping and no planned call is left.
        """
        while True:
            if (call := self._take_ready()) is not None:
                return call
            if self._stopping.is_set():
                return None
            with self._gather_lock:
                if (call := self._take_ready()) is not None:  # planned while this one waited
                    return call
                if self._stopping.is_set():
                    return None
                slots = self._gather()
                if not slots:
                    continue
                try:
                    calls = self._plan(slots)
                except Exception:  # never let a batching thread die: fail the jobs instead
                    log.exception("batch of %d inputs failed unexpectedly", len(slots))
                    self._fail_unexpected(slots)
                    continue
                if calls:
                    with self._jobs_lock:
                        self._ready.extend(calls[1:])
                    return calls[0]

    def _take_ready(self) -> list[Slot] | None:
        with self._jobs_lock:
            return self._ready.popleft() if self._ready else None

    def _gather(self) -> list[Slot]:
        first = self._queue.get()
        if first is None:
            self._stopping.set()
            return []
        slots = [first]
        # Gather a few calls' worth: sorting more inputs by length leaves less padding.
        limit = self.policy.max_batch_size * GATHER_CALLS
        self._drain(slots, limit)
        # Wait for more only under load: a lone request (the last batch had one input) runs
        # at once, so light traffic pays no batching delay.
        if len(slots) < limit and self._last_batch_size > 1 and self.policy.max_wait_ms > 0:
            deadline = time.monotonic() + self.policy.max_wait_ms / 1000
            while len(slots) < limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    slot = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if slot is None:
                    self._stopping.set()
                    break
                slots.append(slot)
                self._drain(slots, limit)
        self._last_batch_size = len(slots)
        self._single_gathers = self._single_gathers + 1 if len(slots) == 1 else 0
        return slots

    def _drain(self, slots: list[Slot], limit: int) -> None:
        while len(slots) < limit:
            try:
                slot = self._queue.get_nowait()
            except queue.Empty:
                return
            if slot is None:
                self._stopping.set()
                return
            slots.append(slot)

    def _plan(self, slots: list[Slot]) -> list[list[Slot]]:
        """Start the gather's new jobs; its live inputs as calls (grouped, sorted, split)."""
        fresh = _unique(s.job for s in slots if not s.job.started and s.job.outcome is None)
        if fresh and self._returning.is_set():  # shutting down
            fresh = hand_back_unstarted(fresh, self.sink)
            slots = [s for s in slots if not s.job.returned]
        if fresh:
            self.sink.start_jobs(fresh)  # marks STARTED; fails cancelled/expired jobs
            for job in fresh:
                job.started = True
        live = [s for s in slots if s.job.outcome is None]
        groups: dict[str, list[Slot]] = {}
        for slot in live:
            groups.setdefault(slot.params_key, []).append(slot)
        calls: list[list[Slot]] = []
        for group in groups.values():
            group.sort(key=lambda s: s.length)
            calls.extend(self._chunks(group))
        # Jobs that will not run (cancelled, expired) end now.
        self._complete(_unique(s.job for s in slots if s.job.outcome is not None))
        return calls

    def _chunks(self, group: list[Slot]) -> Iterable[list[Slot]]:
        """Split a length-sorted group into the cheapest calls (pipeq.worker.batching.planning)."""
        ranges = plan_calls(
            [s.length for s in group], max_size=self.policy.max_batch_size,
            overhead=self.policy.call_overhead, token_budget=self.policy.max_batch_tokens,
            # Pipelines whose results change with padding batch equal lengths only.
            equal_only=self.runner.equal_lengths_only,
        )
        for start, end in ranges:
            yield group[start:end]

    def _run(self, runner: PipelineRunner, chunk: list[Slot], attempt: int = 0) -> None:
        params = chunk[0].job.request.params
        items = [s.item for s in chunk]
        started = time.perf_counter()
        failure: Exception | None = None
        # Inputs of jobs that stream send their text to their job's sink as it is generated.
        targets = [TextTarget(s.job.text, s.index) if s.job.text is not None else None
                   for s in chunk]
        try:
            self.hooks.before_call(items)
            if any(targets):
                outputs = runner.run(items, params, text=targets,
                                     on_step=self.hooks.after_stream_step)
            else:
                outputs = runner.run(items, params)
        except Exception as exc:
            failure = exc
        if failure is not None:
            # Handled outside the except block and without its traceback: the failed call's
            # frames hold its tensors (on a GPU, the activations of a batch that did not
            # fit), which must be freed before its halves run.
            failure.__traceback__ = None
            self._isolate(runner, chunk, failure, attempt)
            return
        with self._jobs_lock:
            for slot, output in zip(chunk, outputs, strict=True):
                slot.job.outputs[slot.index] = output
                slot.job.remaining -= 1
        self.hooks.after_call(len(chunk), time.perf_counter() - started,
                              sorted({s.job.job_id for s in chunk}))

    def _isolate(self, runner: PipelineRunner, chunk: list[Slot], exc: Exception,
                 attempt: int = 0) -> None:
        if is_transient(exc):
            self._retry_transient(runner, chunk, exc, attempt)
            return
        oom = is_out_of_memory(exc)
        if oom:
            runner.free_memory()
        if len(chunk) > 1:
            half = len(chunk) // 2
            log.info("batch of %d failed (%s: %s); retrying in halves", len(chunk),
                     type(exc).__name__, exc)
            self._run(runner, chunk[:half])
            self._run(runner, chunk[half:])
            return
        slot = chunk[0]
        if oom:
            message = (f"input #{slot.index} does not fit in device memory even alone "
                       f"({exc}); shorten it or serve the route on a larger device")
            with self._jobs_lock:
                slot.job.fail(JobState.FAILURE, "OutOfMemory", message)
        else:
            log.info("job %s input #%d failed: %s: %s", slot.job.job_id, slot.index,
                     type(exc).__name__, exc)
            with self._jobs_lock:
                slot.job.fail(JobState.FAILURE, type(exc).__name__,
                              f"input #{slot.index}: {exc}")

    def _retry_transient(self, runner: PipelineRunner, chunk: list[Slot], exc: Exception,
                         attempt: int) -> None:
        """Retry a call that failed transiently, with backoff and jitter, then give up."""
        if attempt >= self.policy.max_retries:
            message = (f"{type(exc).__name__}: {exc} (gave up after {attempt + 1} attempts; "
                       "the error is transient, submitting again may succeed)")
            with self._jobs_lock:
                for slot in chunk:
                    slot.job.fail(JobState.FAILURE, type(exc).__name__, message,
                                  retryable=True)
            return
        delay = self.policy.retry_backoff_s * 2 ** attempt * random.uniform(0.5, 1.5)
        log.info("transient %s on a batch of %d (attempt %d/%d); retrying in %.2fs",
                 type(exc).__name__, len(chunk), attempt + 1, self.policy.max_retries + 1, delay)
        time.sleep(delay)
        self._run(runner, chunk, attempt + 1)

    def _complete(self, jobs: list[JobInFlight]) -> None:
        """Give the jobs whose inputs are all done their result, then finish every final one."""
        with self._jobs_lock:
            for job in jobs:
                if job.outcome is None and job.remaining == 0:
                    request = job.request
                    job.succeed(shape_result(self.runner.task, request.inputs, request.single,
                                             request.params, job.outputs))
        self._finish(jobs)

    def _fail_unexpected(self, slots: list[Slot]) -> None:
        jobs = _unique(s.job for s in slots)
        with self._jobs_lock:
            for job in jobs:
                job.fail(JobState.FAILURE, "WorkerError", "the worker failed to run the batch",
                         retryable=True)
        self._finish(jobs)

    def _finish(self, jobs: list[JobInFlight]) -> None:
        """Store the records of the jobs that have an outcome, each job by one thread once;
        their tasks are released even when storing fails (finish_jobs retries Redis)."""
        with self._jobs_lock:
            finished = [j for j in jobs
                        if j.outcome is not None and not j.finishing and not j.done.is_set()]
            for job in finished:
                job.finishing = True
        if not finished:
            return
        try:
            self.sink.finish_jobs(finished)
        except Exception:  # never let a batching thread die; the messages stay unacked
            log.exception("could not finish %d job(s); their messages will be redelivered",
                          len(finished))
        finally:
            for job in finished:
                job.done.set()


def _unique(jobs: Iterable[JobInFlight]) -> list[JobInFlight]:
    seen: dict[int, JobInFlight] = {}
    for job in jobs:
        seen.setdefault(id(job), job)
    return list(seen.values())
