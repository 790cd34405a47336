"""pipeq's kombu transport: Redis, with atomic claims, rung restores and dead letters.

Celery's worker consumes through kombu's Redis transport; this one changes four things:

- messages are taken off a queue by a claim that records them as unacknowledged in the same
  atomic step (``pipeq.worker.broker.claiming``);
- a restored message (a dead worker's, after the visibility timeout) rings its route's
  doorbell, as a publish does (``pipeq.core.publish``), so waiting workers wake up;
- a queue item that is not a kombu message is kept in the dead-letter list with the reason,
  instead of stopping the whole worker ("Unrecoverable error": one stray ``LPUSH`` would take
  a route down);
- one Redis client per channel: kombu builds a new ``redis.Redis`` for every publish, ack
  and unacked record (measured: ~3 a job, each filling a 170-entry response-callback table);
- a reply to a control command (``celery inspect``, Flower's worker pages) expires when
  nobody reads it: a reply that arrives after its client stopped listening would otherwise
  stay in Redis for ever (see ``Keys.permanent``).

The transport is registered with kombu as ``pipeq`` (``broker_transport = "pipeq"``): a name,
so that ``celery inspect stats`` can report it. Its channel reads the deployment's key
prefix and fault-injection spec from the broker transport options (``pipeq_prefix``,
``pipeq_faults``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Message
from kombu.utils.json import dumps

from pipeq.core.celery_config import SENTINELS_OPTION
from pipeq.core.deadletters import DeadLetters
from pipeq.core.keys import Keys, bell_of
from pipeq.core.publish import RING_SCRIPT
from pipeq.worker.broker.claiming import ClaimingChannel, ClaimStart
from pipeq.worker.ops.faults import FaultInjector

log = logging.getLogger("pipeq.consumer")

#: The name ``broker_transport`` uses for this transport.
TRANSPORT_NAME = "pipeq"
#: The same on a Sentinel-managed Redis (``PIPEQ_REDIS_URL=sentinel://...``).
SENTINEL_TRANSPORT_NAME = "pipeq-sentinel"
#: Transport options carrying what the channel needs to know about the deployment.
PREFIX_OPTION = "pipeq_prefix"
FAULTS_OPTION = "pipeq_faults"
HOLDER_OPTION = "pipeq_holder"
#: {"task": the route's task name, "ttl_s": the records' TTL}: an idle worker's claim starts
#: the job it takes (``claiming.ClaimStart``); absent: the batcher starts every job.
CLAIM_START_OPTION = "pipeq_claim_start"
#: How a control reply queue's name ends (kombu's pidbox: ``<client oid>.reply.celery.pidbox``).
REPLY_QUEUE_SUFFIX = ".reply.celery.pidbox"
#: How long an unread control reply stays in Redis: clients wait seconds for replies (Flower
#: and ``celery inspect``: 1 to 10 s), and one read later is thrown away anyway.
REPLY_TTL_MS = 15_000


class NotAKombuMessage(Exception):
    """Raised when a queue item parses as JSON but is not a kombu message envelope."""

    def __init__(self, payload: Any, problem: str):
        super().__init__(problem)
        self.payload = payload


class CheckedMessage(Message):
    """kombu's message, refusing envelopes that lack what kombu and Celery rely on."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any):
        properties = payload.get("properties") if isinstance(payload, dict) else None
        if not isinstance(properties, dict) or "delivery_tag" not in properties:
            raise NotAKombuMessage(payload, "no properties.delivery_tag")
        if not isinstance(properties.get("delivery_info"), dict):
            raise NotAKombuMessage(payload, "no properties.delivery_info")
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # e.g. bad base64 body
            raise NotAKombuMessage(payload, f"{type(exc).__name__}: {exc}") from None


