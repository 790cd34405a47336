"""Redis calls a worker must not skip: retried through restarts, failovers and a full Redis.

A job record that cannot be written now must be written later, never dropped: the guard
retries connection errors, a Redis at ``maxmemory`` (``OOM command not allowed``), a replica
that became read-only in a failover and a Redis still loading its data, with backoff, until
Redis answers. Meanwhile the worker reports itself unhealthy (``pipeq status`` says DOWN),
and only a stopping worker gives up, leaving its messages unacknowledged for redelivery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from pipeq.core.redis_io import CONNECTION_ERRORS, Backoff, is_redis_full

log = logging.getLogger("pipeq.worker")

T = TypeVar("T")

#: Errors that pass when Redis recovers (a full Redis is given room, a failover completes).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS, redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError, redis.exceptions.MasterDownError)


def is_transient(exc: BaseException) -> bool:
    """True for Redis errors that pass when Redis recovers."""
    return isinstance(exc, TRANSIENT_ERRORS) or is_redis_full(exc)


#: A worker whose Redis calls fail for longer than this reports itself unhealthy.
UNHEALTHY_AFTER_S = 3.0
#: Repeat the warning about a Redis in trouble at most this often.
WARN_EVERY_S = 30.0


class RedisGuard:
    """Retries the Redis calls of one worker until they succeed (or the worker gives up)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trouble_since: float | None = None
        self._warned_at = 0.0
        self._given_up = threading.Event()

    def call(self, action: Callable[[], T], what: str) -> T:
        """``action()``, retried on transient Redis errors with backoff until it succeeds.

        Raises the last error only once :meth:`give_up` was called (a stopping worker).
        """
        backoff = Backoff(first_s=0.05, max_s=2.0)
        while True:
            try:
                result = action()
            except redis.RedisError as exc:
                if self._given_up.is_set() or not is_transient(exc):
                    raise
                self._trouble(exc, what)
                backoff.sleep()
                continue
            self._recovered()
            return result

    def healthy(self) -> bool:
        """False while Redis calls have failed for over ``UNHEALTHY_AFTER_S`` seconds."""
        with self._lock:
            since = self._trouble_since
        return since is None or time.monotonic() - since < UNHEALTHY_AFTER_S

    def give_up(self) -> None:
        """Stop retrying (the worker stops): failing calls raise from now on."""
        self._given_up.set()

    def _trouble(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self._trouble_since is None:
                self._trouble_since = now
            warn = now - self._warned_at >= WARN_EVERY_S
            if warn:
                self._warned_at = now
        if warn:
            log.warning("Redis fails (%s: %s) while trying to %s; retrying until it answers "
                        "(the worker reports itself unhealthy meanwhile)", type(exc).__name__,
                        exc, what)

    def _recovered(self) -> None:
        with self._lock:
            if self._trouble_since is None:
                return
            seconds = time.monotonic() - self._trouble_since
            self._trouble_since = None
            self._warned_at = 0.0
        log.warning("Redis answers again after %.1fs", seconds)
