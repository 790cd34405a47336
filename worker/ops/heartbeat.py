"""A worker's heartbeat: announces its route, device and readiness every few seconds.

The writing side of ``pipeq.core.registry``: each beat refreshes the worker's score in its
route's sorted set (the beat's expiry time), its self-description (expiring with the beat)
and the route in the deployment's route table.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from pipeq.core.contract import Route
from pipeq.core.registry import Registry

log = logging.getLogger("pipeq.heartbeat")


class Heartbeat:
    """Refreshes this worker's entry in the registry on a daemon thread."""

    def __init__(self, registry: Registry, hostname: str, route: Route, device: str,
                 extra: dict[str, Any] | None = None,
                 probe: Callable[[], dict[str, Any]] | None = None,
                 healthy: Callable[[], bool] | None = None):
        self.registry = registry
        self.hostname = hostname
        self.route = route
        self.device = device
        self.extra = extra or {}
        #: Called at each beat for fields that change (e.g. device memory in use).
        self.probe = probe
        #: Whether the worker can do its work now (batcher alive, Redis answering): a
        #: worker that cannot announces itself not ready (``pipeq status``: DOWN).
        self.healthy = healthy or (lambda: True)
        self.ready = False
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeq-heartbeat", daemon=True)

    def start(self) -> None:
        """Keep announcing once ready (a worker still loading receives no jobs)."""
        self._thread.start()

    def mark_ready(self) -> None:
        """Announce that the pipeline is loaded, warmed up and consuming. A Redis that
        refuses the announcement (full, restarting) is retried by the heartbeat: an error
        here left a worker started against a full Redis unannounced for good."""
        self.ready = True
        try:
            self.beat()
        except redis.RedisError as exc:
            log.warning("cannot announce this worker yet (%s); the heartbeat retries every "
                        "%gs", exc, self.registry.heartbeat_s)

    def stop(self) -> None:
        """Stop beating and withdraw from the route at once, so producers stop routing to it."""
        self._stop.set()
        keys = self.registry.keys
        try:
            with self.registry.client.pipeline(transaction=False) as pipe:
                pipe.zrem(keys.route_workers(self.route), self.hostname)
                pipe.delete(keys.worker_info(self.hostname))
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not withdraw %s from the registry: %s", self.hostname, exc)

    def beat(self) -> None:
        """Announce (or refresh) this worker now."""
        extra = self.extra
        if self.probe is not None:
            try:
                extra = {**extra, **self.probe()}
            except Exception as exc:  # a failing probe must not stop the heartbeat
                log.warning("heartbeat probe failed: %s", exc)
        now = time.time()
        body = {"hostname": self.hostname, "route": self.route.model_dump(),
                "device": self.device, "ready": self.ready and self.healthy(),
                "pid": os.getpid(),
                "started_at": self.started_at, "last_beat": now, **extra}
        keys, ttl = self.registry.keys, self.registry.beat_ttl_s
        with self.registry.client.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.route_workers(self.route), {self.hostname: now + ttl})
            # Gone with the last live worker's beat: a killed worker never withdraws itself.
            pipe.pexpire(keys.route_workers(self.route), int(ttl * 1000))
            pipe.hset(keys.routes(), self.route.id, self.route.model_dump_json())
            pipe.set(keys.worker_info(self.hostname), json.dumps(body), px=int(ttl * 1000))
            pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self.registry.heartbeat_s):
            if not self.ready:
                continue  # only a ready worker may receive jobs
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed (%s); retrying", exc)
