"""Waiting for many jobs at once, from many threads and from asyncio, on one connection.

Celery's own result consumer is not safe across threads. pipeq does not use it: a worker
that finishes a job pushes the job id (with its record, when small) onto the submitting
producer's reply list, and one daemon thread per producer process blocks on that list
(BLPOP) and resolves
``concurrent.futures.Future`` objects that any thread, or an asyncio loop through
``asyncio.wrap_future``, can wait on. A slow poll of the watched jobs' states backs the
wake-ups up, so a lost wake-up (a Redis restart) delays a result but never loses it, and a
published job whose record is gone (Redis lost its data) ends as ``JobLost`` within a poll.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

import redis

from pipeq.core.contract import JobState
from pipeq.core.keys import Keys
from pipeq.core.redis_io import Backoff
from pipeq.core.store import JobRecord, JobStore, reply_item

log = logging.getLogger("pipeq.waiter")

#: Jobs watched since submission but not awaited are polled this many times less often.
PASSIVE_POLL_FACTOR = 30


class ResultWaiter:
    """Resolves one Future per watched job when its record becomes final."""

    def __init__(self, store: JobStore, blocking_client: redis.Redis, keys: Keys,
                 poll_s: float = 1.0):
        self.store = store
        self.client_id = uuid.uuid4().hex
        self.reply_key = keys.reply(self.client_id)
        self._conn = blocking_client
        self._poll_s = poll_s
        self._futures: dict[str, Future[JobRecord]] = {}
        #: Watched jobs known to have a record (published, or read): a missing one is lost.
        self._published: set[str] = set()
        #: Watched jobs someone waits on now; the others were watched at submit time only
        #: (their results are kept for a later ``result()``) and are polled less often.
        self._awaited: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()

    def watch(self, job_id: str, awaited: bool = True) -> Future[JobRecord]:
        """A Future resolved with the job's final record (shared by all who watch the job).

        ``awaited=False``: watched from submission so that the result, pushed to this
        producer's reply list, is kept for a later ``result()`` without reading Redis again.
        """
        with self._lock:
            future = self._futures.get(job_id)
            if future is None:
                future = Future()
                self._futures[job_id] = future
            if awaited:
                self._awaited.add(job_id)
            self._wake.set()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pipeq-result-waiter", daemon=True
                )
                self._thread.start()
        return future

    def watching(self, job_id: str) -> bool:
        """True while someone waits for the job, known to exist, through this waiter."""
        with self._lock:
            return job_id in self._futures and job_id in self._published

    def mark_published(self, job_id: str) -> None:
        """The watched job has a record now: from here on, a missing record means lost."""
        with self._lock:
            if job_id in self._futures:
                self._published.add(job_id)

    def resolve(self, record: JobRecord) -> None:
        """Resolve the job's Future with a final record (from any thread)."""
        with self._lock:
            future = self._futures.pop(record.job_id, None)
            self._published.discard(record.job_id)
            self._awaited.discard(record.job_id)
        if future is not None and not future.done():
            future.set_result(record)

    def forget(self, job_id: str) -> None:
        """Stop watching a job (its waiter gave up)."""
        with self._lock:
            self._futures.pop(job_id, None)
            self._published.discard(job_id)
            self._awaited.discard(job_id)

    def close(self) -> None:
        """Stop the waiter thread."""
        self._stopping.set()
        self._wake.set()

    def _run(self) -> None:
        last_poll = last_full_poll = time.monotonic()
        # At most 0.5 s between attempts: a result reaches its caller soon after Redis is
        # back (a Sentinel failover: measured ~1 s later with 2 s steps).
        backoff = Backoff(max_s=0.5)
        while not self._stopping.is_set():
            with self._lock:
                idle = not self._futures
                if idle:
                    self._wake.clear()
            if idle:  # nothing to wait for: no Redis traffic until someone watches a job
                self._wake.wait()
                continue
            try:
                finished = self._next_wakeups()
                now = time.monotonic()
                if now - last_poll >= self._poll_s:
                    # Jobs nobody awaits yet are polled rarely: their wake-ups suffice but
                    # for lost ones, whose Futures must not be kept forever.
                    everyone = now - last_full_poll >= PASSIVE_POLL_FACTOR * self._poll_s
                    finished |= self._poll_states(everyone)
                    last_poll = now
                    if everyone:
                        last_full_poll = now
                if finished:
                    self._deliver(sorted(finished))
                backoff.reset()
            except (redis.RedisError, OSError) as exc:
                log.warning("result waiter lost Redis (%s); retrying", exc)
                backoff.sleep()

    def _next_wakeups(self) -> set[str]:
        """Pop the reply list; resolve the jobs whose records came with the wake-up and
        return the ids of watched jobs whose records must be read."""
        item = self._conn.blpop([self.reply_key], timeout=self._poll_s)
        if item is None:
            return set()
        # The popped wake-up resolves its job before the rest of the list is read: under
        # light load it is the only one, and its caller need not wait for one more round trip.
        to_read = self._take_wakeups([item[1]])
        with self._lock:
            others = bool(self._futures)
        # Nobody else waits here (one request at a time): the rest of the list is not read,
        # a round trip that found it empty while the caller woke (~0.1 ms of its latency).
        # Anything left there after all (a stale wake-up) is what the next BLPOP returns.
        more: Any = self._conn.lpop(self.reply_key, 1000) if others else None
        if more:
            to_read |= self._take_wakeups(more)
        with self._lock:
            return {i for i in to_read if i in self._futures}

    def _take_wakeups(self, items: list[Any]) -> set[str]:
        """Resolve the jobs whose records came with their wake-ups; the ids of the others."""
        to_read = set()
        for raw in items:
            job_id, record = reply_item(raw)
            if record is not None and record.state.is_final:
                self.resolve(record)
            else:
                to_read.add(job_id)
        return to_read

    def _poll_states(self, everyone: bool) -> set[str]:
        with self._lock:
            watched = list(self._futures) if everyone else list(self._awaited)
            published = set(self._published)
        if not watched:
            return set()
        states = self.store.states(watched)
        for job_id, state in zip(watched, states, strict=True):
            if state is None and job_id in published:
                log.warning("job %s: its record vanished before it ended: lost", job_id)
                self.resolve(JobRecord(job_id, JobState.FAILURE, error={
                    "type": "JobLost", "retryable": True, "message":
                    "the job's record vanished from Redis before it ended (Redis lost its "
                    "data?); it will never finish: submit it again"}))
        return {j for j, s in zip(watched, states, strict=True) if s is not None and s.is_final}

    def _deliver(self, job_ids: list[str]) -> None:
        for record in self.store.get_many(job_ids):
            if record is not None and record.state.is_final:
                self.resolve(record)
