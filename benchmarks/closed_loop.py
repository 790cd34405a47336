"""Closed-loop rows of one workload: the in-process limits, naive Celery, and pipeq.

In-process: one call at a time; sorted batches (the limit every ratio is taken against);
the closed-loop ceiling (the texts in groups of the producer count, in arrival order, each
group sorted and split into calls of at most 8: what a server with zero overhead could do
for producers that each wait for their answer). Naive Celery: one task per request, one
pipeline call per task, JSON results. pipeq: single requests from N producers, list jobs,
a bulk ``map()``, and light load (one request at a time: p50 added over the in-process call).

Single-request rows also say where the machine's cores went: CPU per job of the producer
(this process), the worker and Redis, and the cores busy in all (``cores_busy``), because in
this benchmark the producers and Redis share the cores the model runs on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any

from benchmarks.common import Setup, concurrent, cpu_seconds, percentile, pipeq_worker, row, start

#: The pause before each call of the light-load row's idle reference: about the time a
#: worker's cores rest between two requests under light load (the queue's hops, ~5-6 ms).
IDLE_PAUSE_S = 0.005


def in_process_rows(task: str, model: str, texts: list[str], setup: Setup, producers: int,
                    label: str) -> tuple[list[dict[str, Any]], Any]:
    """The in-process rows of ``task``; also the local pipeline (for the light-load row)."""
    import torch
    import transformers

    pipe = transformers.pipeline(task, model=model, device=setup.device)
    pipe(texts[:8], batch_size=8)
    with torch.inference_mode():
        latencies = []
        started = time.perf_counter()
        for text in texts:
            t0 = time.perf_counter()
            pipe(text)
            latencies.append(time.perf_counter() - t0)
    seq = row(f"{label}: in-process sequential", len(texts), time.perf_counter() - started,
              latencies)
    batched, ceiling = limit_rows(pipe, texts, setup.batch, producers, label)
    return [seq, batched, ceiling], pipe


def limit_rows(pipe: Any, texts: list[str], batch: int, producers: int, label: str
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The limit (sorted batches of ``batch``) and the closed-loop ceiling of ``producers``.

    The benchmark takes them again after pipeq's closed-loop rows (``req_per_s_end``): on a
    shared VM the machine's speed drifts over the minutes between, and a ratio read
    against a limit that moved says more about the VM than about pipeq.
    """
    import torch

    with torch.inference_mode():
        ordered = sorted(texts, key=len)
        batch_lat = []
        started = time.perf_counter()
        for i in range(0, len(ordered), batch):
            t0 = time.perf_counter()
            pipe(ordered[i:i + batch], batch_size=batch)
            batch_lat.append(time.perf_counter() - t0)
        batched = row(f"{label}: in-process batched (sorted, {batch}) = limit", len(texts),
                      time.perf_counter() - started, batch_lat, limit=True)
        ceiling_lat = []
        started = time.perf_counter()
        for i in range(0, len(texts), producers):
            group = sorted(texts[i:i + producers], key=len)
            for j in range(0, len(group), 8):
                t0 = time.perf_counter()
                pipe(group[j:j + 8], batch_size=8)
                ceiling_lat.append(time.perf_counter() - t0)
        ceiling = row(f"{label}: in-process, groups of {producers} (ceiling for {producers} "
                      "producers)", len(texts), time.perf_counter() - started, ceiling_lat,
                      ceiling=producers)
    return batched, ceiling


def naive_row(task: str, model: str, texts: list[str], setup: Setup, producers: int,
              label: str) -> dict[str, Any]:
    """One Celery task per request, one pipeline call per task (solo pool, JSON results)."""
    from benchmarks.naive_worker import make_app

    queue = f"naive-{uuid.uuid4().hex[:6]}"
    proc = start([sys.executable, "benchmarks/naive_worker.py", setup.redis_url, task, model,
                  queue, setup.device], dict(os.environ), "naive worker ready",
                 setup.workdir / f"{queue}.log")
    local = threading.local()

    def call(text: str) -> Any:
        if not hasattr(local, "app"):  # Celery's result consumer is per thread here
            local.app = make_app(setup.redis_url)
        return local.app.send_task("naive.run", args=(text,), queue=queue).get(timeout=300)

    try:
        call("warm-up")
        seconds, latencies = concurrent(texts, producers, call)
    finally:
        proc.terminate()
        proc.wait(30)
    return row(f"{label}: naive Celery, {producers} producers", len(texts), seconds,
               latencies)


