"""A worker's heartbeat: announces its route, device and readiness every few seconds."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from producer.contract import Route
from producer.registry import Registry, WorkerInfo

log = logging.getLogger("pipeq.heartbeat")


class Heartbeat:
    """Refreshes this worker's entry in the registry on a daemon thread."""

    def __init__(self, registry: Registry, hostname: str, route: Route, device: str,
                 extra: dict[str, Any] | None = None,
                 probe: Callable[[], dict[str, Any]] | None = None):
        self.registry = registry
        self.hostname = hostname
        self.route = route
        self.device = device
        self.extra = extra or {}
        #: Called at each beat for fields that change (e.g. device memory in use).
        self.probe = probe
        self.ready = False
        self.started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeq-heartbeat", daemon=True)

    def start(self) -> None:
        """Keep announcing once ready (a worker still loading receives no jobs)."""
        self._thread.start()

    def mark_ready(self) -> None:
        """Announce that the pipeline is loaded, warmed up and consuming."""
        self.ready = True
        self._beat()

    def stop(self) -> None:
        """Stop beating and withdraw from the route at once."""
        self._stop.set()
        try:
            self.registry.withdraw(self.hostname, self.route)
        except redis.RedisError as exc:
            log.warning("could not withdraw %s from the registry: %s", self.hostname, exc)

    def _beat(self) -> None:
        extra = self.extra
        if self.probe is not None:
            try:
                extra = {**extra, **self.probe()}
            except Exception as exc:  # a failing probe must not stop the heartbeat
                log.warning("heartbeat probe failed: %s", exc)
        self.registry.announce(WorkerInfo(
            hostname=self.hostname, route=self.route, device=self.device, ready=self.ready,
            pid=os.getpid(), started_at=self.started_at, last_beat=time.time(),
            extra=extra,
        ))

    def _run(self) -> None:
        while not self._stop.wait(self.registry.heartbeat_s):
            if not self.ready:
                continue  # only a ready worker may receive jobs
            try:
                self._beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed (%s); retrying", exc)
