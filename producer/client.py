"""The remote pipeline: ``transformers.pipeline()`` semantics, served through the queue.

``pipeline(task, model=...)`` returns a :class:`RemotePipeline`; calling it returns what the
local pipeline would return (in JSON-safe types), ``submit`` returns a :class:`Job` handle.
One RemotePipeline may be shared by many threads and used from asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import kombu.exceptions
import redis

from .celery_app import make_celery
from .config import Settings, load_settings, mask_url
from .contract import JobRequest, JobState, Lane, Route, new_job_id
from .errors import (
    BrokerUnavailable,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobTimeout,
    NoWorkerError,
    ValidationError,
)
from .media import claim_ttl_s, pack_inputs
from .params import validate_params
from .registry import Registry
from .store import JobRecord, JobStore
from .validation import normalize_inputs, validate_inputs
from .waiter import ResultWaiter

log = logging.getLogger("pipeq.client")

T = TypeVar("T")

#: Loading options that belong to the worker serving a route, not to the caller.
WORKER_SIDE_OPTIONS = ("device", "device_map", "dtype", "torch_dtype", "trust_remote_code",
                       "model_kwargs", "batch_size", "framework")


class Client:
    """Connections shared by every remote pipeline of one deployment in this process."""

    _instances: dict[tuple[str, str], Client] = {}
    _instances_lock = threading.Lock()

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis_url = settings.redis_url_value()
        log.info("pipeq producer using Redis at %s", mask_url(self.redis_url))
        timeout = settings.connect_timeout_s
        self.redis = redis.Redis.from_url(
            self.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout + 5,
            health_check_interval=10, **_tls_kwargs(settings, self.redis_url),
        )
        blocking = redis.Redis.from_url(
            self.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout + 5,
            **_tls_kwargs(settings, self.redis_url),
        )
        self.keys = settings.keys
        self.store = JobStore(self.redis, self.keys, settings.result_ttl_s)
        self.registry = Registry(self.redis, self.keys, settings.heartbeat_s)
        self.waiter = ResultWaiter(self.store, blocking, self.keys)
        self.celery = make_celery(settings, self.redis_url)
        self.celery.conf.task_publish_retry_policy = {
            "max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
            "interval_max": max(1.0, timeout / 3),
        }

    @classmethod
    def for_settings(cls, settings: Settings | None = None) -> Client:
        """The shared Client of a deployment (one per Redis URL and queue prefix)."""
        settings = settings or load_settings()
        key = (repr(settings.redis_url.get_secret_value() if settings.redis_url else None),
               settings.queue_prefix)
        with cls._instances_lock:
            client = cls._instances.get(key)
            if client is None:
                client = cls._instances[key] = cls(settings)
            return client

    def call_redis(self, action: Callable[[], T]) -> T:
        """Run a Redis call, retrying a lost connection for up to ``connect_timeout_s``.

        Redis restarting is not an error a caller should see; Redis staying away is, as a
        BrokerUnavailable after a bounded wait, never a hang.
        """
        deadline = time.monotonic() + self.settings.connect_timeout_s
        delay = 0.05
        while True:
            try:
                return action()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise BrokerUnavailable(
                        f"cannot reach Redis at {mask_url(self.redis_url)} "
                        f"(retried {self.settings.connect_timeout_s:g}s): {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def send(self, request: JobRequest, summary: str | None = None) -> None:
        """Publish a job message onto its route's queue (bounded retry, then BrokerUnavailable).

        ``summary``: what Flower shows as the job's arguments (default: the input count and
        parameter names; never the inputs themselves).

        Claim-checked media payloads are stored first, in one round trip, expiring a little
        after the job's deadline; the worker deletes them when the job ends.
        """
        try:
            if request.claims:
                remaining = (request.deadline or time.time() + 3600) - time.time()
                ttl = claim_ttl_s(max(remaining, 1.0))
                with self.redis.pipeline(transaction=False) as pipe:
                    for key, data in request.claims.items():
                        pipe.set(key, data, ex=ttl)
                    pipe.execute()
            self.celery.send_task(
                self.keys.task_name(request.route),
                kwargs={"request": request.model_dump(mode="json")},
                task_id=request.job_id,
                queue=self.keys.queue_for(request.route, request.lane),
                retry=True,
                # Flower shows this instead of the inputs: they may be private, and large.
                argsrepr="()",
                kwargsrepr=summary or (
                    f"<{len(request.inputs)} input(s), params {sorted(request.params)}>"),
            )
        except (kombu.exceptions.OperationalError, redis.ConnectionError, redis.TimeoutError,
                OSError) as exc:
            raise BrokerUnavailable(
                f"cannot reach Redis at {mask_url(self.redis_url)} to enqueue job "
                f"{request.job_id}: {exc}. Is Redis running, and PIPEQ_REDIS_URL right?"
            ) from exc


def _tls_kwargs(settings: Settings, url: str) -> dict[str, Any]:
    if not url.startswith("rediss://"):
        return {}
    return {"ssl_cert_reqs": settings.redis_ssl_cert_reqs}


class Job:
    """A handle on a submitted job: id, status, result, cancel; awaitable for its result."""

    def __init__(self, client: Client, job_id: str, route: Route | None = None):
        self.client = client
        self.id = job_id
        self.route = route
        #: Watched since before its message was sent: its end cannot have been missed, so
        #: ``result()`` need not read the record first.
        self.watched_from_start = False

    def __repr__(self) -> str:
        return f"Job({self.id!r}, route={self.route.describe() if self.route else None!r})"

    def status(self) -> str:
        """PENDING, STARTED, SUCCESS, FAILURE, CANCELLED or EXPIRED."""
        (state,) = self.client.call_redis(lambda: self.client.store.states([self.id]))
        return (state or JobState.PENDING).value

    def done(self) -> bool:
        """True once the job is in a final state."""
        return JobState(self.status()).is_final

    def result(self, timeout: float | None = None) -> Any:
        """Block until the job ends and return its result (or raise its error).

        Raises JobTimeout if it has not ended within ``timeout`` seconds (default: the
        settings' ``default_timeout_s``); the job itself goes on and can be waited for again.
        """
        wait = _wait_seconds(self.client.settings.default_timeout_s, timeout)
        future = self.client.waiter.watch(self.id)
        if not self.watched_from_start:
            record = self.client.call_redis(lambda: self.client.store.get(self.id))
            if record is not None and record.state.is_final:
                self.client.waiter.resolve(record)
        try:
            return outcome(future.result(timeout=wait))
        except FutureTimeout:
            self.client.waiter.forget(self.id)
            raise JobTimeout(
                f"job {self.id} did not finish within {wait:g}s (status {self.status()}); "
                "wait again with job.result(timeout=...) or cancel it"
            ) from None

    async def aresult(self, timeout: float | None = None) -> Any:
        """The result, awaited without blocking the event loop."""
        wait = _wait_seconds(self.client.settings.default_timeout_s, timeout)
        future = self.client.waiter.watch(self.id)
        if not self.watched_from_start:
            record = await asyncio.to_thread(self.client.call_redis,
                                             lambda: self.client.store.get(self.id))
            if record is not None and record.state.is_final:
                self.client.waiter.resolve(record)
        try:
            return outcome(await asyncio.wait_for(asyncio.wrap_future(future), wait))
        except TimeoutError:
            self.client.waiter.forget(self.id)
            raise JobTimeout(f"job {self.id} did not finish within {wait:g}s") from None

    def __await__(self) -> Generator[Any, None, Any]:
        return self.aresult().__await__()

    def cancel(self) -> bool:
        """Cancel the job. True if it will not run; False if it had already started or ended.

        Cancelling a running job is best-effort: the worker finishes the batch in hand,
        but the job stays CANCELLED and its result is discarded.
        """
        before = self.client.call_redis(lambda: self.client.store.cancel(self.id))
        record = self.client.call_redis(lambda: self.client.store.get(self.id))
        if record is not None:
            self.client.waiter.resolve(record)
        return before == JobState.PENDING


def _wait_seconds(default: float, timeout: float | None) -> float | None:
    """A caller's wait: the default if None given; math.inf means no limit (None)."""
    wait = default if timeout is None else timeout
    if wait != wait or wait < 0:
        raise ValidationError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    return None if wait == math.inf else wait


def outcome(record: JobRecord) -> Any:
    """The caller's view of a final record: the result, or the matching exception."""
    if record.state == JobState.SUCCESS:
        return record.result
    error = record.error or {}
    message = str(error.get("message", "no error message was stored"))
    if record.state == JobState.CANCELLED:
        raise JobCancelled(record.job_id, message)
    if record.state == JobState.EXPIRED:
        raise JobExpired(record.job_id, message)
    raise JobFailed(record.job_id, str(error.get("type", "Error")), message,
                    bool(error.get("retryable", False)))


class RemotePipeline:
    """A pipeline served by pipeq workers; call it like ``transformers.pipeline()``'s result."""

    def __init__(self, route: Route, client: Client):
        self.route = route
        self.client = client
        self.task = route.task
        self.model = route.model
        self._worker_seen_at = -1e9

    def __repr__(self) -> str:
        return f"RemotePipeline({self.route.describe()})"

    def __call__(self, inputs: Any, *, timeout: float | None = None, **params: Any) -> Any:
        """Run ``inputs`` remotely and return what the local pipeline would return."""
        return self.submit(inputs, timeout=timeout, _watch=True, **params).result(timeout)

    def submit(self, inputs: Any, *, timeout: float | None = None,
               require_worker: bool | None = None, idempotency_key: str | None = None,
               _watch: bool = False, **params: Any) -> Job:
        """Enqueue a job and return its handle at once.

        ``timeout`` (seconds, default ``default_timeout_s``) is the job's deadline: a job
        still queued then is not run (EXPIRED). ``require_worker=False`` enqueues even when
        no live worker serves the route (for workers that start later).
        ``idempotency_key``: submitting again with the same key (within the result TTL)
        returns the first job's handle and enqueues nothing.
        """
        request = self.build_request(inputs, params, timeout)
        self._check_workers(require_worker)
        if idempotency_key is not None:
            existing = self._claim_idempotency_key(idempotency_key, request.job_id)
            if existing is not None:
                return Job(self.client, existing, self.route)
        job = Job(self.client, request.job_id, self.route)
        if _watch:  # the caller waits for the result: watch before it can arrive
            self.client.waiter.watch(job.id)
            job.watched_from_start = True
        try:
            self.client.send(request)
        except BaseException:
            if _watch:
                self.client.waiter.forget(job.id)
            if idempotency_key is not None:  # nothing was enqueued: free the key again
                self.client.redis.delete(self.client.keys.idempotency(idempotency_key))
            raise
        return job

    def _claim_idempotency_key(self, key: str, job_id: str) -> str | None:
        """Bind ``key`` to ``job_id``; return the job id it was already bound to, if any."""
        if not key or len(key) > 256:
            raise ValidationError("idempotency_key must be a non-empty string of <= 256 chars")
        name = self.client.keys.idempotency(key)
        ttl = self.client.settings.result_ttl_s
        claimed = self.client.call_redis(lambda: self.client.redis.set(name, job_id, nx=True,
                                                                       ex=ttl))
        if claimed:
            return None
        existing = self.client.call_redis(lambda: self.client.redis.get(name))
        return existing.decode() if isinstance(existing, bytes) else existing

    async def asubmit(self, inputs: Any, *, timeout: float | None = None, **params: Any) -> Any:
        """Submit and await the result without blocking the event loop."""
        job = await asyncio.to_thread(self.submit, inputs, timeout=timeout, _watch=True,
                                      **params)
        return await job.aresult(timeout)

    acall = asubmit

    def map(self, inputs: Iterable[Any], *, chunk_size: int = 64, max_in_flight: int = 8,
            on_error: str = "raise", timeout: float | None = None, cache: bool = False,
            **params: Any) -> Iterator[Any]:
        """Run every input of ``inputs`` (any iterable, read lazily); yield results in order.

        Inputs travel in chunks of ``chunk_size`` (one bulk-lane job each), with at most
        ``max_in_flight`` chunks submitted and not yet consumed. Each result is what the
        local pipeline's list call gives for that input. A failing input raises JobFailed
        when its turn comes (``on_error="raise"``) or is yielded as a ``producer.bulk.ItemError``
        (``on_error="record"``). ``cache=True`` answers inputs already answered within the
        result TTL (same route and parameters) from Redis. See ``producer.bulk.map_inputs``.
        """
        from .bulk import map_inputs  # the bulk engine is only loaded by those who use it

        return map_inputs(self, inputs, chunk_size=chunk_size, max_in_flight=max_in_flight,
                          on_error=on_error, timeout=timeout, cache=cache, **params)

    def job(self, job_id: str) -> Job:
        """A handle on an earlier job of this route, by id."""
        return Job(self.client, job_id, self.route)

    def build_request(self, inputs: Any, params: dict[str, Any], timeout: float | None,
                      lane: Lane = "interactive") -> JobRequest:
        """Validate a call and build its message; raises ValidationError, enqueues nothing."""
        settings = self.client.settings
        items, single = normalize_inputs(inputs)
        job_id = new_job_id()
        # Images and audio become envelopes; big payloads are claim-checked (producer.media).
        limit = settings.payload_limit(self.route)
        packed = pack_inputs(self.task, items, job_id=job_id, keys=self.client.keys,
                             max_payload_bytes=limit,
                             claim_check_bytes=settings.claim_check_bytes)
        items = packed.items
        validate_inputs(self.task, items, max_chars=settings.max_input_chars,
                        max_items=settings.max_inputs_per_job, max_payload_bytes=limit)
        clean = validate_params(self.task, params)
        wait = settings.default_timeout_s if timeout is None else timeout
        # inf would overflow the worker's and the waiter's Event.wait(): refuse it here.
        if not 0 < wait < math.inf:
            raise ValidationError(
                f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        submitted = time.time()
        request = JobRequest(
            job_id=job_id, route=self.route, inputs=items, single=single, params=clean,
            submitted_at=submitted, deadline=submitted + wait,
            reply_to=self.client.waiter.reply_key, lane=lane,
        )
        request.claims.update(packed.claims)  # stored by Client.send, just before publishing
        return request

    def _check_workers(self, require_worker: bool | None) -> None:
        required = self.client.settings.require_worker if require_worker is None else require_worker
        if not required:
            return
        # A live worker seen less than a heartbeat ago is still taken as live: the registry
        # itself is that stale, and asking on every submit cost a round trip per job.
        if time.monotonic() - self._worker_seen_at < self.client.settings.heartbeat_s:
            return
        live = self.client.call_redis(lambda: self.client.registry.live_count(self.route))
        if live > 0:
            self._worker_seen_at = time.monotonic()
        if live == 0:
            raise NoWorkerError(
                f"no live worker serves route {self.route.describe()}. Start one with "
                f"`{self.route.worker_command()}`, or submit with require_worker=False "
                "to queue the job for a worker that starts later"
            )


def pipeline(task: str, model: str | None = None, *, revision: str | None = None,
             tokenizer: str | None = None, settings: Settings | None = None,
             **load_kwargs: Any) -> RemotePipeline:
    """A remote ``transformers.pipeline(task, model)``, served by pipeq workers.

    ``model`` is a hub id or a directory the workers can read; ``revision`` and
    ``tokenizer`` are part of the route. Loading options such as ``device`` or ``dtype``
    belong to the worker (``pipeq worker --dtype ...``) and are refused here.
    """
    misplaced = sorted(set(load_kwargs) & set(WORKER_SIDE_OPTIONS))
    if misplaced:
        raise ValidationError(
            f"{', '.join(misplaced)} is chosen by the worker serving the route, not by the "
            f"caller: start the worker with e.g. `pipeq worker --task {task} --model {model} "
            "--device cuda:0 --dtype float16`"
        )
    if load_kwargs:
        raise ValidationError(
            f"unknown pipeline() option(s) {sorted(load_kwargs)}; accepted: model, revision, "
            "tokenizer, settings"
        )
    if not model:
        raise ValidationError(
            f"pipeline({task!r}) needs model=...: pipeq routes jobs by (task, model), "
            "so there is no default model"
        )
    try:
        route = Route(task=task, model=model, revision=revision, tokenizer=tokenizer)
    except Exception as exc:  # pydantic wraps our UnsupportedTaskError
        raise ValidationError(_first_line(exc)) from None
    return RemotePipeline(route, Client.for_settings(settings))


def _first_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg", e)) for e in errors())
    return str(exc)


def get_job(job_id: str, settings: Settings | None = None) -> Job:
    """A handle on any job by id (e.g. from another process).

    A job no worker has touched yet, and an id nobody submitted, both read PENDING: Redis
    holds no record of a queued job until a worker starts it.
    """
    return Job(Client.for_settings(settings), job_id)


__all__ = ["Client", "Job", "RemotePipeline", "get_job", "pipeline"]
