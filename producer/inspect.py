"""What is going on in a deployment: routes, workers, queue depth and oldest job age."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, get_args

import redis

from .config import Settings
from .contract import Keys, Lane, Route
from .registry import Registry


@dataclass
class RouteStatus:
    """One route's health: its live workers, queue depth and oldest queued job's age."""

    route: Route
    configured: bool
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: Jobs waiting in all the route's queues (lanes) together.
    queue_depth: int = 0
    oldest_age_s: float | None = None
    #: Jobs waiting per lane ("interactive", "bulk").
    lane_depths: dict[str, int] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        """True when at least one ready worker serves the route."""
        return any(w.get("ready") for w in self.workers)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "route": self.route.describe(), "route_id": self.route.id,
            "configured": self.configured, "healthy": self.healthy,
            "queue_depth": self.queue_depth, "oldest_age_s": self.oldest_age_s,
            "lane_depths": self.lane_depths, "workers": self.workers,
        }


LANES: tuple[Lane, ...] = get_args(Lane)


def _lane_key(keys: Keys, route: Route, lane: Lane) -> str:
    return keys.broker_prefix + keys.queue_for(route, lane)


def lane_depths(client: redis.Redis, keys: Keys, route: Route) -> dict[str, int]:
    """Messages waiting in each lane's queue of a route (not those held by workers)."""
    pipe = client.pipeline(transaction=False)
    for lane in LANES:
        pipe.llen(_lane_key(keys, route, lane))
    return {lane: int(n) for lane, n in zip(LANES, pipe.execute(), strict=True)}


def queue_depth(client: redis.Redis, keys: Keys, route: Route) -> int:
    """Messages waiting in a route's queues, all lanes together."""
    return sum(lane_depths(client, keys, route).values())


def oldest_age(client: redis.Redis, keys: Keys, route: Route) -> float | None:
    """Seconds since the oldest queued job of a route was submitted (None if empty)."""
    ages = [age for lane in LANES
            if (age := _oldest_in(client, _lane_key(keys, route, lane))) is not None]
    return max(ages, default=None)


def _oldest_in(client: redis.Redis, queue_key: str) -> float | None:
    raw = client.lindex(queue_key, -1)  # kombu pushes left, pops right
    if raw is None:
        return None
    try:
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        submitted = float(body[1]["request"]["submitted_at"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return max(0.0, time.time() - submitted)


def deployment_status(settings: Settings, client: redis.Redis,
                      only: Route | None = None) -> list[RouteStatus]:
    """Status of every configured or announced route (or only ``only``)."""
    keys = settings.keys
    registry = Registry(client, keys, settings.heartbeat_s)
    configured = {spec.route for spec in settings.routes}
    routes = [only] if only else sorted(configured | set(registry.known_routes()),
                                        key=lambda r: r.describe())
    statuses = []
    for route in routes:
        depths = lane_depths(client, keys, route)
        statuses.append(RouteStatus(
            route=route, configured=route in configured, workers=_with_beat_age(registry, route),
            queue_depth=sum(depths.values()), oldest_age_s=oldest_age(client, keys, route),
            lane_depths=depths,
        ))
    return statuses


def _with_beat_age(registry: Registry, route: Route) -> list[dict[str, Any]]:
    """Live workers of ``route``, each with the age of its last heartbeat."""
    now = time.time()
    workers = registry.workers(route)
    for worker in workers:
        worker["last_beat_age_s"] = round(max(0.0, now - float(worker.get("last_beat", now))), 3)
    return workers
