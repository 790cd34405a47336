"""What Flower and ``celery inspect`` see of pipeq jobs, kept true.

pipeq jobs do not run as Celery requests on a pool, so Celery would know nothing of them.
:class:`CeleryBridge` (a middleware) tells it:

- the jobs a worker holds appear in ``celery inspect reserved`` and, once their batch starts,
  ``active`` (and in the worker's heartbeat counts and ``inspect stats`` totals);
- each job sends ONE task event when it leaves the worker, carrying everything Flower shows
  (name, arguments summary, received and started times): ``task-succeeded`` for SUCCESS,
  ``task-failed`` for FAILURE, EXPIRED and timed-out jobs (the exception is the pipeq error
  type and message), ``task-revoked`` for CANCELLED ones.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery.worker import state

from pipeq.core.contract import JobState
from pipeq.worker.batching.jobs import Ended, JobInFlight
from pipeq.worker.hooks import Middleware


class JobView:
    """A job as ``celery inspect active/reserved`` lists it (Celery's ``Request.info``)."""

    # __weakref__: Celery keeps its reserved and active requests in weak sets. eventer:
    # Celery hands every reserved request the new event dispatcher when it reconnects to the
    # broker (pipeq sends events through the consumer's, so it is only kept).
    __slots__ = ("__weakref__", "delivery_info", "eventer", "hostname", "id", "kwargs", "name",
                 "time_start")

    def __init__(self, job: JobInFlight, name: str, hostname: str):
        self.id = job.job_id
        self.name = name
        self.hostname = hostname
        self.kwargs = job.delivery.summary if job.delivery is not None else ""
        self.delivery_info = {"routing_key": job.request.route.id, "priority": 0,
                              "redelivered": None}
        self.time_start: float | None = None
        self.eventer: Any = None

    def info(self, safe: bool = False) -> dict[str, Any]:
        """The fields ``celery inspect`` prints for a task."""
        return {"id": self.id, "name": self.name, "args": "()", "kwargs": self.kwargs,
                "type": self.name, "hostname": self.hostname, "time_start": self.time_start,
                "acknowledged": False, "delivery_info": self.delivery_info,
                "worker_pid": os.getpid()}


class CeleryBridge(Middleware):
    """Reports a route's jobs to Celery's worker state and as task events."""

    def __init__(self, task_name: str, hostname: str):
        self.task_name = task_name
        self.hostname = hostname
        #: Celery's consumer (bound when it starts): its event dispatcher sends the events.
        self.consumer: Any = None
        self._views: dict[str, JobView] = {}

    def bind(self, consumer: Any) -> None:
        """Send events through ``consumer``'s dispatcher."""
        self.consumer = consumer

    def after_accept(self, job: JobInFlight) -> None:
        view = self._views[job.job_id] = JobView(job, self.task_name, self.hostname)
        state.task_reserved(view)

    def after_jobs_started(self, jobs: list[JobInFlight]) -> None:
        now = time.time()
        for job in jobs:
            view = self._views.get(job.job_id)
            if view is not None and job.outcome is None:
                view.time_start = now
                state.task_accepted(view)

    def after_settled(self, jobs: list[Ended]) -> None:
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        for job in jobs:
            view = self._views.pop(job.job_id, None)
            outcome = job.outcome
            if view is not None:
                successful = outcome is not None and outcome.state == JobState.SUCCESS
                state.task_ready(view, successful=successful)
            if outcome is None or not job.announce or dispatcher is None:
                continue
            event, fields = task_event(job, self.task_name)
            dispatcher.send(event, **fields)


def task_event(job: Ended, task_name: str) -> tuple[str, dict[str, Any]]:
    """The Celery event type and fields that announce how ``job`` ended."""
    outcome = job.outcome
    assert outcome is not None
    summary = job.delivery.summary if job.delivery is not None else ""
    fields: dict[str, Any] = {
        "uuid": job.job_id, "name": task_name, "args": "()", "kwargs": summary,
        "root_id": job.job_id, "parent_id": None, "retries": 0,
        "received": job.received_at, "pipeq_state": outcome.state.value,
    }
    if job.started_at:
        fields["started"] = job.started_at
    if outcome.state == JobState.SUCCESS:
        runtime = time.time() - job.started_at if job.started_at else 0.0
        return "task-succeeded", {**fields, "result": "SUCCESS", "runtime": runtime}
    if outcome.state == JobState.CANCELLED:
        return "task-revoked", {**fields, "terminated": False, "signum": None,
                                "expired": False}
    error = outcome.payload if isinstance(outcome.payload, dict) else {}
    kind, message = str(error.get("type", outcome.state.value)), str(error.get("message", ""))
    return "task-failed", {**fields, "exception": f"{kind}({message!r})", "traceback": ""}
