"""The naive baseline: one Celery task per request, one pipeline call per task.

This is the common pattern pipeq is measured against: a solo-pool worker holding the
pipeline, the result returned through Celery's Redis result backend as JSON.
Run: python benchmarks/naive_worker.py REDIS_URL TASK MODEL_DIR QUEUE [DEVICE]
"""

from __future__ import annotations

import json
import sys
from typing import Any

from celery import Celery


def make_app(redis_url: str) -> Celery:
    """The baseline's Celery app (JSON, Redis broker and backend)."""
    app = Celery("naive", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    worker_hijack_root_logger=False, result_expires=3600)
    return app


def main() -> int:
    """Start the baseline worker."""
    redis_url, task, model, queue = sys.argv[1:5]
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    import transformers

    pipe = transformers.pipeline(task, model=model, device=device)
    pipe("warm-up")
    app = make_app(redis_url)

    @app.task(name="naive.run")
    def run(text: str) -> Any:
        return json.loads(json.dumps(pipe(text), default=lambda v: v.tolist()))

    worker = app.Worker(pool="solo", queues=[queue], loglevel="WARNING", quiet=True,
                        without_mingle=True, without_gossip=True)
    print("naive worker ready", flush=True)
    worker.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
