"""Per-job cost: draining jobs of a trivial model, against raw Celery's no-op task.

3,000 single-input jobs submitted at once, then awaited. The model is tiny (the 2-layer,
32-wide BERT classifier of tests/tiny_models.py) and each input is short ("job 17": 9
tokens; about 0.15 ms of pipeline CPU per input in batches), so what is measured is mostly
the queue's own cost per job: producer, Redis and worker. The baseline is a raw Celery no-op
task (JSON, acks_late, threads pool, Redis result backend) drained on the same Redis.

Two figures per side: wall-clock jobs/s, and CPU per job of the worker, the producer and
Redis (read from /proc, so other load on a shared machine does not inflate it). pipeq's
*queue overhead* is its CPU per job less what the transformers pipeline itself spends per
input (measured in-process, batches of 32, one torch thread, as each of the worker's CPU
instances runs); Celery's is all of its CPU per job, since its task does nothing.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

from benchmarks.common import ROOT, Setup, cpu_seconds, pipeq_worker, row, start


def tiny_classifier(setup: Setup) -> str:
    """The tiny text-classification model of the tests, built into the work folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_text_model

    return str(build_text_model("text-classification", setup.workdir / "models"))


class CpuMeter:
    """CPU seconds used by a worker, this (producer) process and Redis between two points."""

    def __init__(self, worker_pid: int, redis_pid: int | None):
        self.pids = {"worker": worker_pid, "redis": redis_pid}
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        got = {name: cpu_seconds(pid) for name, pid in self.pids.items() if pid}
        got["producer"] = cpu_seconds()
        return got

    def per_job_ms(self, jobs: int) -> dict[str, float]:
        end = self._read()
        return {f"cpu_ms_{k}": round(1000 * (end[k] - self.start[k]) / jobs, 3) for k in end}


def model_cpu_ms_per_input(model: str, texts: list[str], device: str) -> float:
    """The pipeline's own CPU per input: in-process on ``device``, batches of 32, one torch
    thread."""
    import torch
    from transformers import pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = pipeline("text-classification", model=model, device=device)
        local(texts[:64], batch_size=32)
        started = cpu_seconds()
        for i in range(0, len(texts), 32):
            local(texts[i:i + 32], batch_size=32)
        return 1000 * (cpu_seconds() - started) / len(texts)
    finally:
        torch.set_num_threads(threads)


def _overhead(cpu: dict[str, float], model_ms: float = 0.0) -> float:
    return round(sum(v for k, v in cpu.items() if k.startswith("cpu_ms_")) - model_ms, 3)


def drain_rows(setup: Setup, count: int) -> list[dict[str, Any]]:
    """Raw Celery's no-op drain, then pipeq's, on the same jobs; ratios pipeq / Celery."""
    texts = [f"job {i}" for i in range(count)]
    from benchmarks.noop_worker import make_app

    queue = f"noop-{uuid.uuid4().hex[:6]}"
    proc = start([sys.executable, "benchmarks/noop_worker.py", setup.redis_url, queue],
                 dict(os.environ), "noop worker ready", setup.workdir / f"{queue}.log")
    try:
        app = make_app(setup.redis_url)
        app.send_task("noop.run", args=("warm-up",), queue=queue).get(timeout=60)
        meter = CpuMeter(proc.pid, setup.redis_pid)
        started = time.perf_counter()
        pending = [app.send_task("noop.run", args=(t,), queue=queue) for t in texts]
        for result in pending:
            result.get(timeout=300)
        raw_s = time.perf_counter() - started
        raw_cpu = meter.per_job_ms(len(texts))
    finally:
        proc.terminate()
        proc.wait(30)
    raw = row("drain: raw Celery no-op task (acks_late, threads, Redis results)", len(texts),
              raw_s, [raw_s], **raw_cpu, queue_overhead_ms=_overhead(raw_cpu))
    model = tiny_classifier(setup)
    with pipeq_worker(setup, "text-classification", model) as remote:
        remote(texts[:64])
        meter = CpuMeter(remote.worker_pid, setup.redis_pid)
        started = time.perf_counter()
        jobs = [remote.submit(t) for t in texts]
        submitted_s = time.perf_counter() - started
        for job in jobs:
            job.result(timeout=300)
        pipeq_s = time.perf_counter() - started
        cpu = meter.per_job_ms(len(texts))
    model_ms = round(model_cpu_ms_per_input(model, texts, setup.device), 3)
    overhead = _overhead(cpu, model_ms)
    ours = row("drain: pipeq jobs of a tiny model", len(texts), pipeq_s, [pipeq_s],
               submit_ms_per_job=round(1000 * submitted_s / len(texts), 3),
               x_raw_celery=round(raw_s / pipeq_s, 2), **cpu, model_cpu_ms=model_ms,
               queue_overhead_ms=overhead,
               x_raw_celery_overhead=round(_overhead(raw_cpu) / max(overhead, 1e-3), 2))
    return [raw, ours]
