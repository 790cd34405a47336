"""The remote pipeline: ``transformers.pipeline()`` semantics, served through the queue.

``pipeline(task, model=...)`` returns a :class:`RemotePipeline`; calling it returns what the
local pipeline would return (in JSON-safe types), ``submit`` returns a :class:`~pipeq.Job`
handle. One RemotePipeline may be shared by many threads and used from asyncio.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pydantic

from pipeq.client import Client
from pipeq.core.config import Settings, validation_problems
from pipeq.core.contract import JobRequest, Lane, Route, new_job_id
from pipeq.core.params import validate_params
from pipeq.core.redis_io import as_text
from pipeq.core.streams import StreamPiece
from pipeq.core.validation import InputLimits
from pipeq.errors import (
    JobTimeout,
    NotReplicated,
    NoWorkerError,
    StreamNotSupported,
    ValidationError,
)
from pipeq.inputs import prepare_inputs
from pipeq.job import Job

#: Loading options that belong to the worker serving a route, not to the caller.
WORKER_SIDE_OPTIONS = ("device", "device_map", "dtype", "torch_dtype", "trust_remote_code",
                       "model_kwargs", "batch_size", "framework")


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
        job = self.submit(inputs, timeout=timeout, _watch=True, **params)
        try:
            return job.result(timeout)
        except JobTimeout as exc:  # the caller holds no Job: say how to reach this one
            raise JobTimeout(
                f"job {job.id} did not finish within {exc.waited_s:g}s (status {exc.state}); "
                f"it goes on: pipeq.get_job({job.id!r}).result(timeout=...) waits for it "
                "again, .cancel() stops it; or use remote.submit(...) to hold a Job",
                job_id=job.id, waited_s=exc.waited_s, state=exc.state) from None

    def submit(self, inputs: Any, *, timeout: float | None = None,
               require_worker: bool | None = None, idempotency_key: str | None = None,
               stream: bool = False, _watch: bool = False, **params: Any) -> Job:
        """Enqueue a job and return its handle at once.

        ``timeout`` (seconds, default ``default_timeout_s``) is the job's deadline: a job
        still queued then is not run (EXPIRED). ``require_worker=False`` enqueues even when
        no live worker serves the route (for workers that start later).
        ``idempotency_key``: submitting again with the same key (within the result TTL)
        returns the first job's handle and enqueues nothing.
        ``stream=True`` (text generation): the worker streams the generated text as it is
        made; read it with ``job.stream()`` / ``job.astream()``.
        """
        request = self.build_request(inputs, params, timeout, stream=stream)
        self.check_workers(require_worker)
        if idempotency_key is not None:
            existing = self._claim_idempotency_key(idempotency_key, request.job_id)
            if existing is not None:
                return Job(self.client, existing, self.route)
        job = Job(self.client, request.job_id, self.route)
        # Watched before its message is sent, so its wake-up (which carries the result when
        # small) cannot be missed: a later result() reads nothing more from Redis.
        job.future = self.client.waiter.watch(job.id, awaited=_watch)
        try:
            self.client.send(request)
            self.client.waiter.mark_published(job.id)
        except BaseException as exc:
            self.client.waiter.forget(job.id)
            # Nothing was enqueued (NotReplicated: it was, on the primary): free the key again.
            if idempotency_key is not None and not isinstance(exc, NotReplicated):
                self.client.delete(self.client.keys.idempotency(idempotency_key))
            raise
        return job

    def _claim_idempotency_key(self, key: str, job_id: str) -> str | None:
        """Bind ``key`` to ``job_id``; return the job id it was already bound to, if any."""
        if not isinstance(key, str) or not key or len(key) > 256:
            raise ValidationError("idempotency_key must be a non-empty string of <= 256 chars, "
                                  f"got {type(key).__name__} {key!r:.40}")
        name = self.client.keys.idempotency(key)
        ttl = self.client.settings.result_ttl_s
        claimed = self.client.call_redis(lambda: self.client.redis.set(name, job_id, nx=True,
                                                                       ex=ttl))
        if claimed:
            return None
        existing = self.client.call_redis(lambda: self.client.redis.get(name))
        return None if existing is None else as_text(existing)

    async def asubmit(self, inputs: Any, *, timeout: float | None = None,
                      require_worker: bool | None = None, idempotency_key: str | None = None,
                      stream: bool = False, **params: Any) -> Job:
        """``submit()`` awaited without blocking the event loop: returns the Job handle
        (``await job`` or ``await job.aresult()`` for its result)."""
        return await self.client.offload(lambda: self.submit(
            inputs, timeout=timeout, require_worker=require_worker,
            idempotency_key=idempotency_key, stream=stream, **params))

    def stream(self, inputs: Any, *, timeout: float | None = None,
               **params: Any) -> Iterator[str] | Iterator[StreamPiece]:
        """Generate text and yield it as it is made (``text-generation`` routes).

        One prompt and one sequence: plain ``str`` pieces, which joined are the
        ``generated_text`` of ``remote(prompt, return_full_text=False, ...)``. A list of
        prompts or ``num_return_sequences`` > 1: :class:`~pipeq.core.streams.StreamPiece`
        objects (``index`` of the prompt, ``seq`` of the sequence, ``text``). The job is
        submitted at once (errors such as ValidationError are raised here); the iteration
        stops when it succeeds, raises its error otherwise. ``timeout``: the job's deadline
        and the longest wait for its text. To hold the Job (id, cancel, result), use
        ``submit(..., stream=True)`` and ``job.stream()``.
        """
        from pipeq.streaming import plain, yields_plain_text

        job = self.submit(inputs, timeout=timeout, stream=True, **params)
        pieces = job.stream(timeout)
        request_single = not isinstance(inputs, list)
        return plain(pieces) if yields_plain_text(request_single, params) else pieces

    async def astream(self, inputs: Any, *, timeout: float | None = None,
                      **params: Any) -> AsyncIterator[str | StreamPiece]:
        """``stream()`` for ``async for`` (submitted when the iteration starts)."""
        from pipeq.streaming import yields_plain_text

        job = await self.asubmit(inputs, timeout=timeout, stream=True, **params)
        text_only = yields_plain_text(not isinstance(inputs, list), params)
        async for piece in job.astream(timeout):
            yield piece.text if text_only else piece

    async def acall(self, inputs: Any, *, timeout: float | None = None, **params: Any) -> Any:
        """``remote(inputs)`` awaited without blocking the event loop: the result."""
        job = await self.client.offload(
            lambda: self.submit(inputs, timeout=timeout, _watch=True, **params))
        return await job.aresult(timeout)

    def map(self, inputs: Iterable[Any], *, chunk_size: int = 64, max_in_flight: int = 8,
            on_error: str = "raise", timeout: float | None = None, cache: bool = False,
            **params: Any) -> Iterator[Any]:
        """Run every input of ``inputs`` (any iterable, read lazily); yield results in order.

        Inputs travel in chunks of ``chunk_size`` (one bulk-lane job each), with at most
        ``max_in_flight`` chunks submitted and not yet consumed. Each result is what the
        local pipeline's list call gives for that input. A failing input raises JobFailed
        when its turn comes (``on_error="raise"``) or is yielded as a ``pipeq.bulk.ItemError``
        (``on_error="record"``). ``cache=True`` answers inputs already answered within the
        result TTL (same route and parameters) from Redis. See ``pipeq.bulk.mapping.map_inputs``.
        """
        from pipeq.bulk.mapping import map_inputs  # loaded only by those who use it

        return map_inputs(self, inputs, chunk_size=chunk_size, max_in_flight=max_in_flight,
                          on_error=on_error, timeout=timeout, cache=cache, **params)

    def job(self, job_id: str) -> Job:
        """A handle on an earlier job of this route, by id."""
        return Job(self.client, job_id, self.route)

    def build_request(self, inputs: Any, params: dict[str, Any], timeout: float | None,
                      lane: Lane = "interactive", stream: bool = False) -> JobRequest:
        """Validate a call and build its message; raises ValidationError, enqueues nothing."""
        if stream:
            check_streamable(self.route, params)
        settings = self.client.settings
        job_id = new_job_id()
        prepared = prepare_inputs(
            self.task, inputs, job_id=job_id, keys=self.client.keys,
            limits=InputLimits(settings.max_input_chars, settings.max_inputs_per_job,
                               settings.payload_limit(self.route), settings.max_image_pixels),
            claim_check_bytes=settings.claim_check_bytes)
        clean = validate_params(self.task, params)
        wait = settings.default_timeout_s if timeout is None else timeout
        # inf would overflow the worker's and the waiter's Event.wait(): refuse it here.
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 < wait < math.inf:
            raise ValidationError(
                f"timeout must be a positive, finite number of seconds, got {timeout!r}")
        submitted = time.time()
        request = JobRequest(
            job_id=job_id, route=self.route, inputs=prepared.items, single=prepared.single,
            params=clean, submitted_at=submitted, deadline=submitted + wait,
            reply_to=self.client.waiter.reply_key, lane=lane, stream=stream,
        )
        request.claims.update(prepared.claims)  # stored by Client.send, just before publishing
        return request

    def check_workers(self, require_worker: bool | None = None) -> None:
        """Raise NoWorkerError when no live worker serves the route (unless not required)."""
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
            raise NoWorkerError(no_worker_message(self.route, "submit with require_worker=False"))


def check_streamable(route: Route, params: dict[str, Any]) -> None:
    """Raise StreamNotSupported unless jobs of ``route`` with ``params`` can stream."""
    if route.task != "text-generation":
        raise StreamNotSupported(
            f"streaming is for text-generation routes; {route.describe()} is "
            f"{route.task}: call it (or submit) without stream")
    beams = params.get("num_beams", 1)
    if isinstance(beams, int) and beams > 1:
        raise StreamNotSupported(
            f"cannot stream beam search (num_beams={beams}): transformers streams greedy "
            "and sampled generation only; drop num_beams, or call without streaming")


def no_worker_message(route: Route, queue_anyway: str) -> str:
    """What NoWorkerError says: how to start a worker, and (``queue_anyway``) how the caller
    queues the job for one that starts later, in the caller's own terms."""
    return (f"no live worker serves route {route.describe()}. Start one with "
            f"`{route.worker_command()}`, or {queue_anyway} to queue the job for a worker "
            "that starts later")


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
    if isinstance(exc, pydantic.ValidationError):
        return validation_problems(exc, locations=False)
    return str(exc)


def get_job(job_id: str, settings: Settings | None = None) -> Job:
    """A handle on any job by id (e.g. from another process).

    Every submitted job has a record from the start (PENDING while queued); an id nobody
    submitted here, or whose record expired, raises JobNotFound when asked about.
    """
    return Job(Client.for_settings(settings), job_id)


__all__ = ["RemotePipeline", "get_job", "no_worker_message", "pipeline"]
