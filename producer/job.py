"""A handle on a submitted job: its id, status, result or error, and cancel.

A :class:`Job` is cheap (an id and the shared Client): make one for any job id with
``pipeq.get_job`` from any process. Waiting for results goes through the process's one
:class:`~pipeq.waiter.ResultWaiter`, so thousands of jobs can be awaited at once, from
threads or from asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Generator, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import redis

from pipeq.core.contract import JobState, Route
from pipeq.core.store import JobRecord
from pipeq.core.streams import StreamPiece
from pipeq.errors import (
    JobCancelled,
    JobExpired,
    JobFailed,
    JobLost,
    JobNotFound,
    JobTimeout,
    PipeqError,
    StreamNotSupported,
    ValidationError,
)

if TYPE_CHECKING:
    from pipeq.client import Client

log = logging.getLogger("pipeq.job")


class Job:
    """A handle on a submitted job: id, status, result, cancel; awaitable for its result."""

    def __init__(self, client: Client, job_id: str, route: Route | None = None):
        self.client = client
        self.id = job_id
        self.route = route
        #: Set when the job was watched since before its message was sent (``submit``): its
        #: end cannot have been missed, so ``result()`` need not read the record first.
        self.future: Future[JobRecord] | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r}, route={self.route.describe() if self.route else None!r})"

    def status(self) -> str:
        """PENDING, STARTED, SUCCESS, FAILURE, CANCELLED or EXPIRED; JobNotFound if no job
        has this id."""
        (state,) = self.client.call_redis(lambda: self.client.store.states([self.id]))
        if state is None:
            raise self.not_found()
        return state.value

    def not_found(self) -> JobNotFound:
        """The error for an id no job has (any more)."""
        return JobNotFound(
            f"no job {self.id} in this deployment (prefix {self.client.keys.prefix!r}): never "
            "submitted here, or its record expired (records are kept PIPEQ_RESULT_TTL_S "
            f"= {self.client.settings.result_ttl_s}s)")

    def done(self) -> bool:
        """True once the job is in a final state."""
        return JobState(self.status()).is_final

    def result(self, timeout: float | None = None, *, drop: bool | None = None) -> Any:
        """Block until the job ends and return its result (or raise its error).

        Raises JobTimeout if it has not ended within ``timeout`` seconds (default: the
        settings' ``default_timeout_s``); the job itself goes on and can be waited for again.
        ``drop=True`` (default: the ``drop_read_results`` setting) drops the result from
        Redis once read: its memory is freed, its state stays until the record expires.
        """
        wait = wait_seconds(self.client.settings.default_timeout_s, timeout)
        future, unseen = self.watch()
        if unseen:
            record = self.client.call_redis(lambda: self.client.store.get(self.id))
            self._take(record)
        try:
            record = future.result(timeout=wait)
        except FutureTimeout:
            self.client.waiter.forget(self.id)
            (state,) = self.client.call_redis(lambda: self.client.store.states([self.id]))
            shown = state.value if state else "unknown"
            raise JobTimeout(
                f"job {self.id} did not finish within {wait:g}s (status {shown}); wait "
                "again with job.result(timeout=...) or cancel it", job_id=self.id,
                waited_s=wait or 0.0, state=shown) from None
        self._dropped_once_read(drop)
        return outcome(record)

    async def aresult(self, timeout: float | None = None, *, drop: bool | None = None) -> Any:
        """The result, awaited without blocking the event loop (JobNotFound for an unknown
        id, JobTimeout when it has not ended within ``timeout``; ``drop`` as in result())."""
        wait = wait_seconds(self.client.settings.default_timeout_s, timeout)
        future, unseen = self.watch()
        if unseen:
            try:
                record = await self.client.offload(
                    lambda: self.client.call_redis(lambda: self.client.store.get(self.id)))
            except BaseException:
                self.client.waiter.forget(self.id)
                raise
            self._take(record)
        try:
            record = await asyncio.wait_for(asyncio.wrap_future(future), wait)
        except TimeoutError:
            self.client.waiter.forget(self.id)
            raise JobTimeout(f"job {self.id} did not finish within {wait:g}s; wait again "
                             "with job.aresult(timeout=...) or cancel it",
                             job_id=self.id, waited_s=wait or 0.0) from None
        await self.client.offload(lambda: self._dropped_once_read(drop))
        return outcome(record)

    def stream(self, timeout: float | None = None) -> Iterator[StreamPiece]:
        """The job's generated text as it is made: :class:`~pipeq.core.streams.StreamPiece`
        objects (``index``: the input, ``seq``: its returned sequence, ``text``: new text).

        For a job submitted with ``stream=True`` (text generation). Joined per
        ``(index, seq)``, the pieces are that sequence's generated text (without the
        prompt). Stops when the job succeeds; raises its error (JobFailed, JobCancelled...)
        when it does not, JobTimeout after ``timeout`` seconds (default
        ``default_timeout_s``). A retry after a worker died never repeats text (see
        ``pipeq.core.streams.TextAssembler``). Each call reads the stream from its start.
        """
        from pipeq.streaming import iterate

        self._check_streamable()
        return iterate(self, wait_seconds(self.client.settings.default_timeout_s, timeout))

    def astream(self, timeout: float | None = None) -> AsyncIterator[StreamPiece]:
        """``stream()`` for ``async for``: it waits for text on an asyncio Redis connection of
        its own (no thread waits); the short state checks run on the client's threads."""
        from pipeq.streaming import aiterate

        self._check_streamable()
        return aiterate(self, wait_seconds(self.client.settings.default_timeout_s, timeout))

    def _check_streamable(self) -> None:
        if self.route is not None and self.route.task != "text-generation":
            raise StreamNotSupported(
                f"job {self.id} is a {self.route.task} job: only text-generation jobs stream "
                "text; use job.result()")

    def raise_outcome(self) -> None:
        """Raise the error of the ended job (nothing when it succeeded); JobNotFound if
        its record is gone."""
        record = self.client.call_redis(lambda: self.client.store.get(self.id))
        if record is None:
            raise self.not_found()
        if record.state != JobState.SUCCESS:
            outcome(record)

    def watch(self) -> tuple[Future[JobRecord], bool]:
        """The Future of the job's final record, and whether the record must be read first:
        not when the job was watched since its submission (its wake-up cannot be missed);
        yes for a handle from ``get_job`` or after a wait that timed out."""
        if self.future is not None and self.future.done():
            return self.future, False
        future = self.client.waiter.watch(self.id)
        return future, future is not self.future

    def drop(self) -> bool:
        """Drop the job's result (or error) from Redis, keeping its state until the record
        expires; False when the job has not ended (nothing is dropped then)."""
        (dropped,) = self.client.call_redis(lambda: self.client.store.drop([self.id]))
        return dropped

    def _dropped_once_read(self, drop: bool | None) -> None:
        if not (self.client.settings.drop_read_results if drop is None else drop):
            return
        try:
            self.drop()
            self.future = None  # dropped: a later read says so, as from any other handle
        except (PipeqError, redis.RedisError) as exc:  # the caller has its result: keep it
            log.warning("job %s: could not drop its result from Redis: %s", self.id, exc)

    async def astatus(self) -> str:
        """``status()`` awaited without blocking the event loop."""
        return await self.client.offload(self.status)

    async def acancel(self) -> bool:
        """``cancel()`` awaited without blocking the event loop."""
        return await self.client.offload(self.cancel)

    async def adone(self) -> bool:
        """``done()`` awaited without blocking the event loop."""
        return await self.client.offload(self.done)

    def _take(self, record: JobRecord | None) -> None:
        """Act on the record read before waiting: unknown id, or already final."""
        if record is None:
            self.client.waiter.forget(self.id)
            raise self.not_found()
        self.client.waiter.mark_published(self.id)
        if record.state.is_final:
            self.client.waiter.resolve(record)

    def __await__(self) -> Generator[Any, None, Any]:
        return self.aresult().__await__()

    def cancel(self) -> bool:
        """Cancel the job. True if it will not run; False if it had already started or ended.

        Cancelling a running job is best-effort: the worker finishes the batch in hand,
        but the job stays CANCELLED and its result is discarded.
        """
        return self.cancel_from() == JobState.PENDING

    def cancel_from(self) -> JobState:
        """Cancel the job (as :meth:`cancel`); the state it was in: PENDING or STARTED when
        it is cancelled now, a final state when it had ended already (nothing changed)."""
        before = self.client.call_redis(lambda: self.client.store.cancel(self.id))
        if before is None:
            raise self.not_found()
        record = self.client.call_redis(lambda: self.client.store.get(self.id))
        if record is not None:
            self.client.waiter.resolve(record)
        return before


def wait_seconds(default: float, timeout: float | None) -> float | None:
    """A caller's wait: the default if None given; math.inf means no limit (None)."""
    wait = default if timeout is None else timeout
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait != wait or wait < 0:
        raise ValidationError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    return None if wait == math.inf else wait


def outcome(record: JobRecord) -> Any:
    """The caller's view of a final record: the result, or the matching exception."""
    if record.dropped:
        raise JobNotFound(f"the result of job {record.job_id} ({record.state.value}) was "
                          "dropped from Redis once it was read (result(drop=True) or "
                          "PIPEQ_DROP_READ_RESULTS)")
    if record.state == JobState.SUCCESS:
        return record.result
    error = record.error or {}
    message = str(error.get("message", "no error message was stored"))
    if record.state == JobState.CANCELLED:
        raise JobCancelled(record.job_id, message)
    if record.state == JobState.EXPIRED:
        raise JobExpired(record.job_id, message)
    if error.get("type") == "JobLost":
        raise JobLost(record.job_id, message)
    raise JobFailed(record.job_id, str(error.get("type", "Error")), message,
                    bool(error.get("retryable", False)))
