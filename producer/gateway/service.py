"""What the gateway's endpoints do, on the Python client's own objects.

Jobs are submitted, read and cancelled through :class:`~pipeq.remote.RemotePipeline`,
:class:`~pipeq.job.Job` and the process's shared :class:`~pipeq.client.Client`; every
blocking Redis call runs on the client's own threads (``Client.offload``). A job submitted
here has a gateway record (``Keys.gateway_job``) naming its owner (the API key) and route:
another key asking for it gets the same 404 as for an id that never existed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pipeq.client import Client
from pipeq.core.config import Settings
from pipeq.core.contract import JobState
from pipeq.core.redis_io import as_text
from pipeq.core.store import JobRecord
from pipeq.errors import ValidationError
from pipeq.gateway.auth import ApiKey, KeyRing, RateLimiter
from pipeq.gateway.problems import Problem, not_found
from pipeq.gateway.schemas import JobIn, JobOut, RouteOut, view
from pipeq.gateway.webhooks import Outbox, check_url
from pipeq.gateway.wire import check_media_inputs
from pipeq.job import Job
from pipeq.remote import RemotePipeline, pipeline

#: submit()'s own keyword arguments: a call parameter of the same name is refused.
RESERVED_PARAMETERS = frozenset({"timeout", "require_worker", "idempotency_key", "_watch",
                                 "stream"})
#: Remote pipelines kept (their live-worker cache); beyond this the cache starts again.
MAX_REMOTES = 1024


class GatewayService:
    """The gateway's jobs, keys and rate limits on one deployment."""

    def __init__(self, settings: Settings, keyring: KeyRing | None):
        self.settings = settings
        self.client = Client.for_settings(settings)
        self.keys = settings.keys
        #: None: ``--no-auth`` (every caller is the anonymous key).
        self.keyring = keyring
        self.limiter = RateLimiter(self.client.redis, self.keys)
        self.outbox = Outbox(self.client.redis, self.keys,
                             settings.result_ttl_s + settings.webhook_retry_for_s)
        self._remotes: dict[tuple[str, str, str | None], RemotePipeline] = {}

    async def redis(self, action: Any) -> Any:
        """A Redis call on the client's threads, with its bounded retry."""
        return await self.client.offload(lambda: self.client.call_redis(action))

    async def rate_limit(self, key: ApiKey) -> None:
        """429 when ``key`` is over its rate limit."""
        retry_after = await self.redis(lambda: self.limiter.take(key))
        if retry_after is not None:
            raise Problem(429, "Too many requests",
                          f"API key {key.name!r} is over its limit of "
                          f"{key.rate_limit_per_minute} requests per minute", "RateLimited",
                          retry_after=retry_after)

    def remote(self, body: JobIn) -> RemotePipeline:
        """The remote pipeline of the job's route (ValidationError for a bad route)."""
        ident = (body.task, body.model, body.revision)
        remote = self._remotes.get(ident)
        if remote is None:
            remote = pipeline(body.task, model=body.model, revision=body.revision,
                              settings=self.settings)
            if len(self._remotes) >= MAX_REMOTES:
                self._remotes.clear()
            self._remotes[ident] = remote
        return remote

    async def submit(self, key: ApiKey, body: JobIn, wait_s: float) -> tuple[JobOut, bool]:
        """Enqueue a job; with ``wait_s`` > 0 wait that long for it. (view, final?)"""
        remote = self.remote(body)
        if not key.allows(remote.route):
            raise Problem(403, "Route not allowed", f"API key {key.name!r} may not use route "
                          f"{remote.route.describe()}", "RouteNotAllowed")
        check_media_inputs(remote.task, body.inputs)
        clash = sorted(RESERVED_PARAMETERS & set(body.parameters))
        if clash:
            raise ValidationError(f"parameters {clash} are not call parameters: give the "
                                  "job's deadline as the top-level 'timeout' field, and "
                                  "streaming as the top-level 'stream' field")
        webhook = body.webhook or key.webhook_url
        if webhook is not None:
            if self.settings.webhook_secret is None:
                raise ValidationError("this gateway sends no webhooks: it has no "
                                      "PIPEQ_WEBHOOK_SECRET")
            await self.client.offload(
                lambda: check_url(webhook, self.settings.webhook_allow_private))
        idem = (self.keys.gateway_idempotency(key.name) + body.idempotency_key
                if body.idempotency_key else None)
        watch = wait_s > 0
        route = RouteOut(task=remote.task, model=remote.model, revision=remote.route.revision)

        def submit() -> Job:  # one trip to the client's threads: enqueue, then record
            job = remote.submit(body.inputs, timeout=body.timeout, idempotency_key=idem,
                                stream=body.stream, _watch=watch, **body.parameters)
            # A repeated idempotency key gives the first job back: its record (and webhook)
            # stands; writing them again would send its webhook twice.
            if idem is None or not self.client.call_redis(
                    lambda: self.client.redis.exists(self.keys.gateway_job(job.id))):
                self.client.call_redis(lambda: self._record(job.id, key, route, webhook,
                                                            body.stream))
            return job

        job = await self.client.offload(submit)
        if watch:
            record = await self._wait(job, wait_s)
            if record is not None:
                return view(job.id, route, record, webhook=webhook), True
        return view(job.id, route, None, webhook=webhook), False

    def _record(self, job_id: str, key: ApiKey, route: RouteOut, webhook: str | None,
                stream: bool = False) -> None:
        name = self.keys.gateway_job(job_id)
        pipe = self.client.redis.pipeline(transaction=True)
        pipe.hset(name, mapping={"owner": key.name, "task": route.task, "model": route.model,
                                 "revision": route.revision or "", "webhook": webhook or "",
                                 "stream": "1" if stream else ""})
        pipe.expire(name, self.settings.result_ttl_s)
        if webhook is not None:
            self.outbox.add(pipe, job_id, webhook, key.name)
        pipe.execute()

    async def _wait(self, job: Job, wait_s: float) -> JobRecord | None:
        """The job's final record if it ends within ``wait_s``, else None."""
        future, unseen = job.watch()
        if unseen:
            record = await self.redis(lambda: self.client.store.get(job.id))
            if record is not None and record.state.is_final:
                self.client.waiter.resolve(record)
            elif record is not None:
                self.client.waiter.mark_published(job.id)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), wait_s)
        except TimeoutError:
            return None

    async def owned(self, key: ApiKey, job_id: str) -> tuple[RouteOut, str | None]:
        """The route and webhook of a job of ``key``; 404 if it has none such."""
        fields = await self._owned_fields(key, job_id)
        return _route_of(fields), fields.get("webhook") or None

    async def streaming(self, key: ApiKey, job_id: str) -> tuple[RouteOut, str | None]:
        """``owned()`` for a job submitted with ``stream``; 409 for one submitted without."""
        fields = await self._owned_fields(key, job_id)
        if not fields.get("stream"):
            raise Problem(409, "Job does not stream", f"job {job_id} was submitted without "
                          "\"stream\": true; read its result from /v1/jobs/{id} instead",
                          "StreamNotSupported")
        return _route_of(fields), fields.get("webhook") or None

    async def _owned_fields(self, key: ApiKey, job_id: str) -> dict[str, str]:
        if not job_id or len(job_id) > 128:
            raise not_found(job_id[:128])
        raw = await self.redis(lambda: self.client.redis.hgetall(self.keys.gateway_job(job_id)))
        fields = {as_text(k): as_text(v) for k, v in raw.items()}
        if fields.get("owner") != key.name:
            raise not_found(job_id)
        return fields

    async def get(self, key: ApiKey, job_id: str, wait_s: float = 0) -> tuple[JobOut, bool]:
        """A job of ``key`` (waiting up to ``wait_s`` for it to end). (view, final?)"""
        route, webhook = await self.owned(key, job_id)
        record = await self.redis(lambda: self.client.store.get(job_id))
        if record is None:
            raise not_found(job_id)
        if wait_s > 0 and not record.state.is_final:
            job = Job(self.client, job_id)
            record = await self._wait(job, wait_s) or record
        return view(job_id, route, record, webhook=webhook), record.state.is_final

    async def cancel(self, key: ApiKey, job_id: str) -> tuple[JobOut, bool]:
        """Cancel a job of ``key``. (view after, True if it will not run)"""
        route, webhook = await self.owned(key, job_id)
        job = Job(self.client, job_id)
        will_not_run = await job.acancel()
        record = await self.redis(lambda: self.client.store.get(job_id))
        return view(job_id, route, record, JobState.CANCELLED, webhook=webhook), will_not_run

    async def state(self, job_id: str) -> JobRecord | None:
        """A job's record (no ownership check: the caller made it)."""
        record: JobRecord | None = await self.redis(lambda: self.client.store.get(job_id))
        return record

    async def routes(self, key: ApiKey) -> list[dict[str, Any]]:
        """Routes (with workers and queue depth) this key may use."""
        from pipeq.ops.status import deployment_status

        statuses = await self.redis(lambda: deployment_status(self.settings, self.client.redis))
        return [s.as_dict() for s in statuses if key.allows(s.route)]

    async def ready(self) -> str | None:
        """None when Redis answers, else why not (no retry: a probe must be quick)."""
        started = time.monotonic()
        try:
            await self.client.offload(self.client.redis.ping)
        except Exception as exc:
            return f"Redis does not answer ({type(exc).__name__}: {exc}) after " \
                   f"{time.monotonic() - started:.1f}s"
        return None


def _route_of(fields: dict[str, str]) -> RouteOut:
    """The route stored with a gateway job."""
    return RouteOut(task=fields.get("task", ""), model=fields.get("model", ""),
                    revision=fields.get("revision") or None)
