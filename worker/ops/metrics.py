"""What one worker process reports about its route: metrics, route totals and log lines.

Three outlets, fed by the same middleware hooks (each pipeline call, the start of each
batch's jobs, and every stored job outcome):

- one structured log line per batch and per job outcome (``pipeq.batch``, ``pipeq.job``;
  JSON with ``PIPEQ_LOG_JSON=1``, fields passed as ``extra``);
- the route's totals in Redis (:class:`RouteTotals`, flushed every heartbeat;
  final states are counted by the job store's own script), read by ``pipeq metrics``;
- with ``pipeq worker --metrics-port N``, a Prometheus endpoint of this process:

=======================================  =========  ========================================
``pipeq_worker_ready``                   gauge      1 once the pipeline is loaded and warm
``pipeq_worker_jobs_total``              counter    jobs this worker ended, label ``state``
``pipeq_worker_inputs_total``            counter    inputs run (rate = inputs/s)
``pipeq_worker_batch_size``              histogram  inputs per pipeline call
``pipeq_worker_batch_fill_ratio``        histogram  batch size / max batch size
``pipeq_worker_inference_seconds``       histogram  seconds per pipeline call
``pipeq_worker_queue_wait_seconds``      histogram  per job, from submit to its batch's start
``pipeq_job_latency_seconds``            histogram  per job, from submit to its final record
                                                    stored (end to end), label ``state``
``pipeq_worker_device_memory_bytes``     gauge      label ``kind``: CUDA ``allocated`` and
                                                    ``reserved``, or ``rss`` on CPU
=======================================  =========  ========================================

Every metric has the label ``route`` (the route id of the task name ``pipeq.run[<id>]``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import redis

from pipeq.core.contract import JobState, Route
from pipeq.core.keys import Keys
from pipeq.core.store import JOBS_IN_STATE, Outcome
from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.hooks import Middleware


@dataclass(slots=True)
class RouteTotals:
    """Batch totals a worker accumulates between two flushes into its route's stats hash.

    Each field is also the name of its field in the hash.
    """

    inputs: int = 0
    batches: int = 0
    batch_capacity: int = 0
    inference_seconds: float = 0.0
    jobs_started: int = 0
    queue_wait_seconds: float = 0.0

    def empty(self) -> bool:
        """True when there is nothing to flush."""
        return not (self.batches or self.jobs_started)

    def add(self, other: RouteTotals) -> None:
        """Add ``other``'s totals to these (a failed flush is kept for the next one)."""
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def flush(self, client: redis.Redis, stats_key: str) -> None:
        """Add these totals to the stats hash in one round trip."""
        pipe = client.pipeline(transaction=False)
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float):
                pipe.hincrbyfloat(stats_key, item.name, value)
            elif value:
                pipe.hincrby(stats_key, item.name, value)
        pipe.execute()


batch_log = logging.getLogger("pipeq.batch")
job_log = logging.getLogger("pipeq.job")
log = logging.getLogger("pipeq.worker")

_FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


def device_memory(device: str) -> dict[str, int]:
    """Memory in use on ``device`` by this process, by kind (bytes)."""
    if device.startswith("cuda"):
        import torch

        return {"allocated": int(torch.cuda.memory_allocated(device)),
                "reserved": int(torch.cuda.memory_reserved(device))}
    return {"rss": _rss_bytes()}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, in KiB


