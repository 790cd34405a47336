"""What an operator sees: ``pipeq status``, both metrics endpoints and the structured logs.

One real worker (tiny text-classification model, ``--metrics-port``, JSON logs) and one
``pipeq metrics`` exporter serve a deployment whose routing table also names a route no
worker serves. A fixed set of jobs (successes, an expired job, a malformed message) runs
once; each test checks one outlet against it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Deployment, WorkerProcess
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import build_text_model

from pipeq.core.celery_config import make_celery
from pipeq.core.contract import Route
from pipeq.core.store import JobStore
from pipeq.errors import JobExpired
from pipeq.ops.embedded import free_port

TASK = "text-classification"
DOWN_MODEL = "/models/nobody-serves-this"
MAX_BATCH = 8


@dataclass
class Served:
    """The module's deployment: its worker, the exporter and the route of each."""

    dep: Deployment
    worker: WorkerProcess
    model: str
    route: Route
    down: Route
    worker_metrics_url: str
    exporter_url: str


@dataclass
class Traffic:
    """The jobs run once for the whole module, by how they ended."""

    success_ids: list[str]
    expired_id: str
    malformed_id: str
    queued_id: str
    inputs_run: int


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus endpoint: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    """One sample's value (None when the exporter has no such series)."""
    return samples.get((name, frozenset(labels.items())))


def eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Retry ``check`` (an AssertionError means not yet) until it passes or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} not up after {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def served(module_deployment: Deployment, models_dir: Path) -> Iterator[Served]:
    dep = module_deployment
    model = str(build_text_model(TASK, models_dir))
    (dep.workdir / "routes.toml").write_text(
        f'[[route]]\ntask = "{TASK}"\nmodel = "{model}"\nmax_batch_size = {MAX_BATCH}\n\n'
        f'[[route]]\ntask = "{TASK}"\nmodel = "{DOWN_MODEL}"\n'
    )
    worker_port, exporter_port = free_port(), free_port()
    worker = dep.start_worker(TASK, model, "--metrics-port", str(worker_port),
                              env={"PIPEQ_LOG_JSON": "1"})
    log = dep.workdir / "exporter.log"
    with open(log, "wb") as out:
        exporter = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipeq", "metrics", "--port", str(exporter_port),
             "--address", "127.0.0.1"],
            env=dep.env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    exporter_url = f"http://127.0.0.1:{exporter_port}/metrics"
    try:
        wait_http(exporter_url, exporter, log)
        yield Served(dep, worker, model, Route(task=TASK, model=model),
                     Route(task=TASK, model=DOWN_MODEL),
                     f"http://127.0.0.1:{worker_port}/metrics", exporter_url)
    finally:
        exporter.terminate()
        exporter.wait(10)


@pytest.fixture(scope="module")
def traffic(served: Served) -> Traffic:
    dep = served.dep
    remote = dep.remote(TASK, served.model)
    jobs = [remote.submit("hello world"), remote.submit(["a b c", "the fox", "river bank"])]
    for job in jobs:
        assert job.result(60)
    expired = remote.submit("too late", timeout=0.001)
    with pytest.raises(JobExpired):
        expired.result(30)
    malformed_id = uuid.uuid4().hex
    # Messages may come from anywhere: one that is no JobRequest fails its job, no more.
    make_celery(dep.settings).send_task(
        dep.settings.keys.task_name(served.route), kwargs={"request": {"job_id": malformed_id}},
        queue=dep.settings.keys.queue(served.route), task_id=malformed_id)
    store = JobStore(dep.redis, dep.settings.keys, 60)

    def malformed_failed() -> None:
        record = store.get(malformed_id)
        assert record is not None and record.state == "FAILURE"
        assert record.error and "malformed job message" in record.error["message"]

    eventually(malformed_failed)
    queued = dep.remote(TASK, DOWN_MODEL).submit("nobody runs me", require_worker=False)
    return Traffic([j.id for j in jobs], expired.id, malformed_id, queued.id, inputs_run=4)


