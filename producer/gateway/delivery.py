"""Delivering completion webhooks from the Redis outbox, at least once.

One loop per gateway process claims due outbox entries (``webhook_claim.lua``: a claim is a
lease, so a replica that dies lets its claims fall due again), reads their jobs' records in
one round trip, puts back those still running, and POSTs the outcome of the ended ones,
signed per Standard Webhooks. A delivery that fails is retried with exponential backoff
and jitter until ``webhook_retry_for_s`` has passed since the job ended; then it is
dead-lettered (``Keys.webhook_dead``), counted, and shown by ``pipeq status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import httpx

from pipeq.core.contract import JobState
from pipeq.core.redis_io import as_text, load_lua
from pipeq.core.store import JobRecord
from pipeq.errors import ValidationError
from pipeq.gateway.schemas import RouteOut, view
from pipeq.gateway.webhooks import check_url, secret_key, signed_headers

if TYPE_CHECKING:
    from pipeq.gateway.service import GatewayService

log = logging.getLogger("pipeq.gateway.webhooks")

CLAIM_SCRIPT = load_lua("webhook_claim.lua")
#: How often a webhook whose job is still running is looked at again (seconds).
RUNNING_POLL_S = 0.5
#: Outbox entries claimed per round trip; the longest retry delay (seconds).
CLAIM_BATCH = 100
MAX_BACKOFF_S = 3600.0
#: POSTs one gateway process has in flight at most (a backlog drains at this width).
MAX_IN_FLIGHT = 64


class Deliverer:
    """The outbox loop of one gateway process."""

    def __init__(self, service: GatewayService):
        self.service = service
        self.settings = service.settings
        self.keys = service.keys
        self.redis = service.client.redis
        self._claim = self.redis.register_script(CLAIM_SCRIPT)
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    def stop(self) -> None:
        """End the loop (claims in hand fall due again when their lease ends)."""
        self._stopping.set()

    async def run(self) -> None:
        """Claim and deliver until stopped; Redis errors are logged and retried."""
        key = secret_key(self.settings.webhook_secret.get_secret_value()
                         if self.settings.webhook_secret else "")
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s,
                                     follow_redirects=False) as http:
            while not self._stopping.is_set():
                try:
                    busy = await self._round(http, key)
                except Exception as exc:  # Redis away: the outbox waits for it
                    log.warning("webhook outbox: %s; retrying", exc)
                    busy = False
                if not busy:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), 0.2)

    async def _round(self, http: httpx.AsyncClient, key: bytes) -> bool:
        now = time.time()
        lease = now + self.settings.webhook_timeout_s + 10
        due = [as_text(j) for j in await self.service.redis(lambda: self._claim(
            keys=[self.keys.webhook_outbox()], args=[now, lease, CLAIM_BATCH]))]
        if not due:
            return False
        records = await self.service.redis(lambda: self.service.client.store.get_many(due))
        hooks = await self.service.redis(lambda: self._hooks(due))
        later: dict[str, float] = {}
        for job_id, record, hook in zip(due, records, hooks, strict=True):
            if record is not None and not record.state.is_final:
                later[job_id] = time.time() + RUNNING_POLL_S
            else:
                await self._slots.acquire()  # claimed entries wait here, under their lease
                task = asyncio.create_task(self._deliver(http, key, job_id, record, hook))
                task.add_done_callback(lambda _: self._slots.release())
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
        if later:
            await self.service.redis(lambda: self.redis.zadd(self.keys.webhook_outbox(), later))
        return len(due) == CLAIM_BATCH

    def _hooks(self, job_ids: list[str]) -> list[dict[str, str]]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(self.keys.webhook(job_id))
            pipe.hgetall(self.keys.gateway_job(job_id))
        rows = pipe.execute()
        out = []
        for hook, job in zip(rows[::2], rows[1::2], strict=True):
            fields = {as_text(k): as_text(v) for k, v in {**job, **hook}.items()}
            out.append(fields)
        return out

    async def _deliver(self, http: httpx.AsyncClient, key: bytes, job_id: str,
                       record: JobRecord | None, hook: dict[str, str]) -> None:
        url = hook.get("url")
        if not url:  # the webhook's hash expired: nothing left to send
            await self.service.redis(lambda: self.redis.zrem(self.keys.webhook_outbox(), job_id))
            return
        body = payload(job_id, record, hook)
        attempt = int(hook.get("attempts", 0)) + 1
        try:
            await self.service.client.offload(
                lambda: check_url(url, self.settings.webhook_allow_private))
            response = await http.post(url, content=body,
                                       headers=signed_headers(key, f"msg_{job_id}", body))
            error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        except ValidationError as exc:
            await self._dead(job_id, hook, attempt, str(exc))
            return
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error is None:
            await self.service.redis(lambda: self._delivered(job_id))
            log.info("webhook of job %s delivered (attempt %d)", job_id, attempt)
            return
        await self._retry(job_id, hook, attempt, error)

    def _delivered(self, job_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.keys.webhook_outbox(), job_id)
        pipe.delete(self.keys.webhook(job_id))
        pipe.hincrby(self.keys.webhook_stats(), "delivered", 1)
        pipe.hincrby(self.keys.webhook_stats(), "attempts", 1)
        pipe.execute()

    async def _retry(self, job_id: str, hook: dict[str, str], attempt: int, error: str) -> None:
        ended = float(hook.get("ended") or time.time())
        delay = min(self.settings.webhook_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        delay *= random.uniform(0.5, 1.0)
        if time.time() + delay - ended > self.settings.webhook_retry_for_s:
            await self._dead(job_id, hook, attempt, error)
            return
        log.info("webhook of job %s: attempt %d failed (%s); next in %.1fs", job_id, attempt,
                 error, delay)

        def reschedule() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(self.keys.webhook(job_id), mapping={
                "attempts": attempt, "ended": f"{ended:.3f}", "last_error": error})
            pipe.hincrby(self.keys.webhook_stats(), "attempts", 1)
            pipe.hincrby(self.keys.webhook_stats(), "failed_attempts", 1)
            pipe.zadd(self.keys.webhook_outbox(), {job_id: time.time() + delay})
            pipe.execute()

        await self.service.redis(reschedule)

    async def _dead(self, job_id: str, hook: dict[str, str], attempt: int, error: str) -> None:
        log.warning("webhook of job %s dead-lettered after %d attempt(s): %s", job_id, attempt,
                    error)
        entry = json.dumps({"job_id": job_id, "url": hook.get("url"), "owner": hook.get("owner"),
                            "attempts": attempt, "error": error, "at": time.time()})

        def bury() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.lpush(self.keys.webhook_dead(), entry)
            pipe.zrem(self.keys.webhook_outbox(), job_id)
            pipe.delete(self.keys.webhook(job_id))
            pipe.hincrby(self.keys.webhook_stats(), "failed_attempts", 1)
            pipe.hincrby(self.keys.webhook_stats(), "attempts", 1)
            pipe.execute()

        await self.service.redis(bury)


def payload(job_id: str, record: JobRecord | None, hook: dict[str, str]) -> bytes:
    """The webhook body: ``{"type": "job.<state>", "timestamp", "data": <the job>}``."""
    route = RouteOut(task=hook.get("task", ""), model=hook.get("model", ""),
                     revision=hook.get("revision") or None)
    if record is None:  # the job's record vanished (expired, or Redis lost it)
        record = JobRecord(job_id, state=JobState.FAILURE, error={
            "type": "JobLost", "message": "the job's record vanished before its webhook was "
                                          "sent", "retryable": True})
    job: dict[str, Any] = view(job_id, route, record, webhook=hook.get("url")
                               ).model_dump(mode="json")
    event = {"type": f"job.{record.state.value.lower()}",
             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data": job}
    return json.dumps(event, separators=(",", ":")).encode()
