"""The route service: what one worker process does with each job message.

The Celery task (``worker.app``) calls :meth:`RouteService.handle` with the message body;
the service validates it again (messages may come from anywhere), hands the job to the
micro-batcher, waits until the job ends or its deadline passes, and returns a short
summary for Flower's events. Job records are written per batch by the batcher's callbacks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pydantic
import redis

from producer.config import Settings
from producer.contract import JobRequest, JobState, Route
from producer.errors import ValidationError
from producer.params import validate_params
from producer.store import JobStore, Outcome
from producer.validation import validate_inputs

from .batcher import JobInFlight, MicroBatcher

log = logging.getLogger("pipeq.worker")

#: How long a job may wait for its batch beyond its deadline before the task gives up on it.
DEADLINE_GRACE_S = 1.0


class RouteService:
    """Validates, batches and records the jobs of one route in one worker process."""

    def __init__(self, route: Route, settings: Settings, store: JobStore, hostname: str):
        self.route = route
        self.settings = settings
        self.store = store
        self.hostname = hostname
        self.batcher: MicroBatcher | None = None

    def attach(self, batcher: MicroBatcher) -> None:
        """Use ``batcher`` for this route's jobs."""
        self.batcher = batcher

    # called by the Celery task, on a pool thread
    def handle(self, body: Any, task_id: str) -> dict[str, Any]:
        """Run one job message to its end; returns a summary (state and input count)."""
        assert self.batcher is not None, "attach() a batcher before handling jobs"
        try:
            request = self.parse(body, task_id)
        except ValidationError as exc:
            log.info("job %s rejected: %s", task_id, exc)
            reply = body.get("reply_to") if isinstance(body, dict) else None
            self.store.finish([Outcome(task_id, JobState.FAILURE, {
                "type": "ValidationError", "message": str(exc), "retryable": False},
                reply if isinstance(reply, str) else None)])
            return {"state": JobState.FAILURE.value, "error": "ValidationError"}
        job = JobInFlight(request)
        self.batcher.submit(job)
        wait = None if request.deadline is None else request.deadline - time.time()
        if not job.done.wait(None if wait is None else max(wait, 0) + DEADLINE_GRACE_S):
            self._time_out(job)
        outcome = job.outcome
        return {"state": outcome.state.value if outcome else "UNKNOWN",
                "inputs": len(request.inputs)}

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
        validate_inputs(self.route.task, request.inputs, max_chars=self.settings.max_input_chars,
                        max_items=self.settings.max_inputs_per_job)
        params = validate_params(self.route.task, request.params)
        if params != request.params:
            raise ValidationError("call parameters carry null values; omit them instead")
        return request

    def _time_out(self, job: JobInFlight) -> None:
        state, kind = (JobState.FAILURE, "JobTimeout") if job.started else (
            JobState.EXPIRED, "JobExpired")
        message = ("the job ran past its deadline; its result is discarded" if job.started
                   else "the job's deadline passed while it waited for a batch")
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
            state = before.get(job.job_id, JobState.PENDING)
            if state == JobState.CANCELLED:
                # Already recorded: no outcome to store, just let the task return.
                job.outcome = Outcome(job.job_id, JobState.CANCELLED, None)
                job.done.set()
            elif state.is_final:
                job.outcome = Outcome(job.job_id, state, None)  # a re-delivered finished job
                job.done.set()

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
