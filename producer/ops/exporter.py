"""Deployment metrics from Redis, in Prometheus format: ``pipeq metrics --port 9808``.

One exporter per deployment reads, at each scrape, what Redis already knows: queue depth
and oldest job age per route, live workers and their device memory (from heartbeats), and
each route's running totals. Those totals live in one hash per route
(``Keys.route_stats``): workers count final states there atomically with the job record
(``pipeq.core.store``, fields ``jobs:<STATE>``) and add their batch totals (the fields below)
every few seconds. Counting jobs from their records would need a scan of every record.

Exported metrics (label ``route`` is the route id, as in the Celery task name
``pipeq.run[<route id>]``):

=====================================  =======  ==============================================
``pipeq_redis_up``                      gauge    1 when Redis answered the scrape (no label)
``pipeq_route_info``                   gauge    1 per route; labels task, model, revision
``pipeq_queue_depth``                  gauge    jobs waiting, label ``lane`` (interactive, bulk)
``pipeq_queue_oldest_age_seconds``     gauge    age of the oldest waiting job (0 when empty)
``pipeq_workers``                      gauge    live, ready workers serving the route
``pipeq_jobs_total``                   counter  jobs ended, label ``state`` (SUCCESS, FAILURE,
                                                CANCELLED, EXPIRED)
``pipeq_inputs_total``                 counter  inputs run through the pipeline (rate = inputs/s)
``pipeq_batches_total``                counter  pipeline calls (batches)
``pipeq_batch_capacity_total``         counter  sum of max batch sizes of those calls
``pipeq_inference_seconds_total``      counter  seconds spent in pipeline calls
``pipeq_jobs_started_total``           counter  jobs taken from the queue into a batch
``pipeq_queue_wait_seconds_total``     counter  sum of their waits (submit to batch start)
``pipeq_device_memory_bytes``          gauge    per worker (labels worker, device): CUDA memory
                                                allocated, or the process RSS on CPU
=====================================  =======  ==============================================

Averages over a window come from ratios of rates: batch size = inputs / batches, batch
fill = inputs / batch capacity, inference seconds per batch = inference seconds / batches,
queue wait = queue wait seconds / jobs started. Per-worker histograms (percentiles) come
from each worker's own port (``pipeq worker --metrics-port``, see ``pipeq.worker.ops.metrics``).

prometheus_client (the ``monitor`` extra) is imported only by the exporter itself.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import redis

from pipeq.core.config import Settings
from pipeq.core.contract import FINAL_STATES, Route
from pipeq.core.keys import Keys
from pipeq.core.redis_io import as_text, connect
from pipeq.core.secrets import mask_url
from pipeq.core.store import JOBS_IN_STATE
from pipeq.errors import ConfigError

log = logging.getLogger("pipeq.metrics")


def read_route_stats(client: redis.Redis, keys: Keys, route: Route) -> dict[str, float]:
    """A route's running totals: ``jobs:<STATE>`` counts and the RouteTotals fields."""
    raw = client.hgetall(keys.route_stats(route))
    return {as_text(k): float(v) for k, v in raw.items()}


class DeploymentCollector:
    """A Prometheus collector that reads the deployment's state from Redis at each scrape."""

    def __init__(self, settings: Settings, client: redis.Redis):
        self.settings = settings
        self.client = client

    def collect(self) -> Iterator[Any]:
        """Metric families for every configured or announced route."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from pipeq.ops.status import deployment_status

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("route",)) -> Any:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("route",)) -> Any:
            return CounterMetricFamily(name, doc, labels=list(labels))

        info = gauge("pipeq_route_info", "Routes of this deployment",
                     ("route", "task", "model", "revision"))
        depth = gauge("pipeq_queue_depth", "Jobs waiting in the route's queue, per lane",
                      ("route", "lane"))
        age = gauge("pipeq_queue_oldest_age_seconds", "Age of the oldest waiting job")
        workers = gauge("pipeq_workers", "Live, ready workers serving the route")
        memory = gauge("pipeq_device_memory_bytes",
                       "Device memory in use per worker (CUDA allocated, or RSS on CPU)",
                       ("route", "worker", "device"))
        jobs = counter("pipeq_jobs", "Jobs ended, by final state", ("route", "state"))
        totals = {
            "inputs": counter("pipeq_inputs", "Inputs run through the pipeline"),
            "batches": counter("pipeq_batches", "Pipeline calls (batches)"),
            "batch_capacity": counter("pipeq_batch_capacity",
                                      "Sum of the max batch sizes of those calls"),
            "inference_seconds": counter("pipeq_inference_seconds",
                                         "Seconds spent in pipeline calls"),
            "jobs_started": counter("pipeq_jobs_started", "Jobs taken from the queue"),
            "queue_wait_seconds": counter("pipeq_queue_wait_seconds",
                                          "Sum of the jobs' waits from submit to batch start"),
        }
        try:
            statuses = deployment_status(self.settings, self.client)
            stats = [read_route_stats(self.client, self.settings.keys, s.route)
                     for s in statuses]
        except redis.RedisError as exc:
            log.warning("cannot read metrics from Redis: %s", exc)
            yield GaugeMetricFamily("pipeq_redis_up", "1 when Redis answered this scrape", 0)
            return
        yield GaugeMetricFamily("pipeq_redis_up", "1 when Redis answered this scrape", 1)
        for status, route_stats in zip(statuses, stats, strict=True):
            route = status.route
            rid = route.id
            info.add_metric([rid, route.task, route.model, route.revision or ""], 1)
            for lane, waiting in status.lane_depths.items():
                depth.add_metric([rid, lane], waiting)
            age.add_metric([rid], status.oldest_age_s or 0.0)
            workers.add_metric([rid], sum(1 for w in status.workers if w.get("ready")))
            for worker in status.workers:
                if worker.get("device_memory_bytes") is not None:
                    memory.add_metric([rid, str(worker["hostname"]), str(worker["device"])],
                                      float(worker["device_memory_bytes"]))
            for state in sorted(FINAL_STATES):
                jobs.add_metric([rid, state.value], route_stats.get(JOBS_IN_STATE + state, 0.0))
            for name, family in totals.items():
                family.add_metric([rid], route_stats.get(name, 0.0))
        yield from (info, depth, age, workers, memory, jobs, *totals.values())


def serve_metrics(settings: Settings, port: int, address: str) -> int:
    """Serve ``/metrics`` until SIGTERM or SIGINT; returns the process exit code."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ConfigError(
            "pipeq metrics needs the monitor extra: pip install 'pipeq[monitor]'"
        ) from None
    redis_url = settings.redis_url_value()
    client = connect(settings, connect_timeout_s=10, socket_timeout_s=10)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeploymentCollector(settings, client))
    try:
        server, _thread = start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        print(f"pipeq metrics: cannot listen on {address}:{port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("pipeq metrics listening on http://%s:%d/metrics, Redis at %s",
             address, server.server_port, mask_url(redis_url))
    while not stop.wait(1.0):
        pass
    server.shutdown()
    log.info("pipeq metrics stopped")
    return 0
