"""Which workers serve which routes, as their heartbeats say (the reading side).

Each worker process keeps a score (its heartbeat's expiry time) in the sorted set of its
route (``Keys.route_workers``) and a JSON self-description under its hostname
(``Keys.worker_info``), refreshed every ``heartbeat_s`` (``pipeq.worker.ops.heartbeat``). A
worker that dies stops refreshing and drops out after ``MISSED_BEATS`` missed beats.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis

from pipeq.core.contract import Route
from pipeq.core.keys import Keys
from pipeq.core.redis_io import as_text

#: Heartbeats a worker may miss before it counts as gone.
MISSED_BEATS = 3


class Registry:
    """Worker announcements in Redis, with a short producer-side cache of liveness."""

    def __init__(self, client: redis.Redis, keys: Keys, heartbeat_s: float):
        self.client = client
        self.keys = keys
        self.heartbeat_s = heartbeat_s
        self._cache: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    @property
    def beat_ttl_s(self) -> float:
        """How long one heartbeat keeps a worker alive."""
        return self.heartbeat_s * MISSED_BEATS

    def live_count(self, route: Route, max_age_s: float = 1.0) -> int:
        """How many live workers serve ``route`` (cached for ``max_age_s``)."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(route.id)
        if cached and now - cached[0] < max_age_s:
            return cached[1]
        count = int(self.client.zcount(self.keys.route_workers(route), time.time(), "+inf"))
        with self._lock:
            self._cache[route.id] = (now, count)
        return count

    def live_hostnames(self, route: Route) -> set[str]:
        """Hostnames of the live workers of ``route``."""
        names = self.client.zrangebyscore(self.keys.route_workers(route), time.time(), "+inf")
        return {as_text(n) for n in names}

    def known_routes(self) -> list[Route]:
        """Every route a worker has announced (live or not)."""
        raw = self.client.hgetall(self.keys.routes())
        return [Route.model_validate_json(v) for v in raw.values()]

    def workers(self, route: Route) -> list[dict[str, Any]]:
        """Self-descriptions of the live workers of ``route``."""
        names = sorted(self.live_hostnames(route))
        if not names:
            return []
        infos = self.client.mget([self.keys.worker_info(n) for n in names])
        return [json.loads(i) for i in infos if i]