def test_status_shows_each_worker_and_fails_when_a_route_is_down(served: Served) -> None:
    dep = served.dep
    result = dep.cli("status")
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    up = next(i for i, line in enumerate(lines) if line.startswith("[ok ]"))
    assert served.model in lines[up] and "workers=1" in lines[up]
    worker_line = lines[up + 1]
    for part in ("host=", "device=cpu", "ready=True", "s ago", "memory="):
        assert part in worker_line, worker_line
    assert any(line.startswith("[DOWN]") and DOWN_MODEL in line for line in lines), lines

    status = json.loads(dep.cli("status", "--json").stdout)
    by_model = {s["route"].split(":", 1)[1]: s for s in status}
    worker = by_model[served.model]["workers"][0]
    assert worker["ready"] is True and worker["device"] == "cpu" and worker["host"]
    assert 0 <= worker["last_beat_age_s"] < 5
    assert worker["device_memory_bytes"] > 10 * 2**20
    assert by_model[DOWN_MODEL]["healthy"] is False and not by_model[DOWN_MODEL]["workers"]

    # A health check narrowed to the live route passes; one for the down route fails.
    assert dep.cli("status", "--route-task", TASK, "--route-model", served.model).returncode == 0
    assert dep.cli("status", "--route-task", TASK, "--route-model", DOWN_MODEL).returncode == 3


def test_exporter_reports_queues_workers_and_jobs_by_final_state(
        served: Served, traffic: Traffic) -> None:
    rid, down = served.route.id, served.down.id

    def counted() -> dict[Any, float]:
        samples = scrape(served.exporter_url)
        assert value(samples, "pipeq_jobs_total", route=rid, state="SUCCESS") == 2
        assert value(samples, "pipeq_jobs_total", route=rid, state="EXPIRED") == 1
        assert value(samples, "pipeq_jobs_total", route=rid, state="FAILURE") == 1
        assert value(samples, "pipeq_inputs_total", route=rid) == traffic.inputs_run
        return samples

    samples = eventually(counted)  # workers flush their batch totals every heartbeat
    assert value(samples, "pipeq_redis_up") == 1
    assert value(samples, "pipeq_jobs_total", route=rid, state="CANCELLED") == 0
    batches = value(samples, "pipeq_batches_total", route=rid)
    assert batches is not None and 1 <= batches <= traffic.inputs_run
    assert value(samples, "pipeq_batch_capacity_total", route=rid) == batches * MAX_BATCH
    assert (value(samples, "pipeq_inference_seconds_total", route=rid) or 0) > 0
    assert value(samples, "pipeq_jobs_started_total", route=rid) == 2
    assert (value(samples, "pipeq_queue_wait_seconds_total", route=rid) or 0) > 0
    assert value(samples, "pipeq_workers", route=rid) == 1
    assert value(samples, "pipeq_workers", route=down) == 0
    assert value(samples, "pipeq_queue_depth", route=rid, lane="interactive") == 0
    assert value(samples, "pipeq_queue_depth", route=down, lane="interactive") == 1
    assert value(samples, "pipeq_queue_depth", route=down, lane="bulk") == 0
    assert (value(samples, "pipeq_queue_oldest_age_seconds", route=down) or 0) > 0
    assert value(samples, "pipeq_route_info", route=down, task=TASK, model=DOWN_MODEL,
                 revision="") == 1
    memory = [v for (name, labels), v in samples.items()
              if name == "pipeq_device_memory_bytes" and ("route", rid) in labels]
    assert len(memory) == 1 and memory[0] > 10 * 2**20


