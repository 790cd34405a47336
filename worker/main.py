"""Serving one route in this process: load, warm up, say ready, consume until stopped."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import redis
from celery import signals

from producer.config import RouteSpec, Settings, mask_url
from producer.registry import Registry
from producer.store import JobStore

from .app import build_app
from .batcher import BatchPolicy, MicroBatcher
from .heartbeat import Heartbeat
from .loader import ModelLoadError, load_pipeline, warmup_call
from .runner import PipelineRunner
from .service import RouteService

log = logging.getLogger("pipeq.worker")

EXIT_LOAD_FAILED = 3
EXIT_DEVICE = 4


def default_hostname(spec: RouteSpec, device: str) -> str:
    """A unique Celery hostname: route, device and pid at this machine."""
    safe_device = device.replace(":", "")
    return f"pipeq.{spec.route.id}.{safe_device}.{os.getpid()}@{socket.gethostname()}"


def check_device(device: str) -> None:
    """Fail clearly when a CUDA device is asked for but torch sees none."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {device}: torch sees no CUDA device here "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                "use --device cpu or run on a GPU machine"
            )


def serve(spec: RouteSpec, settings: Settings, device: str, *, hostname: str | None = None,
          concurrency: int | None = None) -> int:
    """Load the route's pipeline on ``device`` and serve its queue; returns an exit code."""
    redis_url = settings.redis_url_value()
    log.info("pipeq worker for %s on %s, Redis at %s", spec.route.describe(), device,
             mask_url(redis_url))
    try:
        check_device(device)
        pipe = load_pipeline(spec, device)
        runner = PipelineRunner(pipe)
        warm_up(runner)
    except ModelLoadError as exc:
        log.error("worker not started: %s", exc)
        return EXIT_LOAD_FAILED
    hostname = hostname or default_hostname(spec, device)
    client = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=10,
                                  health_check_interval=10)
    store = JobStore(client, settings.keys, settings.result_ttl_s)
    service = RouteService(spec.route, settings, store, hostname)
    policy = BatchPolicy(spec.max_batch_size, spec.max_wait_ms, spec.max_batch_tokens)
    batcher = MicroBatcher(runner, policy, service.start_jobs, service.finish_jobs,
                           observe=_log_batch(spec))
    service.attach(batcher)
    heartbeat = Heartbeat(
        Registry(client, settings.keys, settings.heartbeat_s), hostname, spec.route, device,
        extra={"queue": settings.keys.queue(spec.route), "max_batch_size": spec.max_batch_size,
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},
    )
    app = build_app(settings, redis_url, service)
    threads = concurrency or min(max(2 * spec.max_batch_size, 4), 256)

    def on_ready(sender: Any = None, **_: Any) -> None:
        heartbeat.mark_ready()
        log.info("pipeq worker ready: %s on %s, queue %s, batch <= %d inputs / %g ms, "
                 "%d threads, hostname %s", spec.route.describe(), device,
                 settings.keys.queue(spec.route), spec.max_batch_size, spec.max_wait_ms,
                 threads, hostname)

    signals.worker_ready.connect(on_ready, weak=False)
    batcher.start()
    heartbeat.start()
    worker = app.Worker(
        hostname=hostname, pool="threads", concurrency=threads,
        queues=[settings.keys.queue(spec.route)], loglevel=settings.log_level,
        without_mingle=True, without_gossip=True, optimization="fair", quiet=True,
    )
    try:
        worker.start()
    finally:
        heartbeat.stop()
        batcher.stop()
        log.info("pipeq worker %s stopped", hostname)
    return int(worker.exitcode or 0)


def warm_up(runner: PipelineRunner) -> None:
    """Run the pipeline once so the first job does not pay for lazy initialisation."""
    call = warmup_call(runner.pipe)
    if call is None:
        log.info("no warm-up input known for task %s; skipping warm-up", runner.task)
        return
    started = time.perf_counter()
    try:
        runner.run(*call)
    except Exception as exc:
        raise ModelLoadError(f"warm-up call failed: {type(exc).__name__}: {exc}") from exc
    log.info("warm-up done in %.2fs", time.perf_counter() - started)


def _log_batch(spec: RouteSpec) -> Any:
    def observe(size: int, seconds: float, job_ids: list[str]) -> None:
        log.debug("batch route=%s size=%d seconds=%.4f jobs=%d", spec.route.id, size, seconds,
                  len(job_ids))

    return observe
