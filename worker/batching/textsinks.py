"""The Redis side of streaming: the sinks that append a job's generated text to its stream.

One :class:`TextStreams` per worker process buffers the entries every sink puts and writes
them in one pipelined round trip per flush (a decoding step of a batch: ``XADD`` per piece,
``EXPIRE`` per job). Text is best effort while it flows: a Redis that fails keeps the
entries buffered for the next step rather than stalling the model. The end entries of
finished jobs go through the worker's :class:`~pipeq.worker.redis_guard.RedisGuard`, like
their records: retried until Redis answers.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from pipeq.core.contract import JobState
from pipeq.core.keys import Keys
from pipeq.core.streams import end_fields, text_fields
from pipeq.worker.redis_guard import RedisGuard, is_transient

log = logging.getLogger("pipeq.worker")

#: Entries kept for a later flush while Redis fails; beyond this the oldest are dropped
#: (their readers are told the start of the text is gone and read the result instead).
MAX_BUFFERED = 100_000
#: Repeat the warning about failing stream writes at most this often.
WARN_EVERY_S = 30.0


class TextStreams:
    """Writes the streamed text of one worker's jobs to their Redis Streams."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int, maxlen: int,
                 guard: RedisGuard | None = None):
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self.guard = guard or RedisGuard()
        self._buffer: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        #: One flush writes at a time, so a job's entries reach Redis in the order put.
        self._write_lock = threading.Lock()
        self._warned_at = 0.0

    def sink(self, job_id: str, attempt: int) -> RedisTextSink:
        """The sink of one attempt of a streaming job."""
        return RedisTextSink(self, self.keys.stream(job_id), attempt)

    def add(self, key: str, fields: dict[str, Any]) -> None:
        """Buffer one entry for ``key`` until the next flush."""
        with self._lock:
            self._buffer.append((key, fields))
            if len(self._buffer) > MAX_BUFFERED:
                del self._buffer[:len(self._buffer) - MAX_BUFFERED]

    def flush(self) -> None:
        """Write every buffered entry in one pipelined round trip; on a transient Redis
        error keep them for the next flush."""
        with self._write_lock:
            with self._lock:
                entries, self._buffer = self._buffer, []
            if not entries:
                return
            try:
                self._write(entries)
            except redis.RedisError as exc:
                if not is_transient(exc):
                    log.warning("could not write %d streamed piece(s): %s", len(entries), exc)
                    return
                with self._lock:
                    self._buffer[:0] = entries
                if time.monotonic() - self._warned_at > WARN_EVERY_S:
                    self._warned_at = time.monotonic()
                    log.warning("streamed text waits for Redis (%s); %d piece(s) buffered",
                                exc, len(entries))

    def end(self, ends: list[tuple[str, int, JobState]]) -> None:
        """Close the streams of ended jobs ``(job_id, attempt, final state)``, after the
        text still buffered; retried until Redis answers."""
        for job_id, attempt, state in ends:
            self.add(self.keys.stream(job_id), end_fields(attempt, state))

        def write() -> None:
            with self._write_lock:
                with self._lock:
                    entries, self._buffer = self._buffer, []
                try:
                    self._write(entries)
                except BaseException:
                    with self._lock:
                        self._buffer[:0] = entries
                    raise

        self.guard.call(write, "close job streams")

    def _write(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        if not entries:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, fields in entries:
            entry: Any = fields  # (redis-py's stubs want an invariant dict type)
            pipe.xadd(key, entry, maxlen=self.maxlen, approximate=True)
        for key in {key for key, _ in entries}:
            pipe.expire(key, self.ttl_s)
        pipe.execute()


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
        """Write what every sink of this worker buffered (one round trip)."""
        self.streams.flush()