def test_worker_port_reports_batches_waits_and_memory(served: Served, traffic: Traffic) -> None:
    rid = served.route.id
    samples = scrape(served.worker_metrics_url)
    assert value(samples, "pipeq_worker_ready", route=rid) == 1
    assert value(samples, "pipeq_worker_jobs_total", route=rid, state="SUCCESS") == 2
    assert value(samples, "pipeq_worker_jobs_total", route=rid, state="EXPIRED") == 1
    assert value(samples, "pipeq_worker_jobs_total", route=rid, state="FAILURE") == 1
    assert value(samples, "pipeq_worker_inputs_total", route=rid) == traffic.inputs_run
    batches = value(samples, "pipeq_worker_batch_size_count", route=rid)
    assert batches and value(samples, "pipeq_worker_batch_size_sum", route=rid) == 4
    assert value(samples, "pipeq_worker_batch_fill_ratio_sum", route=rid) == 4 / MAX_BATCH
    assert value(samples, "pipeq_worker_inference_seconds_count", route=rid) == batches
    assert value(samples, "pipeq_worker_queue_wait_seconds_count", route=rid) == 2
    # End to end, submit to record stored: one sample per job that reached a batch.
    assert value(samples, "pipeq_job_latency_seconds_count", route=rid, state="SUCCESS") == 2
    assert value(samples, "pipeq_job_latency_seconds_count", route=rid, state="EXPIRED") == 1
    waits = value(samples, "pipeq_worker_queue_wait_seconds_sum", route=rid) or 0
    latency = value(samples, "pipeq_job_latency_seconds_sum", route=rid, state="SUCCESS")
    assert latency is not None and latency > waits > 0
    rss = value(samples, "pipeq_worker_device_memory_bytes", route=rid, device="cpu", kind="rss")
    assert rss is not None and rss > 10 * 2**20


def test_worker_logs_one_json_line_per_batch_and_per_job(served: Served,
                                                         traffic: Traffic) -> None:
    entries = []
    for line in served.worker.log().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    assert entries, served.worker.log()
    rid = served.route.id
    batches = [e for e in entries if e["logger"] == "pipeq.batch"]
    batched = {job for e in batches for job in e["job_ids"]}
    assert set(traffic.success_ids) <= batched
    for entry in batches:
        assert entry["route"] == rid and entry["seconds"] >= 0 and entry["level"] == "INFO"
        assert 1 <= entry["batch_size"] <= MAX_BATCH
        assert entry["fill"] == entry["batch_size"] / MAX_BATCH
    jobs = {e["job_id"]: e for e in entries if e["logger"] == "pipeq.job"}
    for job_id in traffic.success_ids:
        assert jobs[job_id]["state"] == "SUCCESS" and jobs[job_id]["seconds"] > 0
        assert jobs[job_id]["route"] == rid and jobs[job_id]["error_type"] is None
    assert jobs[traffic.expired_id]["state"] == "EXPIRED"
    assert jobs[traffic.expired_id]["error_type"] == "JobExpired"
    assert jobs[traffic.malformed_id]["state"] == "FAILURE"
    assert jobs[traffic.malformed_id]["error_type"] == "ValidationError"
    assert traffic.queued_id not in jobs  # its route has no worker: still queued


def test_a_route_nobody_configured_or_serves_shows_from_its_queue(served: Served) -> None:
    """Jobs queued for a route with no worker and no routing-table entry are seen by
    ``pipeq status`` and the exporter (found from the queues under the prefix)."""
    dep = served.dep
    stray = Route(task=TASK, model="/models/nobody-configured-this")
    waiting = dep.remote(TASK, stray.model)
    for text in ("one", "two", "three"):
        waiting.submit(text, require_worker=False)
    status = {s["route_id"]: s for s in json.loads(dep.cli("status", "--json").stdout)}
    assert status[stray.id]["queue_depth"] == 3 and status[stray.id]["configured"] is False
    assert status[stray.id]["healthy"] is False and status[stray.id]["oldest_age_s"] >= 0
    lines = dep.cli("status").stdout.splitlines()
    assert any(ln.startswith("[DOWN]") and stray.model in ln and "queued=3" in ln
               for ln in lines), lines
    samples = scrape(served.exporter_url)
    assert value(samples, "pipeq_queue_depth", route=stray.id, lane="interactive") == 3
    assert value(samples, "pipeq_workers", route=stray.id) == 0
