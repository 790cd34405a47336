"""Keeping held messages from being redelivered while the worker still works on them.

Redis has no acks: kombu re-queues any delivered, unacknowledged message older than the
visibility timeout, counted from delivery (prefetch), not from start. A job that waits for
a batch and then runs long would run twice. The lease keeper refreshes the delivery time
of every message this worker holds, so only messages of a dead worker come back.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery.worker import state

from pipeq.core.keys import Keys

log = logging.getLogger("pipeq.leases")


def held_delivery_tags() -> list[str]:
    """Delivery tags of the messages this worker process holds (reserved or running)."""
    tags = []
    for request in list(state.reserved_requests) + list(state.active_requests):
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag:
            tags.append(str(tag))
    return sorted(set(tags))


class LeaseKeeper:
    """Refreshes kombu's unacked index for held messages every visibility_timeout / 4."""

    def __init__(self, client: redis.Redis, keys: Keys, visibility_timeout_s: float):
        self.client = client
        self.keys = keys
        self.interval_s = max(0.5, visibility_timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeq-leases", daemon=True)
        self.renewed = 0

    def start(self) -> None:
        """Start refreshing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing (held messages then age normally)."""
        self._stop.set()

    def renew(self) -> int:
        """Refresh the delivery time of every held message now; returns how many."""
        tags = held_delivery_tags()
        if not tags:
            return 0
        now = time.time()
        # XX: only refresh entries that still exist (acked ones must not come back).
        self.client.zadd(self.keys.unacked_index(), dict.fromkeys(tags, now), xx=True)
        self.renewed += len(tags)
        return len(tags)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except redis.RedisError as exc:
                log.warning("could not renew message leases: %s", exc)
