"""Raw Celery's per-job cost: a no-op task (JSON, acks_late, threads pool, Redis results).

The drain benchmark measures pipeq's per-job cost against this worker draining the same
number of jobs on the same Redis. Run: python benchmarks/noop_worker.py REDIS_URL QUEUE
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery


def make_app(redis_url: str) -> Celery:
    """The no-op worker's Celery app: JSON, acks_late, Redis broker and result backend."""
    app = Celery("noop", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    task_acks_late=True, worker_prefetch_multiplier=4,
                    worker_hijack_root_logger=False, result_expires=3600)
    return app


def main() -> int:
    """Start the no-op worker."""
    redis_url, queue = sys.argv[1:3]
    app = make_app(redis_url)

    @app.task(name="noop.run")
    def run(text: str) -> Any:
        return text

    worker = app.Worker(pool="threads", concurrency=8, queues=[queue], loglevel="WARNING",
                        quiet=True, without_mingle=True, without_gossip=True)
    print("noop worker ready", flush=True)
    worker.start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
