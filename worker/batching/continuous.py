"""Continuous batching of a text-generation route's jobs (``batching = "continuous"``).

Each prompt of a job becomes one request of the route's :class:`ContinuousEngine`: it joins
the running batch at the next decoding step and leaves it when it ends, and the job ends
when all its requests have. One driver thread admits jobs (marks them STARTED through the
``JobSink``, in groups: one Redis round trip), adds their requests, reads the engine's
outputs, feeds streams, and finishes the jobs whose requests are all done (records stored,
then messages settled), exactly as the static :class:`MicroBatcher` does. Jobs whose call
the engine cannot honour (sampling, beams, num_return_sequences, other parameters, chat or
empty inputs) go to the static batcher on the same model, and say so in the log.

Streaming (``batching.textstreams``): ``streams.open(job, index, plan)`` may give a stream
for a prompt; the batcher pushes each decoding step's new tokens into it, flushes once per
step, finishes it when the request ends and closes the job's streams when the job ends,
before its record is stored. Workers use ``JobTextStreams``: the jobs' Redis text sinks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeq.core.contract import JobState
from pipeq.worker.batching.batcher import MicroBatcher
from pipeq.worker.batching.jobs import Failure, JobInFlight, JobSink, hand_back_unstarted
from pipeq.worker.batching.textstreams import RequestStream, Streams
from pipeq.worker.hooks import Middleware
from pipeq.worker.model.generation import ContinuousEngine, GenerationPlan, continuous_plan
from pipeq.worker.model.runner import PipelineRunner, shape_result

log = logging.getLogger("pipeq.batcher")

#: How long the driver waits for outputs while requests run (a new job waits at most this).
POLL_S = 0.005
#: How long it waits for new jobs while nothing runs.
IDLE_S = 0.1


@dataclass(eq=False, slots=True)
class _Request:
    """One prompt of a job, running in the engine."""

    job: JobInFlight
    index: int
    prompt: str
    plan: GenerationPlan
    stream: RequestStream | None
    #: How many of its tokens went into its stream.
    pushed: int = 0


@dataclass(eq=False, slots=True)
class _Running:
    """A job whose requests run in the engine."""

    job: JobInFlight
    request_ids: list[str]
    started: float


class ExclusiveRunner(PipelineRunner):
    """A static-path runner whose calls pause the continuous loop (``engine.exclusive``):
    two threads' forward passes on one model must not overlap."""

    def __init__(self, runner: PipelineRunner, engine: ContinuousEngine):
        super().__init__(runner.pipe)
        self.inner = runner
        self.engine = engine

    def run(self, items: list[Any], params: dict[str, Any], **streaming: Any) -> list[Any]:
        """The inner runner's outputs (and streamed text), computed while the loop waits."""
        with self.engine.exclusive():
            return self.inner.run(items, params, **streaming)

    def free_memory(self) -> None:
        """As the inner runner does."""
        self.inner.free_memory()


