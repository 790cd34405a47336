"""Serving one route in this process: load, warm up, say ready, consume until stopped."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis
from celery import signals
from celery.utils.deprecated import CPendingDeprecationWarning

from pipeq.core.config import RouteSpec, Settings
from pipeq.core.deadletters import DeadLetters
from pipeq.core.registry import Registry
from pipeq.core.secrets import mask_url
from pipeq.ops.exits import Exit
from pipeq.worker.batching.batcher import BatchPolicy, MicroBatcher
from pipeq.worker.batching.planning import calibrate_overhead
from pipeq.worker.broker.app import build_app
from pipeq.worker.broker.claiming import unsupported_redis
from pipeq.worker.broker.compat import check_broker_internals
from pipeq.worker.broker.consumer import consumer_class
from pipeq.worker.broker.leases import LeaseKeeper
from pipeq.worker.model.instances import instance_plan, replicate
from pipeq.worker.model.loader import ModelLoadError, load_pipeline, warmup_call
from pipeq.worker.model.media import MediaPolicy
from pipeq.worker.model.runner import PipelineRunner
from pipeq.worker.ops.faults import FaultInjector
from pipeq.worker.ops.heartbeat import Heartbeat
from pipeq.worker.ops.metrics import InstrumentedJobStore, WorkerMetrics
from pipeq.worker.service import RouteService

log = logging.getLogger("pipeq.worker")
#: The ready line is a contract (tests, the demo and operators wait for it): always logged.
ready_log = logging.getLogger("pipeq.ready")
ready_log.setLevel(logging.INFO)

T = TypeVar("T")



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
          concurrency: int | None = None, metrics_port: int | None = None) -> int:
    """Load the route's pipeline on ``device`` and serve its queue; returns an exit code.

    ``metrics_port``: also serve this process's Prometheus metrics there (pipeq.worker.ops.metrics).
    """
    redis_url = settings.redis_url_value()
    log.info("pipeq worker for %s on %s, Redis at %s", spec.route.describe(), device,
             mask_url(redis_url))
    try:
        check_broker_internals()
    except RuntimeError as exc:
        log.error("worker not started: %s", exc)
        return Exit.USAGE
    try:
        check_device(device)
        instances = use_instances(spec, device)
        runner = off_main_thread(lambda: loaded_and_warm(spec, device))
    except ModelLoadError as exc:
        log.error("worker not started: %s", exc)
        return Exit.MODEL_LOAD_FAILED
    if settings.faults:  # after warm-up: injected faults are for jobs only
        log.warning("FAULT INJECTION ACTIVE: %s", settings.faults)
        runner.faults = FaultInjector(settings.faults)
    hostname = hostname or default_hostname(spec, device)
    client = redis.Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=10,
                                  health_check_interval=10)
    if (problem := unsupported_redis(client)) is not None:
        log.error("worker not started: %s", problem)
        return Exit.USAGE
    metrics = WorkerMetrics(spec.route, spec.max_batch_size, device, client, settings.keys,
                            flush_s=settings.heartbeat_s)
    extra: dict[str, Any] = {}
    if metrics_port is not None:
        try:
            extra["metrics_port"] = metrics.serve_http(metrics_port)
        except (OSError, ImportError) as exc:  # port taken, or prometheus-client missing
            log.error("worker not started: cannot serve metrics on port %d: %s", metrics_port,
                      exc)
            return Exit.USAGE
        log.info("metrics at http://0.0.0.0:%d/metrics", extra["metrics_port"])
    store = InstrumentedJobStore(client, settings.keys, settings.result_ttl_s, metrics)
    media = MediaPolicy(spec.allow_urls, spec.max_payload_bytes or settings.max_payload_bytes)
    service = RouteService(spec.route, settings, store, hostname, media=media)
    service.run_timeout_s = spec.timeout_s
    policy = BatchPolicy(spec.max_batch_size, spec.max_wait_ms, spec.max_batch_tokens,
                         off_main_thread(lambda: measure_call_overhead(runner)),
                         settings.max_retries,
                         settings.retry_backoff_s)
    batcher = MicroBatcher(replicate(runner, instances), policy,
                           metrics.wrap_start_jobs(service.start_jobs),
                           service.finish_jobs, observe=metrics.on_batch)
    service.attach(batcher)
    heartbeat = Heartbeat(
        Registry(client, settings.keys, settings.heartbeat_s), hostname, spec.route, device,
        extra={"queue": settings.keys.queue(spec.route), "max_batch_size": spec.max_batch_size,
               "instances": instances,
               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "host": socket.gethostname(), **extra},
        probe=metrics.heartbeat_fields,
    )
    app = build_app(settings, redis_url, service)
    threads = concurrency or min(max(2 * spec.max_batch_size, 4), 256)

    def on_ready(sender: Any = None, **_: Any) -> None:
        heartbeat.mark_ready()
        metrics.mark_ready()
        ready_log.info("pipeq worker ready: %s on %s, queue %s, batch <= %d inputs / %g ms, "
                 "%d model instance(s), %d threads, hostname %s", spec.route.describe(),
                 device, settings.keys.queue(spec.route), spec.max_batch_size,
                 spec.max_wait_ms, instances, threads, hostname)

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        # Warm shutdown: the batch in hand finishes, unstarted jobs go back to the queue.
        log.info("worker %s shutting down: finishing the batch in hand", hostname)
        heartbeat.stop()
        batcher.begin_shutdown()

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutting_down.connect(on_shutdown, weak=False)
    # Celery warns about a default it will change in 6.0; pipeq sets it explicitly.
    warnings.filterwarnings("ignore", category=CPendingDeprecationWarning)
    leases = LeaseKeeper(client, settings.keys, settings.visibility_timeout_s)
    batcher.start()
    metrics.start()
    heartbeat.start()
    leases.start()
    worker = app.Worker(
        hostname=hostname, pool="threads", concurrency=threads,
        # Both lanes of the route; kombu polls them round-robin (see pipeq.worker.batching.lanes).
        queues=[settings.keys.queue(spec.route), settings.keys.queue_for(spec.route, "bulk")],
        loglevel=settings.log_level,
        without_mingle=True, without_gossip=True, optimization="fair", quiet=True,
        consumer_cls=consumer_class(DeadLetters(client, settings.keys)),
    )
    try:
        worker.start()
    finally:
        heartbeat.stop()
        leases.stop()
        batcher.stop()
        metrics.stop()
        log.info("pipeq worker %s stopped", hostname)
    return int(worker.exitcode or 0)


def use_instances(spec: RouteSpec, device: str) -> int:
    """How many model instances serve the route here; gives each call its share of threads.

    Set before the model loads: the warm-up and the overhead calibration then run on the
    threads the calls will have (torch's threads take the process-wide count).
    """
    import torch

    instances, threads = instance_plan(device, spec.cpu_instances, torch.get_num_threads())
    if instances > 1:
        torch.set_num_threads(threads)
        log.info("%d model instances on %s, %d torch thread(s) per call", instances, device,
                 threads)
    return instances


def off_main_thread(action: Callable[[], T]) -> T:
    """Run ``action`` on a short-lived thread; its result, or its exception re-raised.

    Model calls stay off the main thread: OpenMP keeps a team of threads for each thread
    that ran a parallel region, and the main thread's team (from the warm-up) next to the
    batcher thread's made every batch slower (measured on 2 CPU cores with MiniLM: batches
    of 8 ran at 116 instead of 135 inputs/s, single calls 14.0 instead of 12.4 ms). A team
    goes away with its thread, so the batcher threads' teams are then the only ones.
    """
    # Leaving the with block joins the thread: its OpenMP team is gone before serving.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeq-model-setup") as setup:
        return setup.submit(action).result()


def loaded_and_warm(spec: RouteSpec, device: str) -> PipelineRunner:
    """The route's pipeline, loaded on ``device`` and warmed up, in a runner."""
    runner = PipelineRunner(load_pipeline(spec, device))
    warm_up(runner)
    return runner


def measure_call_overhead(runner: PipelineRunner) -> float | None:
    """The route's per-call overhead in characters of input (see pipeq.worker.batching.planning)."""
    call = warmup_call(runner.pipe)
    if call is None or not isinstance(call[0][0], str) or runner.faults is not None:
        return None
    sample, params = call[0][0], call[1]
    try:
        overhead = calibrate_overhead(lambda items: runner.run(items, params), sample,
                                      sample + " and a few more words to make it long" * 5)
    except Exception as exc:  # calibration is an optimisation: never fatal
        log.warning("could not measure the per-call overhead (%s); batches stay whole", exc)
        return None
    log.info("per-call overhead: %s characters of input",
             "unknown" if overhead is None else f"{overhead:.0f}")
    return overhead


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
