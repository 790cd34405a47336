"""The route service: what one worker process does with each job of its route.

A job's way: :meth:`RouteService.accept` checks the message (messages may come from anywhere)
and hands the job to the batcher (image and audio jobs first have their media resolved on a
small thread pool); the batcher calls :meth:`start_jobs` when the job enters its first batch
and :meth:`finish_jobs` when it has its outcome. Finishing stores the records of a whole
batch in one round trip, *then* settles the messages (acknowledges them, through whoever
delivered them). No step can leave a job without a final record: a message that cannot be
read is recorded as a FAILURE of its job, a job past its deadline or its route's run-time
limit is ended by the deadline watch, and a Redis that fails (down, full) is retried until it
answers, never skipped.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pydantic

from pipeq.core.config import Settings
from pipeq.core.contract import JobRequest, JobState, Route
from pipeq.core.deadletters import DeadLetters
from pipeq.core.envelopes import media_kind
from pipeq.core.params import validate_params
from pipeq.core.store import JobStore, Outcome
from pipeq.core.validation import InputLimits, check_inputs
from pipeq.errors import ValidationError
from pipeq.worker.batching.jobs import Batcher, Delivery, Ended, Failure, JobInFlight
from pipeq.worker.batching.textsinks import TextStreams
from pipeq.worker.hooks import Middleware
from pipeq.worker.model.media import BudgetClosed, MediaPolicy, MediaResolver
from pipeq.worker.redis_guard import RedisGuard

log = logging.getLogger("pipeq.worker")

#: How long a job may wait for its batch beyond its deadline before it is ended.
DEADLINE_GRACE_S = 1.0
#: How often the deadline watch looks at the jobs in flight.
WATCH_INTERVAL_S = 0.25

#: Runs a closure that settles messages where the deliverer wants it (Celery: on its loop).
SettleRunner = Callable[[Callable[[], None]], None]


class RouteService:
    """Checks, batches, records and settles the jobs of one route in one worker process."""

    def __init__(self, route: Route, settings: Settings, store: JobStore, hostname: str, *,
                 media: MediaPolicy | None = None, hooks: Middleware | None = None,
                 run_timeout_s: float | None = None, guard: RedisGuard | None = None):
        self.route = route
        self.settings = settings
        self.store = store
        self.hostname = hostname
        self.hooks = hooks or Middleware()
        #: The route's run-time limit (RouteSpec.timeout_s), enforced per job.
        self.run_timeout_s = run_timeout_s
        self.guard = guard or RedisGuard()
        self.batcher: Batcher | None = None
        self.dead_letters = DeadLetters(store.client, settings.keys)
        #: The Redis Streams of the jobs that stream their generated text.
        self.streams = TextStreams(store.client, settings.keys, settings.result_ttl_s,
                                   settings.stream_maxlen, self.guard)
        #: Where stored final states are counted, atomically with the records (exporter).
        self.stats_key = settings.keys.route_stats(route)
        policy = media or MediaPolicy(max_payload_bytes=settings.max_payload_bytes)
        self.limits = InputLimits(settings.max_input_chars, settings.max_inputs_per_job,
                                  policy.max_payload_bytes)
        # Image and audio routes decode media off the deliverer's thread (worker.model.media).
        self.media: MediaResolver | None = None
        self._media_pool: ThreadPoolExecutor | None = None
        if media_kind(route.task) is not None:
            self.media = MediaResolver(store.client, settings.keys, policy)
            self._media_pool = ThreadPoolExecutor(4, thread_name_prefix="pipeq-media")
        self._reply = re.compile(re.escape(settings.keys.reply("")) + r"[0-9a-f]{32}")
        self._settle_runner: SettleRunner = lambda closure: closure()
        #: Jobs accepted and not yet settled, by id.
        self._in_flight: dict[str, JobInFlight] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._watch = threading.Thread(target=self._watch_deadlines, name="pipeq-deadlines",
                                       daemon=True)

    # --- wiring and lifecycle ---------------------------------------------------------------

    def attach(self, batcher: Batcher) -> None:
        """Use ``batcher`` for this route's jobs."""
        self.batcher = batcher

    def settle_with(self, runner: SettleRunner) -> None:
        """Run the closures that settle messages with ``runner`` (default: at once)."""
        self._settle_runner = runner

    def start(self) -> None:
        """Start the batcher and the deadline watch."""
        assert self.batcher is not None, "attach() a batcher before starting"
        self.batcher.start()
        self._watch.start()

    def begin_shutdown(self) -> None:
        """Start no more jobs: the calls in hand finish, unstarted jobs are handed back."""
        self.hooks.before_shutdown()
        if self.batcher is not None:
            self.batcher.begin_shutdown()
        if self.media is not None:  # jobs waiting for room to decode their images go back
            self.media.budget.close()

    def drain(self, timeout: float) -> bool:
        """Wait until every accepted job has left the worker; False if ``timeout`` passed.

        After the timeout, Redis calls stop retrying: messages whose jobs could not be
        recorded stay unacknowledged, and the visibility timeout redelivers them.
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("%d job(s) still in flight after %.0fs; their messages go back "
                                "to the queue", len(self._in_flight), timeout)
                    self.guard.give_up()
                    return False
                self._idle.wait(min(remaining, 0.5))
        return True

    def stop(self) -> None:
        """Stop the deadline watch, the media pool and the batcher threads."""
        self._stopping.set()
        if self.media is not None:
            self.media.budget.close()
        if self._media_pool is not None:
            self._media_pool.shutdown(wait=False, cancel_futures=True)
        if self.batcher is not None:
            self.batcher.stop()

    def healthy(self) -> bool:
        """True while the worker can do its work: batcher threads alive, Redis answering."""
        alive = self.batcher is not None and self.batcher.alive
        return alive and not self._stopping.is_set() and self.guard.healthy()

    def held_delivery_tags(self) -> list[str]:
        """Delivery tags of the messages this worker holds (their leases are renewed)."""
        with self._lock:
            jobs = list(self._in_flight.values())
        return sorted({j.delivery.delivery_tag for j in jobs
                       if j.delivery is not None and j.delivery.delivery_tag})

    def in_flight(self) -> int:
        """How many accepted jobs have not left the worker yet."""
        with self._lock:
            return len(self._in_flight)

    # --- accepting messages (the deliverer's thread) ----------------------------------------

    def accept(self, body: Any, job_id: str, delivery: Delivery,
               claim_start: tuple[JobState, int] | None = None) -> None:
        """Take one job message: check it, then batch it (or record why it cannot run).

        ``claim_start``: how the claim that took the message started the job (state before,
        starts), when it did.
        """
        try:
            request = self.parse(body, job_id)
        except ValidationError as exc:
            self.reject(job_id, str(exc), body, delivery)
            return
        job = JobInFlight(request, delivery=delivery, reply_key=self.reply_key(request.reply_to),
                          claim_start=claim_start)
        with self._lock:
            self._in_flight[job.job_id] = job
        self.hooks.after_accept(job)
        if self._media_pool is not None:
            self._media_pool.submit(self._resolve_media, job)
        else:
            self._batch(job)

    def parse(self, body: Any, job_id: str) -> JobRequest:
        """Validate a message body as this route's JobRequest (ValidationError if not)."""
        try:
            request = JobRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'message'}: "
                f"{str(e['msg']).removeprefix('Value error, ')}"
                for e in exc.errors()[:5])
            raise ValidationError(f"malformed job message: {problems}") from None
        if request.job_id != job_id:
            raise ValidationError(f"message job_id {request.job_id} != task id {job_id}")
        if request.route != self.route:
            raise ValidationError(f"job for route {request.route.describe()} reached a worker "
                                  f"of {self.route.describe()}")
        if request.stream and self.route.task != "text-generation":
            raise ValidationError(f"stream=True is for text-generation routes; route "
                                  f"{self.route.describe()} cannot stream")
        check_inputs(self.route.task, request.inputs, self.limits)
        if validate_params(self.route.task, request.params) != request.params:
            raise ValidationError("call parameters carry null values; omit them instead")
        return request

    def reply_key(self, reply_to: Any) -> str | None:
        """``reply_to`` when it names one of this deployment's reply lists, else None: a
        forged field must never make the worker write to another key."""
        if isinstance(reply_to, str) and self._reply.fullmatch(reply_to):
            return reply_to
        if reply_to is not None:
            log.warning("ignoring reply_to %.80r: not a reply list of this deployment", reply_to)
        return None

    def reject(self, job_id: str, reason: str, body: Any, delivery: Delivery | None) -> None:
        """Record a FAILURE for a message that cannot run here (a ValidationError), then
        settle the message."""
        log.info("job %s rejected: %s", job_id, reason)
        reply = self.reply_key(body.get("reply_to") if isinstance(body, dict) else None)
        outcome = Outcome(job_id, JobState.FAILURE, {
            "type": "ValidationError", "message": reason, "retryable": False}, reply)
        stored = self.guard.call(lambda: self.store.finish([outcome], self.stats_key),
                                 "store a job record")
        self.hooks.after_outcomes([outcome], stored)
        self._settle([Ended(job_id, delivery, outcome, time.time())])

    def _resolve_media(self, job: JobInFlight) -> None:
        media = self.media
        assert media is not None
        deadline = job.request.deadline
        if deadline is None or deadline >= time.time():  # (expired: its payloads may be gone)
            try:
                job.items = self.guard.call(lambda: media.resolve(job.request),
                                            "read media payloads")
            except ValidationError as exc:
                self._end_now(job, JobState.FAILURE, "ValidationError", str(exc))
                return
            except BudgetClosed:  # the worker stops: unstarted, its message goes back
                job.returned = True
                self.return_jobs([job])
                return
            except Exception as exc:  # a job never leaves without a record
                log.exception("job %s: media could not be resolved", job.job_id)
                self._end_now(job, JobState.FAILURE, type(exc).__name__,
                              f"the worker could not read the job's media: {exc}")
                return
        self._batch(job)

    def _batch(self, job: JobInFlight) -> None:
        assert self.batcher is not None, "attach() a batcher before accepting jobs"
        self.batcher.submit(job)

    def _end_now(self, job: JobInFlight, state: JobState, kind: str, message: str) -> None:
        assert self.batcher is not None
        self.batcher.end_early([(job, state, kind, message)])

    # --- the batcher's callbacks (batcher threads) ------------------------------------------

    def start_jobs(self, jobs: list[JobInFlight]) -> None:
        """Mark a batch's new jobs STARTED (unless their claim did); end those cancelled,
        expired or poisonous."""
        now = time.time()
        runnable = []
        for job in jobs:
            deadline = job.request.deadline
            if deadline is not None and deadline < now:
                job.fail(JobState.EXPIRED, "JobExpired",
                         f"the job's deadline passed {now - deadline:.1f}s before a worker "
                         "could run it")
            else:
                runnable.append(job)
        before = {j.job_id: j.claim_start for j in runnable if j.claim_start is not None}
        unstarted = [j.job_id for j in runnable if j.claim_start is None]
        if unstarted:
            before.update(self.guard.call(lambda: self.store.start(unstarted, self.hostname),
                                          "mark jobs started"))
        for job in runnable:
            state, starts = before.get(job.job_id, (JobState.PENDING, 1))
            if state.is_final:  # cancelled while queued, or a re-delivered finished job
                job.outcome = Outcome(job.job_id, state, None, job.reply_key)
                job.announce = state == JobState.CANCELLED
            elif starts > self.settings.max_deliveries:
                self._poison(job, starts)
            else:
                job.started_at = now
                self.streams.open(job, starts)
        self.hooks.after_jobs_started(jobs)

    def _poison(self, job: JobInFlight, starts: int) -> None:
        reason = (f"started {starts - 1} times without finishing (each time its worker died); "
                  f"over the limit of {self.settings.max_deliveries} (PIPEQ_MAX_DELIVERIES)")
        log.warning("job %s is a poison message: %s", job.job_id, reason)
        job.fail(JobState.FAILURE, "PoisonMessage",
                 reason + "; kept in the dead-letter list (`pipeq dead`)")
        self.guard.call(lambda: self.dead_letters.add(
            reason, queue=self.settings.keys.queue(self.route), job_id=job.job_id,
            request=job.request.model_dump(mode="json")), "keep a dead letter")

    def finish_jobs(self, jobs: list[JobInFlight]) -> None:
        """Store the final records of jobs in one round trip, then settle their messages."""
        outcomes = [j.outcome for j in jobs if j.outcome is not None]
        stored = self.guard.call(lambda: self.store.finish(outcomes, self.stats_key),
                                 "store job records")
        self.streams.close(jobs)
        self.hooks.after_outcomes(outcomes, stored)
        if self.media is not None:
            try:  # (the payloads expire with the job's deadline anyway)
                for job in jobs:
                    self.media.release(job.request)
            except Exception as exc:
                log.warning("could not delete the media payloads of %d job(s): %s", len(jobs),
                            exc)
        self._settle([j.ended() for j in jobs])

    def return_jobs(self, jobs: list[JobInFlight]) -> None:
        """Hand the messages of jobs that were not started back to the queue (undoing the
        starts their claims recorded: they did not run here)."""
        for job in jobs:
            log.info("job %s handed back to the queue: the worker stops before it started",
                     job.job_id)
        claimed = {j.job_id: j.claim_start[0] for j in jobs
                   if j.claim_start is not None and not j.claim_start[0].is_final}
        if claimed:
            self.guard.call(lambda: self.store.unstart(claimed, self.hostname),
                            "undo the starts of jobs handed back")
        self._settle([j.ended() for j in jobs])

    def _settle(self, ended: list[Ended]) -> None:
        def settle() -> None:
            for item in ended:
                if item.delivery is None:
                    continue
                try:
                    if item.requeued:
                        item.delivery.requeue()
                    else:
                        item.delivery.ack()
                except Exception:  # the message stays unacked: redelivered, never run twice
                    log.exception("could not settle the message of job %s", item.job_id)
            self.hooks.after_settled(ended)

        try:
            self._settle_runner(settle)
        finally:
            with self._idle:
                for item in ended:
                    self._in_flight.pop(item.job_id, None)
                self._idle.notify_all()
            if self.media is not None:  # its decoded images are no longer held
                for item in ended:
                    self.media.budget.free(item.job_id)

    # --- deadlines and run-time limits --------------------------------------------------------

    def _watch_deadlines(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            overdue = self._overdue(time.time())
            if overdue and self.batcher is not None:
                self.batcher.end_early(overdue)

    def _overdue(self, now: float) -> list[Failure]:
        """Jobs past their deadline (plus grace) or their route's run-time limit, with why."""
        with self._lock:
            jobs = [j for j in self._in_flight.values() if j.outcome is None]
        overdue: list[Failure] = []
        for job in jobs:
            deadline = job.request.deadline
            over_deadline = deadline is not None and now > deadline + DEADLINE_GRACE_S
            over_run = (self.run_timeout_s is not None and job.started_at > 0
                        and now - job.started_at > self.run_timeout_s)
            if over_run:
                overdue.append((job, JobState.FAILURE, "JobTimeout",
                                f"the job ran longer than its route's limit of "
                                f"{self.run_timeout_s:g}s (timeout_s in the routing table); its "
                                "result is discarded"))
            elif over_deadline and job.started_at > 0:
                overdue.append((job, JobState.FAILURE, "JobTimeout",
                                "the job ran past its deadline; its result is discarded"))
            elif over_deadline:
                overdue.append((job, JobState.EXPIRED, "JobExpired",
                                "the job's deadline passed while it waited for a batch"))
        return overdue