class ContinuousBatcher:
    """Runs a route's greedy generation jobs continuously, the rest on ``fallback``."""

    def __init__(self, engine: ContinuousEngine, fallback: MicroBatcher, sink: JobSink,
                 hooks: Middleware | None = None, streams: Streams | None = None):
        self.engine = engine
        self.fallback = fallback
        self.sink = sink
        self.hooks = hooks or Middleware()
        self.streams = streams
        self.task = fallback.runner.task
        self._intake: queue.Queue[tuple[JobInFlight, GenerationPlan]] = queue.Queue()
        self._requests: dict[str, _Request] = {}
        self._running: dict[str, _Running] = {}
        #: Ids of jobs in the intake, not yet admitted.
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._returning = threading.Event()
        self._stopping = threading.Event()
        #: Set when stop() gave up waiting: what still runs is left unrecorded (redelivered).
        self._halted = threading.Event()
        self._driver = threading.Thread(target=self._drive, name="pipeq-continuous",
                                        daemon=True)

    # --- the batcher interface (see MicroBatcher) ---------------------------------------------

    def start(self) -> None:
        """Start the driver thread and the static batcher's threads."""
        self.fallback.start()
        self._driver.start()

    def begin_shutdown(self) -> None:
        """Start no more jobs: running requests finish, unstarted jobs are handed back."""
        self._returning.set()
        self.fallback.begin_shutdown()

    @property
    def alive(self) -> bool:
        """True while the driver, the generation loop and the static batcher run."""
        return self._driver.is_alive() and self.engine.running and self.fallback.alive

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the driver (after the requests in hand), the engine and the static batcher."""
        self._stopping.set()
        self._driver.join(timeout)
        # Jobs still running stay unrecorded and unacknowledged, so they are redelivered:
        # the loop's stop fails its requests, which must not become FAILURE records.
        self._halted.set()
        self._driver.join(1.0)
        self.engine.stop()
        self.fallback.stop(timeout)

    def submit(self, job: JobInFlight) -> None:
        """Run ``job`` continuously when the engine honours its call, else statically."""
        plan = continuous_plan(self.engine.pipe, job.request.params)
        if isinstance(plan, GenerationPlan) and not all(
                isinstance(item, str) and item for item in job.items):
            plan = "only non-empty text prompts run continuously (chats and '' do not)"
        if isinstance(plan, str):
            log.info("job %s runs on the static path: %s", job.job_id, plan)
            self.fallback.submit(job)
            return
        with self._lock:
            self._queued.add(job.job_id)
        self._intake.put((job, plan))

    def end_early(self, failures: list[Failure]) -> None:
        """End jobs before their requests are done (deadline, run-time limit): their
        requests leave the running batch, their records are stored now."""
        mine, static = [], []
        with self._lock:
            for failure in failures:
                job = failure[0]
                if job.job_id in self._running or job.job_id in self._queued:
                    job.fail(*failure[1:])
                    mine.append(job)
                else:
                    static.append(failure)
            for job in mine:
                self._cancel_requests(job)
        if static:
            self.fallback.end_early(static)
        self._finish(mine)

    # --- the driver thread --------------------------------------------------------------------

    def _drive(self) -> None:
        while not self._halted.is_set():
            busy = bool(self._running)
            if self._stopping.is_set() and not busy and self._intake.empty():
                return
            try:
                self._admit(self._take_intake(block=not busy))
                if busy:
                    self._deliver(self.engine.outputs(POLL_S))
                self._revive()
            except Exception:  # never let the driver die: fail the jobs in hand instead
                log.exception("continuous batching failed unexpectedly")
                self._fail_running("WorkerError", "the worker failed to run the job")

    def _take_intake(self, block: bool) -> list[tuple[JobInFlight, GenerationPlan]]:
        taken = []
        try:
            taken.append(self._intake.get(timeout=IDLE_S) if block else self._intake.get_nowait())
            while True:
                taken.append(self._intake.get_nowait())
        except queue.Empty:
            return taken

    def _admit(self, entries: list[tuple[JobInFlight, GenerationPlan]]) -> None:
        """Start new jobs (one Redis round trip) and add their prompts to the running batch."""
        with self._lock:
            for job, _ in entries:
                self._queued.discard(job.job_id)
        entries = [(job, plan) for job, plan in entries if job.outcome is None]  # not ended early
        if not entries:
            return
        if self._returning.is_set():  # shutting down
            hand_back_unstarted([job for job, _ in entries], self.sink)
            entries = [(job, plan) for job, plan in entries if not job.returned]
            if not entries:
                return
        jobs = [job for job, _ in entries]
        self.sink.start_jobs(jobs)  # marks STARTED; fails cancelled/expired/poison jobs
        ended = []
        for job, plan in entries:
            job.started = True
            if job.outcome is None:
                self._add(job, plan)
            if job.outcome is not None:
                ended.append(job)
        self._finish(ended)

    def _add(self, job: JobInFlight, plan: GenerationPlan) -> None:
        try:
            prompts = [self.engine.encode(prompt) for prompt in job.items]
            longest = self.engine.max_sequence
            if longest and max(map(len, prompts)) + plan.max_new_tokens > longest:
                log.info("job %s runs on the static path: prompt + max_new_tokens over the "
                         "%d tokens a continuous request may have here", job.job_id, longest)
                self.fallback.submit(job)  # (started already: it just runs there)
                return
            self.hooks.before_call(job.items)  # (fault injection raises here on purpose)
            running = _Running(job, [], time.perf_counter())
            with self._lock:
                self._running[job.job_id] = running
            for index, (prompt, ids) in enumerate(zip(job.items, prompts, strict=True)):
                request_id = f"{job.job_id}#{index}"
                stream = self.streams.open(job, index, plan) if self.streams else None
                with self._lock:
                    self._requests[request_id] = _Request(job, index, prompt, plan, stream)
                    running.request_ids.append(request_id)
                self.engine.add(request_id, ids, plan.max_new_tokens)
        except Exception as exc:
            log.info("job %s could not join the running batch: %s: %s", job.job_id,
                     type(exc).__name__, exc)
            with self._lock:
                job.fail(JobState.FAILURE, type(exc).__name__, str(exc))
                self._cancel_requests(job)

    def _deliver(self, outputs: list[Any]) -> None:
        """Feed streams with the outputs of a step; finish the jobs that are done."""
        done: list[JobInFlight] = []
        streamed: dict[str, JobInFlight] = {}
        if self._halted.is_set():
            return
        for output in outputs:
            with self._lock:
                request = self._requests.get(output.request_id)
                if request is None:  # cancelled, or of a job that ended early
                    continue
                finished = output.is_finished()
                if finished:
                    del self._requests[output.request_id]
            if request.stream is not None:
                streamed[request.job.job_id] = request.job
            if output.error is not None:
                self._fail_request(request, str(output.error))
                done.append(request.job)
            elif self._progress(request, list(output.generated_tokens), finished):
                done.append(request.job)
        if streamed and (streams := self.streams) is not None:
            self._guarded(lambda: streams.flush(list(streamed.values())), "flush")
            self.hooks.after_stream_step()
        self._finish(done)

    def _progress(self, request: _Request, tokens: list[int], finished: bool) -> bool:
        """Stream a request's new text; on its end keep its output. True if its job ended."""
        job = request.job
        stream = request.stream
        if stream is not None and job.outcome is None:
            new, request.pushed = tokens[request.pushed:], len(tokens)
            if new:
                self._guarded(lambda: stream.push(new), "push to")
            if finished:
                self._guarded(stream.finish, "finish")
        if not finished:
            return False
        record = self.engine.record(request.prompt, tokens, request.plan)
        with self._lock:
            if job.outcome is None:
                job.outputs[request.index] = [record]
                job.remaining -= 1
                if job.remaining == 0:
                    job.succeed(shape_result(self.task, job.request.inputs, job.request.single,
                                             job.request.params, job.outputs))
            return job.outcome is not None

    def _fail_request(self, request: _Request, error: str) -> None:
        kind = "OutOfMemory" if "out of memory" in error.lower() else "GenerationError"
        log.info("job %s input #%d failed in the running batch: %s", request.job.job_id,
                 request.index, error)
        with self._lock:
            request.job.fail(JobState.FAILURE, kind, f"input #{request.index}: {error}",
                             retryable=kind != "OutOfMemory")
            self._cancel_requests(request.job)

    def _revive(self) -> None:
        """The generation loop died (its requests were failed): start it again."""
        if self.engine.running or self._stopping.is_set():
            return
        log.error("the continuous batching loop stopped; starting it again")
        self._deliver(self.engine.outputs(0.0))  # the failures of its requests
        self._fail_running("WorkerError", "the continuous batching loop failed", retryable=True)
        self.engine.restart()

    def _fail_running(self, kind: str, message: str, retryable: bool = True) -> None:
        with self._lock:
            jobs = [running.job for running in self._running.values()]
            for job in jobs:
                job.fail(JobState.FAILURE, kind, message, retryable=retryable)
                self._cancel_requests(job)
        self._finish(jobs)

    def _cancel_requests(self, job: JobInFlight) -> None:
        """Take a job's unfinished requests out of the running batch (holding the lock)."""
        running = self._running.get(job.job_id)
        for request_id in running.request_ids if running is not None else []:
            if self._requests.pop(request_id, None) is not None:
                self.engine.cancel(request_id)

    def _finish(self, jobs: list[JobInFlight]) -> None:
        """End streams, store the records and settle the messages: each job once."""
        with self._lock:
            finished = [j for j in jobs
                        if j.outcome is not None and not j.finishing and not j.done.is_set()]
            runs = [self._running.pop(j.job_id, None) for j in finished]
            for job in finished:
                job.finishing = True
        if not finished:
            return
        if self.streams is not None:
            streams = self.streams
            self._guarded(lambda: streams.close(finished), "close")
        for job, running in zip(finished, runs, strict=True):
            if running is not None:
                self.hooks.after_call(len(job.items), time.perf_counter() - running.started,
                                      [job.job_id])
        try:
            self.sink.finish_jobs(finished)
        except Exception:  # never let the driver die; the messages stay unacked
            log.exception("could not finish %d job(s); their messages will be redelivered",
                          len(finished))
        finally:
            for job in finished:
                job.done.set()


    def _guarded(self, action: Callable[[], None], what: str) -> None:
        """Run a stream hook: a stream that fails never fails a job."""
        try:
            action()
        except Exception:
            log.exception("could not %s a text stream", what)
