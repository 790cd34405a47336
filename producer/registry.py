"""Which workers serve which routes: heartbeats written by workers, read by producers.

Each worker process keeps a score (its heartbeat's expiry time) in the sorted set of its
route and a JSON self-description under its hostname, refreshed every ``heartbeat_s``.
A worker that dies stops refreshing and drops out after three missed beats.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from .contract import Keys, Route

MISSED_BEATS = 3


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker says about itself in its heartbeat."""

    hostname: str
    route: Route
    device: str
    ready: bool
    pid: int
    started_at: float
    last_beat: float
    extra: dict[str, Any]


class Registry:
    """Worker announcements in Redis, with a short producer-side cache of liveness."""

    def __init__(self, client: redis.Redis, keys: Keys, heartbeat_s: float):
        self.client = client
        self.keys = keys
        self.heartbeat_s = heartbeat_s
        self._cache: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    # worker side
    def announce(self, info: WorkerInfo) -> None:
        """Publish (or refresh) a worker's heartbeat for its route."""
        ttl = self.heartbeat_s * MISSED_BEATS
        body = {
            "hostname": info.hostname,
            "route": info.route.model_dump(),
            "device": info.device,
            "ready": info.ready,
            "pid": info.pid,
            "started_at": info.started_at,
            "last_beat": info.last_beat,
            **info.extra,
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.route_workers(info.route), {info.hostname: info.last_beat + ttl})
        pipe.hset(self.keys.routes(), info.route.id, info.route.model_dump_json())
        pipe.set(self.keys.worker_info(info.hostname), json.dumps(body), px=int(ttl * 1000))
        pipe.execute()

    def withdraw(self, hostname: str, route: Route) -> None:
        """Remove a stopping worker at once, so producers stop routing to it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.keys.route_workers(route), hostname)
        pipe.delete(self.keys.worker_info(hostname))
        pipe.execute()

    # producer side
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

    def known_routes(self) -> list[Route]:
        """Every route a worker has announced (live or not)."""
        raw = self.client.hgetall(self.keys.routes())
        return [Route.model_validate_json(v) for v in raw.values()]

    def workers(self, route: Route) -> list[dict[str, Any]]:
        """Self-descriptions of the live workers of ``route``."""
        names = self.client.zrangebyscore(self.keys.route_workers(route), time.time(), "+inf")
        if not names:
            return []
        infos = self.client.mget([self.keys.worker_info(_text(n)) for n in names])
        return [json.loads(i) for i in infos if i]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