class _PrometheusMetrics:
    """This process's Prometheus metrics, on their own registry and HTTP port."""

    def __init__(self, route: Route, max_batch_size: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        rid = route.id
        size_buckets = sorted({2 ** i for i in range(max_batch_size.bit_length())}
                              | {max_batch_size})
        reg = self.registry
        self.ready = Gauge("pipeq_worker_ready", "1 once the pipeline is loaded and warmed up",
                           ["route"], registry=reg).labels(rid)
        jobs = Counter("pipeq_worker_jobs", "Jobs this worker ended, by final state",
                       ["route", "state"], registry=reg)
        self.jobs = {state: jobs.labels(rid, state.value) for state in JobState
                     if state.is_final}
        self.inputs = Counter("pipeq_worker_inputs", "Inputs run through the pipeline",
                              ["route"], registry=reg).labels(rid)
        self.batch_size = Histogram("pipeq_worker_batch_size", "Inputs per pipeline call",
                                    ["route"], buckets=size_buckets, registry=reg).labels(rid)
        self.batch_fill = Histogram("pipeq_worker_batch_fill_ratio",
                                    "Batch size / max batch size", ["route"],
                                    buckets=_FILL_BUCKETS, registry=reg).labels(rid)
        self.inference = Histogram("pipeq_worker_inference_seconds",
                                   "Seconds per pipeline call", ["route"],
                                   buckets=_INFERENCE_BUCKETS, registry=reg).labels(rid)
        self.queue_wait = Histogram("pipeq_worker_queue_wait_seconds",
                                    "Per job: seconds from submit to its batch's start",
                                    ["route"], buckets=_WAIT_BUCKETS, registry=reg).labels(rid)
        self.latency = Histogram("pipeq_job_latency_seconds",
                                 "Per job: seconds from submit to its final record stored",
                                 ["route", "state"], buckets=_WAIT_BUCKETS, registry=reg)
        self.memory = Gauge("pipeq_worker_device_memory_bytes",
                            "Device memory in use by this worker", ["route", "device", "kind"],
                            registry=reg)

    def serve(self, port: int, address: str) -> int:
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return int(server.server_port)


class WorkerMetrics(Middleware):
    """Per-route instrumentation of one worker process (thread-safe), as middleware."""

    def __init__(self, route: Route, max_batch_size: int, device: str, client: redis.Redis,
                 keys: Keys, flush_s: float = 2.0):
        self.route = route
        self.max_batch_size = max_batch_size
        self.device = device
        self.client = client
        self.stats_key = keys.route_stats(route)
        self.flush_s = flush_s
        self._totals = RouteTotals()
        self._cancelled = 0
        #: job id -> (submitted_at, monotonic time its batch started), until its outcome.
        self._running: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._prometheus: _PrometheusMetrics | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeq-metrics", daemon=True)

    # lifecycle
    def serve_http(self, port: int, address: str = "0.0.0.0") -> int:
        """Expose this process's metrics on ``port`` (0 picks a free one); returns the port."""
        self._prometheus = _PrometheusMetrics(self.route, self.max_batch_size)
        self._update_memory()
        return self._prometheus.serve(port, address)

    def start(self) -> None:
        """Start flushing route totals to Redis every ``flush_s``."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the flushing thread after a last flush."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.flush()

    def after_ready(self) -> None:
        """The pipeline is loaded, warmed up and consuming."""
        if self._prometheus:
            self._prometheus.ready.set(1)

    # hooks
    def after_call(self, size: int, seconds: float, job_ids: list[str]) -> None:
        """One pipeline call of ``size`` inputs."""
        fill = size / self.max_batch_size
        with self._lock:
            self._totals.inputs += size
            self._totals.batches += 1
            self._totals.batch_capacity += self.max_batch_size
            self._totals.inference_seconds += seconds
        if self._prometheus:
            self._prometheus.inputs.inc(size)
            self._prometheus.batch_size.observe(size)
            self._prometheus.batch_fill.observe(fill)
            self._prometheus.inference.observe(seconds)
        batch_log.info(
            "batch route=%s size=%d fill=%.2f seconds=%.4f jobs=%s", self.route.id, size, fill,
            seconds, ",".join(job_ids),
            extra={"route": self.route.id, "batch_size": size, "fill": round(fill, 4),
                   "seconds": round(seconds, 6), "job_ids": job_ids},
        )

    def after_jobs_started(self, jobs: list[JobInFlight]) -> None:
        """Jobs taken into a batch (after the store marked them STARTED or skipped them)."""
        now, started = time.time(), time.monotonic()
        waits: list[float] = []
        cancelled: list[JobInFlight] = []
        with self._lock:
            for job in jobs:
                if not job.announce:  # a re-delivered finished job: nothing new
                    continue
                if job.outcome is not None and job.outcome.state == JobState.CANCELLED:
                    cancelled.append(job)  # cancelled while it was queued: no record to store
                    continue
                self._running[job.job_id] = (job.request.submitted_at, started)
                if job.outcome is None:  # not expired: it runs now
                    waits.append(max(0.0, now - job.request.submitted_at))
            self._totals.jobs_started += len(waits)
            self._totals.queue_wait_seconds += sum(waits)
            self._cancelled += len(cancelled)
        if self._prometheus:
            for wait in waits:
                self._prometheus.queue_wait.observe(wait)
            self._prometheus.jobs[JobState.CANCELLED].inc(len(cancelled))
        for job in cancelled:
            self._log_outcome(job.job_id, JobState.CANCELLED, None,
                              max(0.0, now - job.request.submitted_at), None)

    def after_outcomes(self, outcomes: list[Outcome], stored: list[bool]) -> None:
        """Final records the store was asked to write (``stored``: which it did write)."""
        now, ended = time.time(), time.monotonic()
        with self._lock:
            timing = [self._running.pop(o.job_id, None) for o in outcomes]
        for outcome, was_stored, times in zip(outcomes, stored, timing, strict=True):
            if not was_stored:
                log.debug("job %s already final; outcome %s not stored", outcome.job_id,
                          outcome.state)
                continue
            total = run = None
            if times is not None:
                total, run = max(0.0, now - times[0]), ended - times[1]
            if self._prometheus:
                self._prometheus.jobs[outcome.state].inc()
                if total is not None:
                    self._prometheus.latency.labels(self.route.id, outcome.state.value
                                                    ).observe(total)
            error = outcome.payload.get("type") if isinstance(outcome.payload, dict) and (
                outcome.state != JobState.SUCCESS) else None
            self._log_outcome(outcome.job_id, outcome.state, error, total, run)

    def _log_outcome(self, job_id: str, state: JobState, error: str | None,
                     total: float | None, run: float | None) -> None:
        job_log.info(
            "job %s %s route=%s%s seconds=%s", job_id, state.value, self.route.id,
            f" error={error}" if error else "", "-" if total is None else f"{total:.4f}",
            extra={"route": self.route.id, "job_id": job_id, "state": state.value,
                   "error_type": error, "seconds": None if total is None else round(total, 6),
                   "run_seconds": None if run is None else round(run, 6)},
        )

    def heartbeat_fields(self) -> dict[str, Any]:
        """What the heartbeat adds about this worker's resources (``pipeq status``)."""
        memory = device_memory(self.device)
        return {"device_memory_bytes": memory.get("allocated", memory.get("rss"))}

    # the flushing thread
    def flush(self) -> None:
        """Add the totals gathered since the last flush to the route's stats hash."""
        with self._lock:
            totals, self._totals = self._totals, RouteTotals()
            cancelled, self._cancelled = self._cancelled, 0
        if totals.empty() and not cancelled:
            return
        try:
            totals.flush(self.client, self.stats_key)
            if cancelled:
                self.client.hincrby(self.stats_key, JOBS_IN_STATE + JobState.CANCELLED, cancelled)
        except redis.RedisError as exc:
            log.warning("could not store route totals (%s); keeping them for the next flush",
                        exc)
            with self._lock:
                self._totals.add(totals)
                self._cancelled += cancelled

    def _update_memory(self) -> None:
        if not self._prometheus:
            return
        try:
            for kind, value in device_memory(self.device).items():
                self._prometheus.memory.labels(self.route.id, self.device, kind).set(value)
        except RuntimeError as exc:  # a CUDA error must not stop the metrics thread
            log.warning("cannot read device memory: %s", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()
            self._update_memory()