def pipeq_rows(task: str, model: str, texts: list[str], setup: Setup, producer_counts: list[int],
               list_size: int, local: Any, label: str) -> list[dict[str, Any]]:
    """pipeq single-request jobs, list jobs, a bulk map() and light-load latency."""
    rows = []
    with pipeq_worker(setup, task, model) as remote:
        remote(texts[:16])
        for producers in producer_counts:
            pids = {"producer": None, "worker": remote.worker_pid}  # None: this process
            if setup.redis_pid:
                pids["redis"] = setup.redis_pid
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            seconds, latencies = concurrent(texts, producers, lambda t: remote(t))
            used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            rows.append(row(f"{label}: pipeq single requests, {producers} producers",
                            len(texts), seconds, latencies, producers=producers,
                            **{f"cpu_ms_{name}": round(1000 * cpu / len(texts), 2)
                               for name, cpu in used.items()},
                            cores_busy=round(sum(used.values()) / seconds, 2)))
        chunks = [texts[i:i + list_size] for i in range(0, len(texts), list_size)]
        list_producers = max(1, min(4, len(chunks)))
        seconds, latencies = concurrent(chunks, list_producers, lambda c: remote(c))
        rows.append(row(f"{label}: pipeq list jobs ({list_size} inputs/job)", len(texts),
                        seconds, latencies))
        started = time.perf_counter()
        done = sum(1 for _ in remote.map(texts, chunk_size=list_size, max_in_flight=8))
        rows.append(row(f"{label}: pipeq bulk map() ({list_size}/chunk, 8 in flight)", done,
                        time.perf_counter() - started, [time.perf_counter() - started]))
        rows.append(light_load_row(remote, local, texts[:200], label))
    return rows


def light_load_row(remote: Any, local: Any, texts: list[str], label: str,
                   block: int = 20) -> dict[str, Any]:
    """One request at a time: blocks of ``block`` texts called in-process, then the same
    texts through pipeq, in turn, so that drift in a shared machine's speed falls on both
    (alternating every call instead let the idle worker's model threads slow the next local
    call). p50 added over the local call (``added_p50_ms``, the goal's measure).

    A third block calls the local pipeline again, each call after an idle pause
    (``IDLE_PAUSE_S``): back-to-back local calls run on busy cores, while a worker's call
    always follows a rest of its cores (the request's way to it), and on a VM a call after
    a rest is slower by itself. ``added_over_idle_p50_ms`` is the p50 added over that call:
    what the queue adds beyond the machine's own cost of waking up.
    """
    import torch

    lat, local_lat, idle_lat = [], [], []
    for first in range(0, len(texts), block):
        part = texts[first:first + block]
        with torch.inference_mode():
            for text in part:
                t0 = time.perf_counter()
                local(text)
                local_lat.append(time.perf_counter() - t0)
            for text in part:
                time.sleep(IDLE_PAUSE_S)
                t0 = time.perf_counter()
                local(text)
                idle_lat.append(time.perf_counter() - t0)
        for text in part:
            t0 = time.perf_counter()
            remote(text)
            lat.append(time.perf_counter() - t0)
    added = percentile(lat, 50) - percentile(local_lat, 50)
    added_over_idle = percentile(lat, 50) - percentile(idle_lat, 50)
    return row(f"{label}: pipeq light load (1 at a time)", len(texts), sum(lat), lat,
               added_p50_ms=round(1000 * added, 2),
               local_p50_ms=round(1000 * percentile(local_lat, 50), 2),
               local_after_idle_p50_ms=round(1000 * percentile(idle_lat, 50), 2),
               added_over_idle_p50_ms=round(1000 * added_over_idle, 2))
