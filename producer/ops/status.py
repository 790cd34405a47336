"""What is going on in a deployment: routes, workers, queue depth and oldest job age.

Routes come from the routing table, from workers' announcements and from the queues that
exist under the deployment's prefix (jobs queued for a route nobody configured or serves).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import click
import redis

from pipeq.core.config import Settings
from pipeq.core.contract import Route
from pipeq.core.keys import BULK_SUFFIX, LANES, Keys
from pipeq.core.publish import queued_request
from pipeq.core.redis_io import as_text, connect
from pipeq.core.registry import Registry
from pipeq.errors import BrokerUnavailable
from pipeq.ops.exits import Exit


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


def lane_depths(client: redis.Redis, keys: Keys, route: Route) -> dict[str, int]:
    """Messages waiting in each lane's queue of a route (not those held by workers)."""
    pipe = client.pipeline(transaction=False)
    for lane in LANES:
        pipe.llen(keys.lane_queue_key(route, lane))
    return {lane: int(n) for lane, n in zip(LANES, pipe.execute(), strict=True)}


def oldest_age(client: redis.Redis, keys: Keys, route: Route) -> float | None:
    """Seconds since the oldest queued job of a route was submitted (None if empty)."""
    ages = [age for lane in LANES
            if (age := _oldest_in(client, keys.lane_queue_key(route, lane))) is not None]
    return max(ages, default=None)


def _oldest_in(client: redis.Redis, queue_key: str) -> float | None:
    raw = client.lindex(queue_key, -1)  # messages are pushed left, taken right
    request = queued_request(raw) if raw is not None else None
    try:
        submitted = float(request["submitted_at"]) if request else None
    except (KeyError, TypeError, ValueError):
        return None
    return None if submitted is None else max(0.0, time.time() - submitted)


def queued_routes(client: redis.Redis, keys: Keys) -> set[Route]:
    """Routes with jobs waiting in a queue under the prefix, read from their oldest message:
    a route no worker announced and no routing table names is still seen."""
    found: set[Route] = set()
    seen: set[str] = set()
    for key in client.scan_iter(match=f"{keys.broker_prefix}{keys.prefix}.q.*", count=1000):
        name = as_text(key)
        queue = name.removesuffix(BULK_SUFFIX)
        if name.endswith(".bell") or queue in seen:
            continue
        seen.add(queue)
        route = _route_of(client.lindex(name, -1))
        if route is not None:
            found.add(route)
    return found


def _route_of(raw: Any) -> Route | None:
    request = queued_request(raw) if raw is not None else None
    try:
        return Route.model_validate(request["route"]) if request else None
    except (KeyError, TypeError, ValueError):  # not a pipeq job: nothing to report
        return None


def deployment_status(settings: Settings, client: redis.Redis,
                      only: Route | None = None) -> list[RouteStatus]:
    """Status of every configured, announced or queued-for route (or only ``only``)."""
    keys = settings.keys
    registry = Registry(client, keys, settings.heartbeat_s)
    configured = {spec.route for spec in settings.routes}
    routes = [only] if only else sorted(
        configured | set(registry.known_routes()) | queued_routes(client, keys),
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


def print_status(settings: Settings, task: str | None, model: str | None,
                 revision: str | None, as_json: bool) -> int:
    """``pipeq status``: print every route's status; the exit code (3 when one is down).

    With a task and model (a container's health check) the route is named as a producer
    names it (``pipeq.pipeline``), and a producer's own check of live workers must pass too:
    a health check and a producer never disagree on which route a worker serves.
    """
    remote = None
    if task and model:
        from pipeq.remote import pipeline

        remote = pipeline(task, model=model, revision=revision, settings=settings)
    only = remote.route if remote is not None else None
    client = connect(settings, socket_timeout_s=10)
    try:
        statuses = deployment_status(settings, client, only)
        pending, dead = webhook_counts(client, settings)
    except redis.RedisError as exc:
        raise BrokerUnavailable(f"cannot read status from Redis: {exc}") from exc
    if remote is not None and any(s.healthy for s in statuses):
        remote.check_workers(require_worker=True)  # NoWorkerError: exit 3, saying why
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in statuses], indent=2, default=str))
    else:
        for line in _lines(statuses):
            click.echo(line)
        if pending or dead:
            click.echo(f"webhooks: {pending} pending, {dead} dead-lettered"
                       + (" (gave up after PIPEQ_WEBHOOK_RETRY_FOR_S; listed under "
                          f"{settings.keys.webhook_dead()})" if dead else ""))
    unhealthy = [s for s in statuses if (s.configured or only) and not s.healthy]
    return Exit.NO_WORKER if unhealthy or (only and not statuses) else Exit.OK


def webhook_counts(client: redis.Redis, settings: Settings) -> tuple[int, int]:
    """Gateway webhooks not yet delivered, and those given up on (dead-lettered)."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(settings.keys.webhook_outbox())
    pipe.llen(settings.keys.webhook_dead())
    pending, dead = pipe.execute()
    return int(pending), int(dead)


def _lines(statuses: list[RouteStatus]) -> list[str]:
    if not statuses:
        return ["no routes configured or announced"]
    lines = []
    for s in statuses:
        mark = "ok " if s.healthy else "DOWN"
        age = f"{s.oldest_age_s:.1f}s" if s.oldest_age_s is not None else "-"
        bulk = f" (bulk {s.lane_depths['bulk']})" if s.lane_depths.get("bulk") else ""
        lines.append(f"[{mark}] {s.route.describe()}  workers={len(s.workers)} "
                     f"queued={s.queue_depth}{bulk} oldest={age}")
        for w in s.workers:
            memory = w.get("device_memory_bytes")
            shown = f" memory={memory / 2**20:.0f}MiB" if isinstance(memory, int | float) else ""
            lines.append(f"       {w['hostname']} host={w.get('host', '-')} device={w['device']} "
                         f"ready={w['ready']} beat={w['last_beat_age_s']:.1f}s ago{shown}")
    return lines
