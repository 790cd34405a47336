"""kombu's Redis transport, ringing a route's doorbell whenever it queues a message.

A pipeq worker serves two queues of its route (interactive and bulk lanes) and must wait for
either without taking a message off the queue before it can record it (worker/claiming.py).
Redis has no command that blocks on several lists without popping, so every queue write
(publish, and the restore of a dead worker's message) also rings the route's *doorbell*: a
list of at most one item that exists while one of its queues may hold a message. Workers
wait on it with ``BLMOVE bell bell`` (nothing is taken) and the worker's claim deletes it
when it leaves the queues empty. A message put on a queue by anything else (a plain Celery
client) is still served, at the latest one broker poll (1 s) later.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from .contract import bell_of

#: KEYS[1] the doorbell: given one item unless it has one already.
RING_SCRIPT = "if redis.call('LLEN', KEYS[1]) == 0 then redis.call('LPUSH', KEYS[1], '1') end"


class RingingChannel(kombu_redis.Channel):
    """kombu's Redis channel; each queue write also rings the queue's doorbell.

    It also keeps one client for its pool: kombu builds a new ``redis.Redis`` for every
    publish, ack and unacked record (measured: ~3 a job, each filling a 170-entry
    response-callback table), which was the largest CPU cost per job in a worker. A client
    is thread-safe (each command takes a connection from the pool).
    """

    _sync_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client

    def _bell_key(self, queue: str) -> str:
        return self.global_keyprefix + bell_of(queue)

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if self._expires and queue in self._expires:  # not pipeq's queues: kombu's own way
            super()._put(queue, message, **kwargs)
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        publish_batch = kwargs.pop("_publish_batch", None)
        if publish_batch is not None:
            publish_batch.add("lpush", key, dumps(message))
            publish_batch.add("eval", RING_SCRIPT, 1, self._bell_key(queue))
            return
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, dumps(message))  # (the prefixed client adds the key prefix)
            pipe.eval(RING_SCRIPT, 1, self._bell_key(queue))
            pipe.execute()

    def _do_restore_message(self, payload: Any, exchange: str, routing_key: str, pipe: Any,
                            leftmost: bool = False) -> None:
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        for queue in self._lookup(exchange, routing_key):
            pipe.eval(RING_SCRIPT, 1, self._bell_key(queue))


class _ShownAsScheme(type):
    """Shows a transport class as its URL scheme (Celery logs "Connected to redis://...")."""

    scheme = "redis"

    def __str__(cls) -> str:
        return cls.scheme


def ringing_transport(scheme: str = "redis", channel: type[kombu_redis.Channel] = RingingChannel
                      ) -> type[kombu_redis.Transport]:
    """A Redis transport class (shown as ``scheme``) whose channels are ``channel``."""

    class Transport(kombu_redis.Transport, metaclass=_ShownAsScheme):
        """kombu's Redis transport with pipeq's channel."""

        Channel = channel

    Transport.scheme = scheme
    return Transport
