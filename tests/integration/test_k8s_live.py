"""The Kubernetes manifests' moving parts, run for real on one machine: the KEDA queries on
what the real ``pipeq metrics`` serves, the scale-to-zero path (a job queued while no worker
exists, served once one starts), and the workers' probe script from its ConfigMap.

The exporter runs with the manifests' own routing table (ConfigMap pipeq-routes), against a
real Redis; the worker is a real ``pipeq worker`` on the CPU with a tiny model. What KEDA
would see is computed from the scraped samples with the ScaledObjects' own PromQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, Deployment
from k8s_support import (
    Sample,
    configmap_data,
    container_env,
    evaluate,
    grouping_labels,
    of_kind,
    routes_toml,
    selectors,
    worker_deployments,
)
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import build_text_model

from pipeq.core.contract import Route
from pipeq.errors import NoWorkerError
from pipeq.ops.embedded import free_port

TINY_TASK = "text-classification"


def scrape(url: str) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def keda_queries(scaled_name: str, route: Route | None = None) -> dict[str, str]:
    """A ScaledObject's queries by trigger name; for ``route``, the same queries with its id
    in place of the manifest's (what an operator writes for another route)."""
    scaled = of_kind("ScaledObject")[scaled_name]
    env = container_env(next(c for c in worker_deployments()[
        scaled["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]["containers"]))
    own = Route(task=env["PIPEQ_WORKER_TASK"], model=env["PIPEQ_WORKER_MODEL"],
                revision=env.get("PIPEQ_WORKER_REVISION")).id
    return {t["name"]: t["metadata"]["query"].replace(own, route.id if route else own)
            for t in scaled["spec"]["triggers"]}


def wait_for(check: Callable[[], object], timeout: float = 30.0) -> None:
    """Retry ``check`` until it returns something truthy without raising AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout}s: {check}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def tiny_model(models_dir: Path) -> str:
    return str(build_text_model(TINY_TASK, models_dir))


@pytest.fixture(scope="module")
def exporter(module_deployment: Deployment, tiny_model: str) -> Iterator[str]:
    """``pipeq metrics`` on the manifests' routing table plus the tiny route."""
    dep = module_deployment
    (dep.workdir / "routes.toml").write_text(
        routes_toml() + f'\n[[route]]\ntask = "{TINY_TASK}"\nmodel = "{tiny_model}"\n')
    port = free_port()
    log = dep.workdir / "exporter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipeq", "metrics", "--port", str(port),
             "--address", "127.0.0.1"], env=dep.env(), stdout=out, stderr=subprocess.STDOUT,
            cwd=ROOT)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def run_probe(dep: Deployment, mode: str, task: str, model: str,
              **env: str) -> subprocess.CompletedProcess[str]:
    """The workers' probe script, from its ConfigMap, as the kubelet runs it in a pod."""
    script = dep.workdir / "worker_probe.py"
    script.write_text(configmap_data("pipeq-worker-probe")["worker_probe.py"])
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    probe_env = dep.env(PIPEQ_WORKER_TASK=task, PIPEQ_WORKER_MODEL=model, PATH=path, **env)
    return subprocess.run([sys.executable, str(script), mode], env=probe_env,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_keda_sees_a_scaled_to_zero_routes_backlog(module_deployment: Deployment,
                                                   exporter: str) -> None:
    """The A100 route has no worker: jobs are still accepted with require_worker=False,
    and the ScaledObject's own queries, run on the real exporter's output, wake it."""
    dep = module_deployment
    queries = keda_queries("pipeq-worker-a100")
    samples = scrape(exporter)
    # Known from the routing table alone: series exist (0, not "no data") before any job.
    assert evaluate(queries["depth"], samples) == 0.0
    assert evaluate(queries["age"], samples) == 0.0
    for scaled in of_kind("ScaledObject"):
        for query in keda_queries(scaled).values():
            assert evaluate(query, samples) is not None, f"{scaled}: no series for {query}"

    env = container_env(worker_deployments()["pipeq-worker-a100"]["spec"]["template"]["spec"][
        "containers"][0])
    remote = dep.remote(env["PIPEQ_WORKER_TASK"], env["PIPEQ_WORKER_MODEL"])
    with pytest.raises(NoWorkerError, match="require_worker=False"):
        remote.submit("Hello")  # the default refuses: no live worker serves the route
    job = remote.submit("Hello", require_worker=False, timeout=1800)
    try:
        trigger = {t["name"]: t for t in of_kind("ScaledObject")["pipeq-worker-a100"]["spec"][
            "triggers"]}

        def woken() -> None:
            now = scrape(exporter)
            depth, age = evaluate(queries["depth"], now), evaluate(queries["age"], now)
            assert depth == 1.0, depth
            assert depth > float(trigger["depth"]["metadata"]["activationThreshold"])
            assert age is not None and age > 0.0
            return True

        wait_for(woken)
        assert job.status() == "PENDING"
    finally:
        job.cancel()


def test_alert_rules_use_series_the_exporter_emits(exporter: str) -> None:
    samples = scrape(exporter)
    emitted: dict[str, set[str]] = {}
    for name, labels, _ in samples:
        emitted.setdefault(name, set()).update(labels)
    rules = yaml.safe_load(configmap_data("pipeq-alerts")["pipeq-alerts.yaml"])
    import promql_parser

    for rule in (r for g in rules["groups"] for r in g["rules"]):
        expr = promql_parser.parse(rule["expr"])
        names = {s.name for s in selectors(expr)}
        ours = {n for n in names if n.startswith("pipeq_")}
        for name in ours:
            assert name in emitted, f"{rule['alert']}: the exporter emits no {name}"
            used = {m.name for s in selectors(expr) if s.name == name
                    for m in s.matchers.matchers}
            assert used <= emitted[name], f"{rule['alert']}: {name} has no {used}"
        if ours:
            labels = set().union(*(emitted[n] for n in ours))
            assert set(grouping_labels(expr)) <= labels, rule["alert"]
        else:  # redis_exporter's series (the Redis pods' sidecar): not run here
            assert names and all(n.startswith("redis_") for n in names), rule["alert"]


def test_a_queued_job_is_served_once_a_worker_starts(module_deployment: Deployment,
                                                     exporter: str, tiny_model: str) -> None:
    """Scale from zero as KEDA does it: the job waits, the backlog query says so, a worker
    starts (what KEDA's scale-up does), answers the job, and the probe turns ready."""
    from transformers import pipeline as local_pipeline

    dep = module_deployment
    route = Route(task=TINY_TASK, model=tiny_model)
    queries = keda_queries("pipeq-worker-l4", route)
    probe = run_probe(dep, "ready", TINY_TASK, tiny_model)
    assert probe.returncode == 1 and "no worker" in probe.stdout, probe

    job = dep.remote(TINY_TASK, tiny_model).submit("the river bank", require_worker=False)
    wait_for(lambda: evaluate(queries["depth"], scrape(exporter)) == 1.0)
    started = time.monotonic()
    worker = dep.start_worker(TINY_TASK, tiny_model, ready=False)
    result = job.result(timeout=180)
    cold_start_s = time.monotonic() - started
    expected = local_pipeline(TINY_TASK, model=tiny_model)("the river bank")
    assert [r["label"] for r in result] == [e["label"] for e in expected]
    assert [r["score"] for r in result] == pytest.approx([e["score"] for e in expected], abs=1e-5)
    print(f"cold start (CPU, tiny model): worker start to answer {cold_start_s:.1f}s")

    def drained() -> None:
        now = scrape(exporter)
        assert evaluate(queries["depth"], now) == 0.0
        workers = evaluate(f'sum(pipeq_workers{{route="{route.id}"}})', now)
        assert workers == 1.0, workers
        return True

    wait_for(drained)
    for mode in ("ready", "live"):
        probe = run_probe(dep, mode, TINY_TASK, tiny_model)
        assert probe.returncode == 0, (mode, probe.stdout, probe.stderr)
    assert worker.stop() == 0, worker.log()
    wait_for(lambda: run_probe(dep, "live", TINY_TASK, tiny_model).returncode == 1)


def test_probe_keeps_a_worker_alive_while_redis_is_unreachable(
        module_deployment: Deployment, tiny_model: str) -> None:
    """Restarting a GPU worker would not bring Redis back: live passes, ready fails."""
    closed = f"redis://127.0.0.1:{free_port()}/0"
    live = run_probe(module_deployment, "live", TINY_TASK, tiny_model, PIPEQ_REDIS_URL=closed)
    ready = run_probe(module_deployment, "ready", TINY_TASK, tiny_model,
                      PIPEQ_REDIS_URL=closed)
    assert live.returncode == 0 and "Redis cannot be reached" in live.stdout, live
    assert ready.returncode == 1 and "Redis cannot be reached" in ready.stdout, ready
