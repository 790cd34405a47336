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
from collections.abc import Callable

import redis

from pipeq.core.keys import Keys

log = logging.getLogger("pipeq.leases")


class LeaseKeeper:
    """Refreshes kombu's unacked index for held messages every visibility_timeout / 8.

    An eighth, not less often: a renewal can come late (a busy machine, a Redis call that
    waits), and a message whose lease lapses while its job waits in the worker would be
    restored and run again by another worker (its record stays first-wins, but the work
    is done twice).
    """

    def __init__(self, client: redis.Redis, keys: Keys, visibility_timeout_s: float,
                 held_delivery_tags: Callable[[], list[str]]):
        self.held_delivery_tags = held_delivery_tags
        self.client = client
        self.keys = keys
        self.interval_s = max(0.25, visibility_timeout_s / 8)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeq-leases", daemon=True)

    def start(self) -> None:
        """Start refreshing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing (held messages then age normally)."""
        self._stop.set()

    def renew(self) -> int:
        """Refresh the delivery time of every held message now; returns how many."""
        tags = self.held_delivery_tags()
        if not tags:
            return 0
        now = time.time()
        # XX: only refresh entries that still exist (acked ones must not come back).
        self.client.zadd(self.keys.unacked_index(), dict.fromkeys(tags, now), xx=True)
        log.debug("renewed the leases of %d held message(s)", len(tags))
        return len(tags)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except redis.RedisError as exc:
                log.warning("could not renew message leases: %s", exc)
