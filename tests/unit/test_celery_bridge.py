"""What ``celery inspect reserved`` / ``active`` list for pipeq jobs: Celery's worker state,
filled by the CeleryBridge (the integration tests drive the real commands)."""

from __future__ import annotations

import time

from celery.worker import state

from pipeq.core.contract import JobRequest, Route, new_job_id
from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.broker.events import CeleryBridge

ROUTE = Route(task="text-classification", model="org/m")
TASK = "pipeq.run[text-classification.m.0123456789]"


def test_jobs_read_as_their_routes_tasks_from_reserved_to_settled() -> None:
    bridge = CeleryBridge(TASK, "w1@host")
    # The job's request carries its own Route (parsed from the message): equal, not the same.
    job = JobInFlight(JobRequest(job_id=new_job_id(), route=Route(task="text-classification",
                                                                   model="org/m"),
                                 inputs=["hi"], single=True, submitted_at=time.time()))
    bridge.after_accept(job)
    try:
        [view] = [r for r in state.reserved_requests if r.id == job.job_id]
        info = view.info()
        assert (info["name"], info["hostname"]) == (TASK, "w1@host")
        assert info["delivery_info"]["routing_key"] == ROUTE.id == job.request.route.id
        assert job.job_id not in {r.id for r in state.active_requests}
        bridge.after_jobs_started([job])
        assert job.job_id in {r.id for r in state.active_requests}
        assert view.info()["time_start"] is not None
    finally:
        job.succeed(["done"])
        bridge.after_settled([job.ended()])
    assert job.job_id not in {r.id for r in state.reserved_requests}
    assert job.job_id not in {r.id for r in state.active_requests}
