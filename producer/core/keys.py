"""Every Redis key and queue name pipeq uses, each computed by one method of :class:`Keys`.

Keys of pipeq itself start with ``<prefix>:``; keys kombu and Celery write (queues, the
unacked hash, bindings, control replies) start with ``<prefix>:celery:`` (kombu's
``global_keyprefix``), so deployments sharing one Redis database never see each other.

Every key expires or is deleted when it is no longer needed, except the few of
:meth:`Keys.permanent` (the README's "Redis keys" table lists them all).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

from pipeq.core.contract import Lane, Route

#: The lanes of a route, interactive first.
LANES: tuple[Lane, ...] = get_args(Lane)

#: Suffix of a route's bulk-lane queue after its interactive queue's name.
BULK_SUFFIX = ".bulk"


def bell_of(queue: str) -> str:
    """The doorbell list shared by a route's queues (both lanes), under the broker prefix:
    non-empty while one of them may hold a message (see ``pipeq.core.publish``)."""
    return queue.removesuffix(BULK_SUFFIX) + ".bell"


class Keys:
    """Names of every Redis key and queue pipeq uses, derived from one prefix."""

    def __init__(self, prefix: str = "pipeq"):
        self.prefix = prefix
        #: kombu's ``global_keyprefix``: prepended to every key Celery itself writes.
        self.broker_prefix = f"{prefix}:celery:"

    def permanent(self, routes: Iterable[Route] = ()) -> set[str]:
        """The keys a deployment whose workers served ``routes`` keeps for ever.

        pipeq's route table and each route's running totals (``pipeq metrics``), the
        dead-letter list (until ``pipeq dead purge``), and kombu's routing tables: one per
        route lane, the workers' control mailbox, and kombu's bookkeeping of the tables it
        sweeps (those of the event and reply queues of Flower and ``celery inspect``, deleted
        when their client closes, or swept two hours after it died). Every other key expires
        (job records, idempotency and cache entries, heartbeats, control replies) or is
        deleted when it empties (queues, doorbells, kombu's unacked records, payloads).
        """
        kombu = self.broker_prefix + "_kombu."
        names = {self.routes(), self.dead_letters(), kombu + "binding.celery.pidbox",
                 kombu + "binding.celeryev", kombu + "binding.reply.celery.pidbox",
                 kombu + "binding_deadlines"}
        for route in routes:
            names.add(self.route_stats(route))
            for lane in LANES:
                names.add(f"{kombu}binding.{self.queue_for(route, lane)}")
                names.add(f"{kombu}binding_permanent.{self.queue_for(route, lane)}")
        return names

    def queue(self, route: Route) -> str:
        """The Celery queue (a Redis list) of a route's interactive lane."""
        return f"{self.prefix}.q.{route.id}"

    def queue_for(self, route: Route, lane: Lane) -> str:
        """The Celery queue a job of ``lane`` ("interactive" or "bulk") is published to."""
        return self.queue(route) + (BULK_SUFFIX if lane == "bulk" else "")

    def lane_queue_key(self, route: Route, lane: Lane) -> str:
        """The Redis list holding the queued messages of one lane of a route."""
        return self.broker_prefix + self.queue_for(route, lane)

    def bell(self, route: Route) -> str:
        """The Redis list that rings while a route's queues may hold a message."""
        return self.broker_prefix + bell_of(self.queue(route))

    def unacked_index(self) -> str:
        """kombu's sorted set of delivered, not yet acknowledged messages (by delivery time)."""
        return self.broker_prefix + "unacked_index"

    def unacked(self) -> str:
        """kombu's hash of delivered, not yet acknowledged messages (delivery tag -> message)."""
        return self.broker_prefix + "unacked"

    def holders(self) -> str:
        """Sorted set of the workers holding messages, scored by when their lease expires
        (Redis's clock, ms): a holder past it has its messages handed over."""
        return f"{self.prefix}:holders"

    def owners(self) -> str:
        """Hash of held messages: delivery tag -> the holder that claimed it last."""
        return f"{self.prefix}:owners"

    def held(self, holder: str) -> str:
        """Hash of the messages one holder claimed: delivery tag -> where it came from."""
        return f"{self.prefix}:held:{holder}"

    def reaped(self, holder: str) -> str:
        """Set when a holder's lease expired and its messages were handed over: the holder
        learns of it when it reaches Redis again."""
        return f"{self.prefix}:reaped:{holder}"

    def task_name(self, route: Route) -> str:
        """The Celery task name of a route; carries the route so Flower can group by it."""
        return f"pipeq.run[{route.id}]"

    def bulk(self, bulk_id: str) -> str:
        """A bulk job's progress hash: totals, cancel flag, job ids of chunks in flight."""
        return f"{self.prefix}:bulk:{bulk_id}"

    def result(self, job_id: str) -> str:
        """The job record (state, result or error), stored with the result TTL."""
        return f"{self.prefix}:job:{job_id}"

    def stream(self, job_id: str) -> str:
        """A streaming job's Redis Stream of generated text (``pipeq.core.streams``): only
        jobs submitted to stream have one; bounded (``stream_maxlen``), and expiring with
        the result TTL."""
        return f"{self.prefix}:stream:{job_id}"

    def reply(self, client_id: str) -> str:
        """A producer's wake-up list: workers push finished job ids onto it."""
        return f"{self.prefix}:reply:{client_id}"

    def route_workers(self, route: Route) -> str:
        """Sorted set of live workers of a route, scored by heartbeat expiry time."""
        return f"{self.prefix}:route:{route.id}:workers"

    def routes(self) -> str:
        """Hash of every route a worker ever announced: route id -> route JSON."""
        return f"{self.prefix}:routes"

    def route_stats(self, route: Route) -> str:
        """Hash of a route's running totals (jobs by final state, inputs, batches, seconds)."""
        return f"{self.prefix}:route:{route.id}:stats"

    def worker_info(self, hostname: str) -> str:
        """A worker's self-description (JSON), expiring with its heartbeat."""
        return f"{self.prefix}:worker:{hostname}"

    def dead_letters(self) -> str:
        """The dead-letter list: poison messages with their reasons."""
        return f"{self.prefix}:dead"

    def idempotency(self, key: str) -> str:
        """Maps a caller's idempotency key to the job id it created."""
        return f"{self.prefix}:idem:{key}"

    def cache(self, digest: str) -> str:
        """A bulk result-cache entry: the answer to one input of a route (``pipeq.bulk``)."""
        return f"{self.prefix}:cache:{digest}"

    def payload(self, job_id: str, part: int) -> str:
        """A job's claim-checked media payload (raw bytes); deleted when the job ends."""
        return f"{self.prefix}:payload:{job_id}:{part}"

    def gateway_job(self, job_id: str) -> str:
        """A job submitted through the HTTP gateway: its owner (API key name) and route."""
        return f"{self.prefix}:gw:job:{job_id}"

    def gateway_idempotency(self, owner: str) -> str:
        """Prefix of an API key's idempotency keys (each key's own namespace)."""
        return f"gw:{owner}:"

    def rate_window(self, owner: str, window: int) -> str:
        """An API key's request count in one rate-limit window (a minute)."""
        return f"{self.prefix}:gw:rate:{owner}:{window}"

    def webhook(self, job_id: str) -> str:
        """A job's webhook delivery: URL, owner, attempts, last error."""
        return f"{self.prefix}:gw:hook:{job_id}"

    def webhook_outbox(self) -> str:
        """Sorted set of webhooks to check or deliver, scored by when to look next."""
        return f"{self.prefix}:gw:outbox"

    def webhook_dead(self) -> str:
        """Webhooks given up on after ``webhook_retry_for_s`` (newest first)."""
        return f"{self.prefix}:gw:hooks:dead"

    def webhook_stats(self) -> str:
        """Hash of webhook totals: delivered, attempts, failed attempts, dead-lettered."""
        return f"{self.prefix}:gw:hooks:stats"
