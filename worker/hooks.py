"""Middleware: the one way to add behaviour around a worker's jobs and calls.

Metrics, log lines, Celery task events and fault injection all hook into the same points of
a job's way through the worker (dramatiq's middleware is the model: ``before_*``/``after_*``
methods on a list of objects). A hook that fails is logged and never fails a job, except
``before_call``, whose exceptions are the call's (fault injection raises there on purpose).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeq.core.store import Outcome
    from pipeq.worker.batching.jobs import Ended, JobInFlight

log = logging.getLogger("pipeq.worker")


class Middleware:
    """Base class: every hook does nothing; override the ones you need."""

    def after_ready(self) -> None:
        """The pipeline is loaded and warm, and the worker consumes its route's queue."""

    def before_shutdown(self) -> None:
        """The worker was told to stop (it finishes the calls in hand first)."""

    def after_claim(self, item: bytes) -> None:
        """A raw message was just taken off the queue, before anything parsed it."""

    def after_accept(self, job: JobInFlight) -> None:
        """A job's message was parsed and the job handed to the batcher."""

    def after_jobs_started(self, jobs: list[JobInFlight]) -> None:
        """Jobs were taken into a batch (those that will not run carry an outcome already)."""

    def before_call(self, items: list[Any]) -> None:
        """A pipeline call on ``items`` is about to run (raising here fails the call)."""

    def after_call(self, size: int, seconds: float, job_ids: list[str]) -> None:
        """A pipeline call of ``size`` inputs took ``seconds``."""

    def after_stream_step(self) -> None:
        """A decoding step of a generation call that streams text ended (its pieces are
        written)."""

    def after_outcomes(self, outcomes: list[Outcome], stored: list[bool]) -> None:
        """Final records were written (``stored``: False where the job was final already)."""

    def after_settled(self, jobs: list[Ended]) -> None:
        """Jobs' messages were acknowledged (or handed back): they left the worker."""

    def heartbeat_fields(self) -> dict[str, Any]:
        """Fields this middleware adds to the worker's heartbeat (``pipeq status``)."""
        return {}


class Hooks(Middleware):
    """A list of middleware called in order; itself a Middleware that fans out."""

    def __init__(self, middleware: Sequence[Middleware] = ()):
        self.middleware = list(middleware)

    def add(self, middleware: Middleware) -> None:
        """Append ``middleware`` (called after the ones already there)."""
        self.middleware.append(middleware)

    def _each(self, name: str, *args: Any) -> None:
        for middleware in self.middleware:
            try:
                getattr(middleware, name)(*args)
            except Exception:  # a hook never fails a job
                log.exception("%s.%s failed", type(middleware).__name__, name)

    def after_ready(self) -> None:
        self._each("after_ready")

    def before_shutdown(self) -> None:
        self._each("before_shutdown")

    def after_claim(self, item: bytes) -> None:
        # Fault injection kills the process here on purpose: nothing to catch.
        for middleware in self.middleware:
            middleware.after_claim(item)

    def after_accept(self, job: JobInFlight) -> None:
        self._each("after_accept", job)

    def after_jobs_started(self, jobs: list[JobInFlight]) -> None:
        self._each("after_jobs_started", jobs)

    def before_call(self, items: list[Any]) -> None:
        for middleware in self.middleware:
            middleware.before_call(items)

    def after_call(self, size: int, seconds: float, job_ids: list[str]) -> None:
        self._each("after_call", size, seconds, job_ids)

    def after_stream_step(self) -> None:
        self._each("after_stream_step")

    def after_outcomes(self, outcomes: list[Outcome], stored: list[bool]) -> None:
        self._each("after_outcomes", outcomes, stored)

    def after_settled(self, jobs: list[Ended]) -> None:
        self._each("after_settled", jobs)

    def heartbeat_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for middleware in self.middleware:
            try:
                fields.update(middleware.heartbeat_fields())
            except Exception as exc:  # a failing probe must not stop the heartbeat
                log.warning("%s.heartbeat_fields failed: %s", type(middleware).__name__, exc)
        return fields
