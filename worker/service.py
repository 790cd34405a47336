"""The route service: what one worker process does with each job message.

The Celery task (``pipeq.worker.broker.app``) calls :meth:`RouteService.handle` with the
message body; the service validates it again (messages may come from anywhere), hands the job to the
micro-batcher, waits until the job ends or its deadline passes, and returns a short
summary for Flower's events. Job records are written per batch by the batcher's callbacks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pydantic
import redis
from celery.exceptions import Reject

from pipeq.core.config import Settings
from pipeq.core.contract import JobRequest, JobState, Route
from pipeq.core.deadletters import DeadLetters
from pipeq.core.envelopes import media_kind
from pipeq.core.params import validate_params
from pipeq.core.store import JobStore, Outcome
from pipeq.core.validation import InputLimits, check_inputs
from pipeq.errors import ValidationError
from pipeq.worker.batching.batcher import JobInFlight, MicroBatcher
from pipeq.worker.model.media import MediaPolicy, MediaResolver

log = logging.getLogger("pipeq.worker")

#: How long a job may wait for its batch beyond its deadline before the task gives up on it.
DEADLINE_GRACE_S = 1.0


class RouteService:
    """Validates, batches and records the jobs of one route in one worker process."""

    def __init__(self, route: Route, settings: Settings, store: JobStore, hostname: str,
                 media: MediaPolicy | None = None):
        self.route = route
        self.settings = settings
        self.store = store
        self.hostname = hostname
        self.batcher: MicroBatcher | None = None
        #: The route's run-time limit (RouteSpec.timeout_s), enforced per job.
        self.run_timeout_s: float | None = None
        self.dead_letters = DeadLetters(store.client, settings.keys)
        payload_limit = (media.max_payload_bytes if media is not None
                         else settings.max_payload_bytes)
        self.limits = InputLimits(settings.max_input_chars, settings.max_inputs_per_job,
                                  payload_limit)
        # Image and audio routes decode media envelopes before batching (pipeq.worker.model.media).
        self.media: MediaResolver | None = None
        if media_kind(route.task) is not None:
            policy = media or MediaPolicy(max_payload_bytes=settings.max_payload_bytes)
            self.media = MediaResolver(store.client, settings.keys, policy)

    def attach(self, batcher: MicroBatcher) -> None:
        """Use ``batcher`` for this route's jobs."""
        self.batcher = batcher

    # called by the Celery task, on a pool thread
    def handle(self, body: Any, task_id: str) -> dict[str, Any]:
        """Run one job message to its end; returns a summary (state and input count)."""
        assert self.batcher is not None, "attach() a batcher before handling jobs"
        try:
            request = self.parse(body, task_id)
            items = self._resolve_media(request)
        except ValidationError as exc:
            self.reject(task_id, str(exc), body)
            return {"state": JobState.FAILURE.value, "error": "ValidationError"}
        job = JobInFlight(request, items=items)
        self.batcher.submit(job)
        self._wait(job)
        if job.returned:  # the worker is stopping: give the message back to the queue
            raise Reject("worker shutting down before the job started", requeue=True)
        self._release_media(request)
        outcome = job.outcome
        return {"state": outcome.state.value if outcome else "UNKNOWN",
                "inputs": len(request.inputs)}

    def reject(self, job_id: str, reason: str, body: Any) -> None:
        """Fail a job whose message cannot be run here, with the reason (a ValidationError)."""
        log.info("job %s rejected: %s", job_id, reason)
        reply = body.get("reply_to") if isinstance(body, dict) else None
        self.store.finish([Outcome(job_id, JobState.FAILURE, {
            "type": "ValidationError", "message": reason, "retryable": False},
            reply if isinstance(reply, str) else None)])

    # called by Celery's consumer thread (task_unknown signal)
    def reject_unknown_task(self, job_id: str, task_name: str, body: Any) -> None:
        """Fail a job whose message names a task (a route) this worker does not serve.

        Celery discards such a message; without a record its caller would wait forever.
        """
        served = self.settings.keys.task_name(self.route)
        self.reject(job_id, f"no route {task_name!r} on this queue: its worker serves "
                    f"{self.route.describe()} as {served!r}", body)

    def parse(self, body: Any, task_id: str) -> JobRequest:
        """Validate a message body as this route's JobRequest (ValidationError if not)."""
        try:
            request = JobRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}"
                for e in exc.errors()[:5]
            )
            raise ValidationError(f"malformed job message: {problems}") from None
        if request.job_id != task_id:
            raise ValidationError(f"message job_id {request.job_id} != task id {task_id}")
        if request.route != self.route:
            raise ValidationError(
                f"job for route {request.route.describe()} reached a worker of "
                f"{self.route.describe()}"
            )
        check_inputs(self.route.task, request.inputs, self.limits)
        params = validate_params(self.route.task, request.params)
        if params != request.params:
            raise ValidationError("call parameters carry null values; omit them instead")
        return request

    def _resolve_media(self, request: JobRequest) -> list[Any]:
        """Decoded media inputs ([] for routes without media); ValidationError if bad."""
        if self.media is None:
            return []
        if request.deadline is not None and request.deadline < time.time():
            return []  # the batcher expires the job unrun: its payloads may be gone already
        media = self.media
        try:
            items: list[Any] = self._with_retry(lambda: media.resolve(request))
        except ValidationError:
            self._release_media(request)
            raise
        return items

    def _release_media(self, request: JobRequest) -> None:
        """Delete the job's claim-checked payloads now that it has ended."""
        if self.media is not None:
            media = self.media
            self._with_retry(lambda: media.release(request))

    def _wait(self, job: JobInFlight) -> None:
        """Wait for the job, enforcing its deadline and the route's run-time limit.

        Enforced here rather than by Celery: time limits work only on prefork pools, and
        pipeq runs a threads pool. A job past its limit fails; the batch it is in finishes,
        but its result is discarded (the first final record wins).
        """
        deadline = job.request.deadline
        while not job.done.wait(0.25):
            now = time.time()
            over_deadline = deadline is not None and now > deadline + DEADLINE_GRACE_S
            over_run = (self.run_timeout_s is not None and job.started_at
                        and now - job.started_at > self.run_timeout_s)
            if over_deadline or over_run:
                self._time_out(job, over_run=bool(over_run))
                return

    def _time_out(self, job: JobInFlight, over_run: bool = False) -> None:
        state, kind = (JobState.FAILURE, "JobTimeout") if job.started else (
            JobState.EXPIRED, "JobExpired")
        message = ("the job ran past its deadline; its result is discarded" if job.started
                   else "the job's deadline passed while it waited for a batch")
        if over_run:
            message = (f"the job ran longer than its route's limit of {self.run_timeout_s:g}s "
                       "(timeout_s in the routing table); its result is discarded")
        job.fail(state, kind, message)
        self._store([job])

    # called by the batcher, on its thread, once per batch
    def start_jobs(self, jobs: list[JobInFlight]) -> None:
        """Mark a batch's new jobs STARTED; fail those cancelled or past their deadline."""
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
        before = self._with_retry(
            lambda: self.store.start([j.job_id for j in runnable], self.hostname)
        )
        for job in runnable:
            state, starts = before.get(job.job_id, (JobState.PENDING, 1))
            if state == JobState.CANCELLED:
                # Already recorded: no outcome to store, just let the task return.
                job.outcome = Outcome(job.job_id, JobState.CANCELLED, None)
                job.done.set()
            elif state.is_final:
                job.outcome = Outcome(job.job_id, state, None)  # a re-delivered finished job
                job.done.set()
            elif starts > self.settings.max_deliveries:
                self._poison(job, starts)
            else:
                job.started_at = now

    def _poison(self, job: JobInFlight, starts: int) -> None:
        reason = (f"started {starts - 1} times without finishing (each time its worker died); "
                  f"over the limit of {self.settings.max_deliveries} (PIPEQ_MAX_DELIVERIES)")
        log.warning("job %s is a poison message: %s", job.job_id, reason)
        job.fail(JobState.FAILURE, "PoisonMessage",
                 reason + "; kept in the dead-letter list (`pipeq dead`)")
        self._with_retry(lambda: self.dead_letters.add(
            reason, queue=self.settings.keys.queue(self.route), job_id=job.job_id,
            request=job.request.model_dump(mode="json")))

    def finish_jobs(self, jobs: list[JobInFlight]) -> None:
        """Store the final records of a batch's finished jobs in one round trip."""
        self._store(jobs)

    def _store(self, jobs: list[JobInFlight]) -> None:
        outcomes = [j.outcome for j in jobs if j.outcome is not None and not j.done.is_set()]
        if outcomes:
            self._with_retry(lambda: self.store.finish(outcomes))

    def _with_retry(self, action: Any, attempts: int = 8) -> Any:
        delay = 0.1
        for attempt in range(attempts):
            try:
                return action()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if attempt == attempts - 1:
                    raise
                log.warning("Redis unavailable while storing job records (%s); retrying", exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None
