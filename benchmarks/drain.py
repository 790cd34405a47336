"""Per-job cost: draining jobs of a trivial model, against raw Celery's no-op task.

3,000 single-input jobs submitted at once, then awaited. The model is tiny (the 2-layer,
32-wide BERT classifier of tests/tiny_models.py; a batched call takes about a millisecond),
so what is measured is the queue's own cost per job: producer, Redis and worker. The
baseline is a raw Celery no-op task (JSON, acks_late, threads pool, Redis result backend)
drained on the same Redis.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

from benchmarks.common import ROOT, Setup, pipeq_worker, row, start


def tiny_classifier(setup: Setup) -> str:
    """The tiny text-classification model of the tests, built into the work folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_text_model

    return str(build_text_model("text-classification", setup.workdir / "models"))


def drain_rows(setup: Setup, texts: list[str]) -> list[dict[str, Any]]:
    """Raw Celery's no-op drain, then pipeq's, on the same jobs; ratio pipeq / Celery."""
    from benchmarks.noop_worker import make_app

    queue = f"noop-{uuid.uuid4().hex[:6]}"
    proc = start([sys.executable, "benchmarks/noop_worker.py", setup.redis_url, queue],
                 dict(os.environ), "noop worker ready", setup.workdir / f"{queue}.log")
    try:
        app = make_app(setup.redis_url)
        app.send_task("noop.run", args=("warm-up",), queue=queue).get(timeout=60)
        started = time.perf_counter()
        pending = [app.send_task("noop.run", args=(t,), queue=queue) for t in texts]
        for result in pending:
            result.get(timeout=300)
        raw_s = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)
    raw = row("drain: raw Celery no-op task (acks_late, threads, Redis results)", len(texts),
              raw_s, [raw_s])
    with pipeq_worker(setup, "text-classification", tiny_classifier(setup)) as remote:
        remote(texts[:64])
        started = time.perf_counter()
        jobs = [remote.submit(t) for t in texts]
        submitted_s = time.perf_counter() - started
        for job in jobs:
            job.result(timeout=300)
        pipeq_s = time.perf_counter() - started
    ours = row("drain: pipeq jobs of a tiny model", len(texts), pipeq_s, [pipeq_s],
               submit_ms_per_job=round(1000 * submitted_s / len(texts), 3),
               x_raw_celery=round(raw_s / pipeq_s, 2))
    return [raw, ours]
