"""The Redis side of streaming: the sinks that append a job's generated text to its stream.

One :class:`TextStreams` per worker process. Sinks buffer the entries they are given; a
flush (once per decoding step of a batch) hands the step's entries of every job to one
writer thread, which writes them in one pipelined round trip (``XADD`` per piece,
``EXPIRE`` at a stream's first and last entry), merging the steps that queued up meanwhile
(Redis was slow, or steps come faster than ``MIN_WRITE_INTERVAL_S``). Generation never
waits for Redis, and one thread writing keeps each job's entries in order. A Redis that
fails is retried (the worker's :class:`~pipeq.worker.redis_guard.RedisGuard`) until it
answers; the end entries of finished jobs go through the same writer, after their text,
and their caller waits until they are written, as it waits for the job records.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from typing import Any

import redis

from pipeq.core.contract import JobState
from pipeq.core.keys import Keys
from pipeq.core.streams import end_fields, text_fields
from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.redis_guard import RedisGuard

log = logging.getLogger("pipeq.worker")

#: The writer's pause after each round trip: steps that come meanwhile are written together.
MIN_WRITE_INTERVAL_S = 0.01

Entry = tuple[str, dict[str, Any]]


class TextStreams:
    """Writes the streamed text of one worker's jobs to their Redis Streams."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int, maxlen: int,
                 guard: RedisGuard | None = None):
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self.guard = guard or RedisGuard()
        self._buffer: list[Entry] = []
        self._lock = threading.Lock()
        #: Batches of entries to write, in order; an Event marks a point someone waits for.
        self._queue: queue.SimpleQueue[list[Entry] | threading.Event] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        #: Streams given their expiry already (writer thread only).
        self._expiring: set[str] = set()

    def sink(self, job_id: str, attempt: int) -> RedisTextSink:
        """The sink of one attempt of a streaming job."""
        return RedisTextSink(self, self.keys.stream(job_id), attempt)

    def open(self, job: JobInFlight, starts: int) -> None:
        """A job starts (its ``starts``-th time): if it streams, give it this attempt's sink."""
        if job.request.stream:
            job.attempt = starts
            job.text = self.sink(job.job_id, starts)

    def close(self, jobs: list[JobInFlight]) -> None:
        """Jobs ended, their records stored: end the streams of those that stream (a reader
        that sees the end finds the final record); text of a run that outlives its job is
        not written."""
        ends = []
        for job in jobs:
            if job.text is not None:
                job.text.closed = True
            if job.request.stream and job.outcome is not None and job.announce:
                ends.append((job.job_id, job.attempt, job.outcome.state))
        if ends:
            self.end(ends)

    def add(self, key: str, fields: dict[str, Any]) -> None:
        """Buffer one entry for ``key`` until the next flush."""
        with self._lock:
            self._buffer.append((key, fields))

    def flush(self) -> None:
        """Hand every buffered entry to the writer thread (which writes them in one round
        trip); returns at once."""
        with self._lock:
            entries, self._buffer = self._buffer, []
            if not entries:
                return
            self._queue.put(entries)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                                name="pipeq-text-streams")
                self._writer.start()

    def end(self, ends: list[tuple[str, int, JobState]]) -> None:
        """Close the streams of ended jobs ``(job_id, attempt, final state)``, after the
        text still buffered; returns once written."""
        for job_id, attempt, state in ends:
            self.add(self.keys.stream(job_id), end_fields(attempt, state))
        written = threading.Event()
        self.flush()
        self._queue.put(written)
        written.wait()

    def _write_loop(self) -> None:
        while True:
            entries: list[Entry] = []
            waiting: list[threading.Event] = []
            item = self._queue.get()
            while True:  # everything queued meanwhile goes in the same round trip
                if isinstance(item, threading.Event):
                    waiting.append(item)
                else:
                    entries.extend(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                if entries:
                    self.guard.call(functools.partial(self._write, entries),
                                    "write streamed text")
            except Exception:  # the worker gave up on Redis (it stops): nothing to wait for
                log.exception("could not write %d streamed piece(s)", len(entries))
            finally:
                for event in waiting:
                    event.set()
            # Steps faster than this share a round trip (a tiny model's CPU steps take ~1 ms;
            # a reader cannot tell 10 ms apart): less Redis and GIL time per token.
            time.sleep(MIN_WRITE_INTERVAL_S)

    def _write(self, entries: list[Entry]) -> None:
        pipe = self.client.pipeline(transaction=False)
        expire = set()
        for key, fields in entries:
            entry: Any = fields  # (redis-py's stubs want an invariant dict type)
            pipe.xadd(key, entry, maxlen=self.maxlen, approximate=True)
            # A stream expires from its first write, and again from its end (as its job's
            # record): not at every step.
            if key not in self._expiring or "end" in fields:
                expire.add(key)
        for key in expire:
            pipe.expire(key, self.ttl_s)
        pipe.execute()
        self._expiring.update(expire)
        self._expiring.difference_update(key for key, fields in entries if "end" in fields)


class RedisTextSink:
    """A :class:`~pipeq.worker.model.streamer.JobTextSink` writing one job attempt's text."""

    def __init__(self, streams: TextStreams, key: str, attempt: int):
        self.streams = streams
        self.key = key
        self.attempt = attempt
        #: Set when the job has ended: text of a run that outlived it is not written.
        self.closed = False

    def put(self, index: int, seq: int, at: int, text: str) -> None:
        """Buffer a piece of sequence ``seq`` of input ``index`` at offset ``at``."""
        if not self.closed:
            self.streams.add(self.key, text_fields(self.attempt, index, seq, at, text))

    def flush(self) -> None:
        """Hand what every sink of this worker buffered to the writer (one round trip)."""
        self.streams.flush()
