"""A worker told to stop right after a burst of jobs stops promptly (real worker, real Redis).

Celery's SIGTERM handler runs on the consumer's thread wherever it happens to be, often in
the middle of settling a batch of finished jobs. pipeq finishes the jobs in hand only after
the event loop has ended (never inside the handler): once, finishing them inside the handler
deadlocked on the settling lock and the worker hung until it was killed.
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Deployment
from tiny_models import build_text_model

TASK = "text-classification"


def test_sigterm_right_after_a_burst_stops_within_seconds(deployment: Deployment,
                                                          models_dir: Path) -> None:
    model = str(build_text_model(TASK, models_dir))
    worker = deployment.start_worker(TASK, model, env={"PIPEQ_LOG_LEVEL": "WARNING"})
    remote = deployment.remote(TASK, model)
    # The answers reach the producer before their messages are settled: signalled at once,
    # the worker is in the middle of settling the burst's last batches (quiet logs make it
    # likelier: the settling runs faster and back to back).
    jobs = [remote.submit(f"job {i}") for i in range(3000)]
    assert all(job.result(timeout=120) for job in jobs)
    asked = time.monotonic()
    code = worker.stop(timeout=60)
    took = time.monotonic() - asked
    assert code == 0, worker.log()[-3000:]
    assert took < 15, f"the worker took {took:.1f}s to stop after SIGTERM"