class PipeqChannel(ClaimingChannel, kombu_redis.Channel):
    """kombu's Redis channel with pipeq's claims, rung restores and dead letters."""

    Message = CheckedMessage
    _sync_client: Any = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        options = self.connection.client.transport_options
        self.keys = Keys(options.get(PREFIX_OPTION, "pipeq"))
        self.holder = str(options.get(HOLDER_OPTION) or "")
        start = options.get(CLAIM_START_OPTION)
        if start and self.holder:
            self.claim_start = ClaimStart(self.keys.result(""), str(start["task"]),
                                          int(start["ttl_s"]), self.holder)
        # An unprefixed client on the channel's pool: pipeq's own keys carry no broker prefix.
        self.plain_client = redis.Redis(connection_pool=self.pool)
        self.dead_letters = DeadLetters(self.plain_client, self.keys)
        faults = options.get(FAULTS_OPTION)
        self.faults = FaultInjector(faults) if faults else None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            # Celery closes a channel again after collecting its connection (the broker was
            # lost while messages were in hand): there is nothing to reach. kombu's close
            # ignores a connection error; the AttributeError kombu would raise instead
            # stopped the worker ("Unrecoverable error", seen in a Sentinel failover).
            raise redis.ConnectionError("the broker connection was closed")
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if not queue.endswith(REPLY_QUEUE_SUFFIX) or queue in (getattr(self, "_expires", None)
                                                               or {}):
            super()._put(queue, message, **kwargs)
            return
        # The client declared the reply queue with an expiry kombu only applies on its own
        # side; a worker replying here must not leave a key without one, not even for a
        # moment (a worker killed between two commands would): one MULTI writes both.
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        batch = kwargs.get("_publish_batch")
        if batch is not None:
            batch.add("lpush", key, dumps(message))
            batch.add("pexpire", key, REPLY_TTL_MS)
            return
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            pipe.lpush(key, dumps(message))
            pipe.pexpire(key, REPLY_TTL_MS)
            pipe.execute()

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        for queue in self._lookup(exchange, routing_key):
            pipe.eval(RING_SCRIPT, 1, self.global_keyprefix + bell_of(queue))

    def on_claimed(self, item: bytes) -> None:
        """Fault injection: may kill the process right after a claim (pipeq's fault tests)."""
        if self.faults is not None:
            self.faults.after_claim(item)

    def deliver_failed(self, item: bytes, exc: Exception) -> None:
        """A claimed item that is not a kombu message becomes a dead letter; anything else
        (a lost connection) goes on up to kombu."""
        if isinstance(exc, NotAKombuMessage):
            raw = json.dumps(exc.payload).encode()
            reason = f"queue item is not a kombu message ({exc})"
            self._forget_claim(exc.payload)
        elif isinstance(exc, ValueError):  # not JSON (kombu decodes with errors="replace")
            raw, reason = item, f"queue item is not JSON: {exc}"
        else:
            raise exc
        try:
            entry = self.dead_letters.add(reason, raw=raw)
            log.warning("dead letter %s: %s", entry.id, reason)
        except Exception:  # never let bookkeeping stop the consumer
            log.exception("could not record a dead letter (%s)", reason)

    def _forget_claim(self, payload: Any) -> None:
        """Drop the unacked entry of a claimed item that is being dead-lettered (else the
        visibility timeout would restore it, to be dead-lettered again)."""
        properties = payload.get("properties") if isinstance(payload, dict) else None
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        if isinstance(tag, str):
            self.qos._remove_from_indices(tag).execute()


class PipeqSentinelChannel(PipeqChannel, kombu_redis.SentinelChannel):
    """:class:`PipeqChannel` on the master a set of Redis sentinels names.

    kombu's sentinel channel asks the sentinels for the master whenever its pool makes a
    connection, and drops a connection to a master that became a replica (``READONLY``), so
    a worker reconnecting after a failover reaches the new master.
    """

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        # kombu reads the sentinels off the connection's alternate URLs; pipeq gives one URL
        # (see pipeq.worker.broker.app) and the sentinels in a transport option. Only this
        # call reads ``alt``: it is put back at once.
        client = self.connection.client
        sentinels = client.transport_options.get(SENTINELS_OPTION) or []
        kept = client.alt
        client.alt = [f"sentinel://{_netloc(host, port)}" for host, port in sentinels] or kept
        try:
            return super()._sentinel_managed_pool(asynchronous)
        finally:
            client.alt = kept


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`PipeqChannel`."""

    Channel = PipeqChannel


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Redis Sentinel transport with :class:`PipeqSentinelChannel`."""

    Channel = PipeqSentinelChannel


TRANSPORT_ALIASES[TRANSPORT_NAME] = f"{__name__}:Transport"
TRANSPORT_ALIASES[SENTINEL_TRANSPORT_NAME] = f"{__name__}:SentinelTransport"
