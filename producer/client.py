"""The connections a process shares to submit and wait for jobs of one deployment.

``Client.for_settings`` gives every remote pipeline of a deployment (one Redis URL and queue
prefix) in this process the same Redis connection pool, publisher, job store, worker
registry and result waiter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar

import redis

from pipeq.core.config import Settings, load_settings
from pipeq.core.contract import JobRequest, Lane, Route
from pipeq.core.envelopes import claim_ttl_s
from pipeq.core.publish import Publisher
from pipeq.core.redis_io import (
    CONNECTION_ERRORS,
    call_with_retry,
    connect,
    is_redis_full,
)
from pipeq.core.registry import Registry
from pipeq.core.secrets import mask_url
from pipeq.core.store import JobStore
from pipeq.errors import BrokerUnavailable, NotReplicated
from pipeq.waiter import ResultWaiter

log = logging.getLogger("pipeq.client")

T = TypeVar("T")


class Client:
    """Connections shared by every remote pipeline of one deployment in this process."""

    _instances: dict[tuple[str, str, int], Client] = {}
    _instances_lock = threading.Lock()

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis_url = settings.redis_url_value()
        log.info("pipeq producer using Redis at %s", mask_url(self.redis_url))
        timeout = settings.connect_timeout_s
        # A reply slower than the connect timeout counts as a lost connection: on a host cut
        # off from Redis (packets vanish, nothing is refused) a call sent on an open
        # connection would otherwise wait for its reply longer than the promised
        # BrokerUnavailable (measured with connect+5 s: 7.0 s for a 2 s connect timeout).
        self.redis = connect(settings, connect_timeout_s=timeout, socket_timeout_s=timeout,
                             health_check_interval=10)
        # The waiter's own connection: it blocks in BLPOP for up to a second at a time.
        blocking = connect(settings, connect_timeout_s=timeout, socket_timeout_s=timeout + 5)
        self.keys = settings.keys
        self.store = JobStore(self.redis, self.keys, settings.result_ttl_s)
        self.registry = Registry(self.redis, self.keys, settings.heartbeat_s)
        self.publisher = Publisher(self.redis, self.keys,
                                   wait_replicas=settings.redis_wait_replicas,
                                   wait_timeout_ms=settings.redis_wait_timeout_ms)
        self.waiter = ResultWaiter(self.store, blocking, self.keys)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @staticmethod
    def _identity(settings: Settings) -> tuple[str, str, int]:
        url = settings.redis_url.get_secret_value() if settings.redis_url else None
        # Producers that wait for replicas and producers that do not publish differently.
        return repr(url), settings.queue_prefix, settings.redis_wait_replicas

    @classmethod
    def for_settings(cls, settings: Settings | None = None) -> Client:
        """The shared Client of a deployment (one per Redis URL and queue prefix)."""
        settings = settings or load_settings()
        key = cls._identity(settings)
        with cls._instances_lock:
            client = cls._instances.get(key)
            if client is None:
                client = cls._instances[key] = cls(settings)
            return client

    @classmethod
    def discard(cls, settings: Settings) -> None:
        """Close and forget the shared Client of a deployment (the next use makes a new one)."""
        with cls._instances_lock:
            client = cls._instances.pop(cls._identity(settings), None)
        if client is not None:
            client.close()

    def close(self) -> None:
        """Stop the result waiter, the asyncio helper threads, and close the connections."""
        self.waiter.close()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        self.close()

    async def offload(self, action: Callable[[], T]) -> T:
        """``action()`` (a blocking Redis call) awaited on this client's own threads.

        Not asyncio's default executor: a web app's own ``to_thread`` work never queues
        behind pipeq's Redis calls, nor pipeq's behind it.
        """
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.settings.async_threads,
                    thread_name_prefix="pipeq-async")
            executor = self._executor
        return await asyncio.get_running_loop().run_in_executor(executor, action)

    def call_redis(self, action: Callable[[], T]) -> T:
        """Run a Redis call, retrying a lost connection for up to ``connect_timeout_s``;
        then BrokerUnavailable, never a hang."""
        return call_with_retry(action, timeout_s=self.settings.connect_timeout_s,
                               url=self.redis_url)

    def send(self, request: JobRequest, summary: str | None = None) -> None:
        """Publish a job message onto its route's queue (bounded retry, then BrokerUnavailable).

        ``summary``: what Flower shows as the job's arguments (default: the input count and
        parameter names; never the inputs themselves). Claim-checked media payloads are
        stored in the same round trip, expiring a little after the job's deadline; the
        worker deletes them when the job ends.
        """
        remaining = (request.deadline or time.time() + 3600) - time.time()
        ttl = claim_ttl_s(max(remaining, 1.0))
        try:
            self.call_redis(lambda: self.publisher.publish(
                request, record_ttl_s=self.settings.result_ttl_s, summary=summary,
                claim_ttl_s=ttl))
        except redis.ResponseError as exc:
            if not is_redis_full(exc):
                raise
            raise BrokerUnavailable(
                f"Redis refused job {request.job_id}: it is full ({exc}). Nothing was "
                "enqueued; free memory (results are kept PIPEQ_RESULT_TTL_S) or raise its "
                "maxmemory, then submit again") from exc
        except NotReplicated:
            raise  # reached Redis: its message says what happened
        except BrokerUnavailable as exc:
            raise BrokerUnavailable(
                f"cannot reach Redis at {mask_url(self.redis_url)} to enqueue job "
                f"{request.job_id}: {exc.__cause__ or exc}. Is Redis running, and "
                "PIPEQ_REDIS_URL right?") from exc

    def queued_job_ids(self, route: Route, lane: Lane, limit: int = 100_000) -> set[str]:
        """Ids of the jobs waiting in one lane's queue of ``route`` (at most ``limit`` read)."""
        raw = self.redis.lrange(self.keys.lane_queue_key(route, lane), 0, limit - 1)
        return self.publisher.message_ids(raw)

    def delete(self, *keys: str) -> None:
        """Delete keys, ignoring a Redis that is away (they expire anyway)."""
        try:
            self.redis.delete(*keys)
        except CONNECTION_ERRORS as exc:
            log.warning("could not delete %d key(s): %s", len(keys), exc)
