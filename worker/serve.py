"""Serving one route in this process: load, warm up, say ready, consume until stopped.

Celery's worker (solo pool: pipeq jobs never run on Celery's pool) consumes the route's two
queues through pipeq's transport; its consumer hands each job message to the route service
(``broker.strategy``), whose batcher runs the jobs. On a warm shutdown (SIGTERM) the worker
stops taking messages, finishes the calls in hand, hands unstarted jobs back to the queue
and only then lets Celery close its connection, within ``PIPEQ_DRAIN_TIMEOUT_S``.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
import warnings
from typing import Any

import redis
from celery import signals
from celery.utils.deprecated import CPendingDeprecationWarning

from pipeq.core.config import RouteSpec, Settings
from pipeq.core.deadletters import DeadLetters
from pipeq.core.redis_io import connect, is_redis_full
from pipeq.core.registry import Registry
from pipeq.core.secrets import mask_url
from pipeq.ops.exits import Exit
from pipeq.worker.broker.app import build_app
from pipeq.worker.broker.claiming import unsupported_redis
from pipeq.worker.broker.compat import check_broker_internals
from pipeq.worker.broker.consumer import consumer_class
from pipeq.worker.broker.events import CeleryBridge
from pipeq.worker.broker.handover import HolderLease
from pipeq.worker.broker.leases import LeaseKeeper
from pipeq.worker.broker.strategy import LoopSettler
from pipeq.worker.hooks import Middleware
from pipeq.worker.model.instances import replicate
from pipeq.worker.model.loader import ModelLoadError
from pipeq.worker.model.startup import (
    check_device,
    continuous_engine,
    loaded_and_warm,
    measure_call_overhead,
    off_main_thread,
    use_instances,
)
from pipeq.worker.ops.faults import FaultInjector
from pipeq.worker.ops.heartbeat import Heartbeat
from pipeq.worker.ops.metrics import WorkerMetrics
from pipeq.worker.route import assemble, prefetch_limit

log = logging.getLogger("pipeq.worker")
#: The ready line is a contract (tests, the demo and operators wait for it): always logged.
ready_log = logging.getLogger("pipeq.ready")
ready_log.setLevel(logging.INFO)


def default_hostname(spec: RouteSpec, device: str) -> str:
    """A unique Celery hostname: route, device and pid at this machine."""
    safe_device = device.replace(":", "")
    return f"pipeq.{spec.route.id}.{safe_device}.{os.getpid()}@{socket.gethostname()}"


def serve(spec: RouteSpec, settings: Settings, device: str, *, hostname: str | None = None,
          prefetch: int | None = None, metrics_port: int | None = None,
          metrics_address: str = "0.0.0.0") -> int:
    """Load the route's pipeline on ``device`` and serve its queue; returns an exit code.

    ``metrics_port``: also serve this process's Prometheus metrics there (ops.metrics).
    """
    redis_url = settings.redis_url_value()
    log.info("pipeq worker for %s on %s, Redis at %s", spec.route.describe(), device,
             mask_url(redis_url))
    try:
        check_broker_internals()
        check_device(device)
        instances = use_instances(spec, device)
        runner = off_main_thread(lambda: loaded_and_warm(spec, device))
    except (ModelLoadError, RuntimeError) as exc:
        log.error("worker not started: %s", exc)
        return Exit.MODEL_LOAD_FAILED if isinstance(exc, ModelLoadError) else Exit.USAGE
    client = connect(settings, socket_timeout_s=30, health_check_interval=10)
    if (problem := unsupported_redis(client)) is not None:
        log.error("worker not started: %s", problem)
        return Exit.USAGE
    wait_until_writable(client, settings.keys.prefix)
    hostname = hostname or default_hostname(spec, device)
    metrics = WorkerMetrics(spec.route, spec.max_batch_size, device, client, settings.keys,
                            flush_s=settings.heartbeat_s)
    extra: dict[str, Any] = {}
    if metrics_port is not None:
        try:
            extra["metrics_port"] = metrics.serve_http(metrics_port, metrics_address)
        except (OSError, ImportError) as exc:  # port taken, or prometheus-client missing
            log.error("worker not started: cannot serve metrics on port %d: %s", metrics_port,
                      exc)
            return Exit.USAGE
        log.info("metrics at http://%s:%d/metrics", metrics_address, extra["metrics_port"])
    middleware: list[Middleware] = [metrics]
    if settings.faults:  # after warm-up: injected faults are for jobs only
        log.warning("FAULT INJECTION ACTIVE: %s", settings.faults)
        middleware.append(FaultInjector(settings.faults))
    bridge = CeleryBridge(settings.keys.task_name(spec.route), hostname)
    middleware.append(bridge)
    overhead = off_main_thread(lambda: measure_call_overhead(runner, skip=bool(settings.faults)))
    engine = off_main_thread(lambda: continuous_engine(spec, runner))
    batching = "continuous" if engine is not None else "static"
    service = assemble(spec, settings, client, hostname, replicate(runner, instances),
                       call_overhead=overhead, middleware=middleware, engine=engine)
    settler = LoopSettler()
    service.settle_with(settler)
    # Claims are recorded under this worker's holder lease: should it fall silent (host cut
    # off, frozen, killed), live workers hand its messages over within a few heartbeats.
    holder = HolderLease(client, settings.keys, hostname, settings.heartbeat_s,
                         settings.visibility_timeout_s)

    def probe() -> dict[str, Any]:
        return {**service.hooks.heartbeat_fields(), "in_flight": service.in_flight(),
                "declared_dead": holder.declared_dead, "handed_over": holder.restored}

    heartbeat = Heartbeat(
        Registry(client, settings.keys, settings.heartbeat_s), hostname, spec.route, device,
        extra={"queue": settings.keys.queue(spec.route), "max_batch_size": spec.max_batch_size,
               "instances": instances, "batching": batching,
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "host": socket.gethostname(), **extra},
        probe=probe, healthy=service.healthy,
    )
    app = build_app(settings, redis_url, service, settler, bridge)
    held = prefetch or prefetch_limit(spec, instances)
    # The solo pool's one slot times the multiplier is kombu's prefetch limit: how many
    # messages this worker holds (pipeq jobs never run on Celery's pool).
    app.conf.worker_prefetch_multiplier = held

    def on_ready(sender: Any = None, **_: Any) -> None:
        heartbeat.mark_ready()
        service.hooks.after_ready()
        ready_log.info("pipeq worker ready: %s on %s, queue %s, batch <= %d inputs / %g ms, "
                       "%s batching, %d model instance(s), holds <= %d messages, hostname %s",
                       spec.route.describe(), device, settings.keys.queue(spec.route),
                       spec.max_batch_size, spec.max_wait_ms, batching, instances, held,
                       hostname)

    def on_shutdown(warm: bool) -> None:
        # On the consumer's thread, its loop ended (see PipeqConsumer): the loop takes no
        # more messages while the jobs in hand finish and unstarted ones go back to the queue.
        log.info("worker %s shutting down (%s): finishing the jobs in hand", hostname,
                 "warm" if warm else "cold")
        heartbeat.stop()
        service.begin_shutdown()
        settler.go_direct()
        if warm:
            service.drain(settings.drain_timeout_s)

    signals.worker_ready.connect(on_ready, weak=False)
    # Celery warns about a default it will change in 6.0; pipeq sets it explicitly.
    warnings.filterwarnings("ignore", category=CPendingDeprecationWarning)
    leases = LeaseKeeper(client, settings.keys, settings.visibility_timeout_s,
                         service.held_delivery_tags)
    service.start()
    metrics.start()
    heartbeat.start()
    leases.start()
    holder.start()
    worker = app.Worker(
        hostname=hostname, pool="solo", concurrency=1,
        # Both lanes of the route (see batching.lanes).
        queues=[settings.keys.queue(spec.route), settings.keys.queue_for(spec.route, "bulk")],
        loglevel=settings.log_level,
        without_mingle=True, without_gossip=True, optimization="fair", quiet=True,
        consumer_cls=consumer_class(DeadLetters(client, settings.keys),
                                    settings.keys.task_name(spec.route), on_shutdown),
    )
    # Everything loaded so far (torch, transformers, the model: ~400k objects) lives as long
    # as the worker. A full collection walks all of it, ~240 ms on 2 CPU cores, stalling every
    # job in hand (it was the open loop's p99); frozen, those objects are never walked again.
    gc.collect()
    gc.freeze()
    try:
        worker.start()
    finally:
        heartbeat.stop()
        leases.stop()
        # Drained: nothing left to hand over. Otherwise the lease lapses and live workers put
        # back what this worker still held.
        holder.stop(withdraw=service.in_flight() == 0)
        service.stop()
        metrics.stop()
        log.info("pipeq worker %s stopped", hostname)
    return int(worker.exitcode or 0)


def wait_until_writable(client: redis.Redis, prefix: str) -> None:
    """Wait while Redis refuses writes because it is full (maxmemory), saying why: Celery
    would stop with "Unrecoverable error" on its first write."""
    probe = f"{prefix}:probe:{socket.gethostname()}:{os.getpid()}"
    said = False
    while True:
        try:
            client.set(probe, "1", px=1000)
            return
        except redis.ResponseError as exc:
            if not is_redis_full(exc):
                raise
            if not said:
                log.warning("Redis is full (%s): waiting for room before serving", exc)
                said = True
            time.sleep(1.0)
        except redis.RedisError:
            return  # unreachable: Celery retries the connection and says so
