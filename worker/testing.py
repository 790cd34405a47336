"""An in-process worker for tests: the real job path of a route, without Celery or a model.

:class:`InProcessWorker` assembles a route's service, batcher and job store exactly as a
worker does (``pipeq.worker.route.assemble``), on a real Redis, with a runner of your choice
(a real pipeline, or a stand-in such as :class:`EchoRunner`). It takes messages off the
route's queues with the worker's own claim script and hands them to the service, so jobs
submitted through ``pipeq.pipeline()`` run, are recorded and wake their callers as with a
real worker. ``drain()`` runs until the queues are empty and every job has left (a burst
mode, like arq's ``burst=True``); ``running()`` serves in a background thread meanwhile.

    spec = RouteSpec(task="text-classification", model="m")
    with InProcessWorker(settings, spec, EchoRunner("text-classification")) as worker:
        remote = pipeline("text-classification", model="m", settings=settings)
        job = remote.submit("hi", require_worker=False)
        worker.drain()
        job.result()
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

from pipeq.core.config import RouteSpec, Settings
from pipeq.core.keys import LANES
from pipeq.core.redis_io import as_text, connect
from pipeq.core.store import start_row
from pipeq.worker.batching.jobs import JobInFlight
from pipeq.worker.broker.claiming import CLAIM_SCRIPT, ClaimStart
from pipeq.worker.broker.strategy import job_body
from pipeq.worker.hooks import Middleware
from pipeq.worker.model.runner import PipelineRunner
from pipeq.worker.route import assemble
from pipeq.worker.service import RouteService


class EchoRunner(PipelineRunner):
    """A stand-in for a pipeline: each input's output tells its length; calls are recorded.

    ``fail_on``: inputs containing this text make their call raise ValueError (the batcher
    then isolates them); ``gate``: when set, every call first waits for it.
    """

    def __init__(self, task: str = "text-classification", fail_on: str | None = None,
                 gate: threading.Event | None = None):
        super().__init__(SimpleNamespace(task=task, device="cpu"))
        self.fail_on = fail_on
        self.gate = gate
        self.calls: list[list[Any]] = []
        self._lock = threading.Lock()

    def run(self, items: list[Any], params: dict[str, Any], **streaming: Any) -> list[Any]:
        """``{"label": "LEN", "score": len(item)}`` per input, after the gate."""
        if self.gate is not None:
            self.gate.wait(30)
        with self._lock:
            self.calls.append(list(items))
        if self.fail_on is not None and any(self.fail_on in str(i) for i in items):
            raise ValueError(f"input containing {self.fail_on!r} refused")
        return [{"label": "LEN", "score": len(str(i))} for i in items]


class CallbackSink:
    """A :class:`~pipeq.worker.batching.jobs.JobSink` made of callables (each optional):
    for tests that drive the batcher alone, without Redis."""

    def __init__(self, start: Callable[[list[JobInFlight]], None] | None = None,
                 finish: Callable[[list[JobInFlight]], None] | None = None,
                 returned: Callable[[list[JobInFlight]], None] | None = None):
        self._start = start
        self._finish = finish
        self._returned = returned

    def start_jobs(self, jobs: list[JobInFlight]) -> None:
        """Jobs enter their first batch."""
        if self._start is not None:
            self._start(jobs)

    def finish_jobs(self, jobs: list[JobInFlight]) -> None:
        """Jobs have their outcome."""
        if self._finish is not None:
            self._finish(jobs)

    def return_jobs(self, jobs: list[JobInFlight]) -> None:
        """Jobs were handed back unstarted."""
        if self._returned is not None:
            self._returned(jobs)


class HarnessDelivery:
    """A claimed message: acknowledging removes its unacked record, as kombu's ack does;
    requeueing puts it back on its queue."""

    def __init__(self, worker: InProcessWorker, queue_key: str, raw: bytes, tag: str | None,
                 summary: str):
        self.worker = worker
        self.queue_key = queue_key
        self.raw = raw
        self.delivery_tag = tag
        self.summary = summary

    def ack(self) -> None:
        """Forget the message: its job's record is stored."""
        self.worker.acked.append(self.delivery_tag)
        self._unrecord()

    def requeue(self) -> None:
        """Put the message back on its queue (its job was not started)."""
        self.worker.requeued.append(self.delivery_tag)
        self.worker.client.rpush(self.queue_key, self.raw)
        self._unrecord()

    def _unrecord(self) -> None:
        keys = self.worker.settings.keys
        if self.delivery_tag:
            with self.worker.client.pipeline() as pipe:
                pipe.zrem(keys.unacked_index(), self.delivery_tag)
                pipe.hdel(keys.unacked(), self.delivery_tag)
                pipe.execute()


class InProcessWorker:
    """One route's real job path in this process, fed from its real queues."""

    def __init__(self, settings: Settings, spec: RouteSpec,
                 runners: PipelineRunner | Sequence[PipelineRunner], *,
                 hostname: str = "pipeq.harness@localhost",
                 middleware: Sequence[Middleware] = (), call_overhead: float | None = None):
        self.settings = settings
        self.spec = spec
        self.client = connect(settings, socket_timeout_s=30)
        runner_list = [runners] if isinstance(runners, PipelineRunner) else list(runners)
        self.service: RouteService = assemble(spec, settings, self.client, hostname,
                                              runner_list, call_overhead=call_overhead,
                                              middleware=middleware)
        self.acked: list[str | None] = []
        self.requeued: list[str | None] = []
        self.taken = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> InProcessWorker:
        self.service.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop_background()
        self.service.begin_shutdown()
        self.service.drain(10)
        self.service.stop()

    def claim(self, count: int = 64) -> int:
        """Take up to ``count`` queued messages and hand them to the service; how many.

        As a worker's claim does, one that takes a single job while none is in flight also
        starts it (``claiming.ClaimStart``).
        """
        keys, route = self.settings.keys, self.spec.route
        queues = [keys.lane_queue_key(route, lane) for lane in LANES]
        start = ClaimStart(keys.result(""), keys.task_name(route), self.settings.result_ttl_s,
                           self.service.hostname)
        idle = self.service.in_flight() == 0
        reply = self.client.eval(CLAIM_SCRIPT, 5 + len(queues), keys.unacked(),
                                 keys.unacked_index(), keys.bell(route), keys.owners(),
                                 keys.held(""), *queues, repr(time.time()), count, "", 0,
                                 *(start.args() if idle else []))
        claimed = [reply[i:i + 4] for i in range(1, len(reply), 4)]
        for key, item, _recorded, started in claimed:
            self._hand_over(as_text(key), item, as_text(started))
        self.taken += len(claimed)
        return len(claimed)

    def drain(self, timeout: float = 10.0) -> int:
        """Run every queued job of the route until none is queued or in flight; returns how
        many messages were taken (AssertionError after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        taken = 0
        while True:
            claimed = self.claim()
            taken += claimed
            if not claimed and self.service.in_flight() == 0:
                return taken
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still in flight after {timeout}s: "
                                     f"{self.service.in_flight()}")
            if not claimed:
                time.sleep(0.002)

    @contextlib.contextmanager
    def running(self, poll_s: float = 0.002) -> Iterator[InProcessWorker]:
        """Serve the route from a background thread while the block runs."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(poll_s,), daemon=True,
                                        name="pipeq-harness")
        self._thread.start()
        try:
            yield self
        finally:
            self.stop_background()

    def stop_background(self) -> None:
        """Stop the background thread of :meth:`running` (if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _serve(self, poll_s: float) -> None:
        while not self._stop.is_set():
            if not self.claim():
                self._stop.wait(poll_s)

    def _hand_over(self, queue_key: str, raw: bytes, started: str = "") -> None:
        payload = json.loads(raw)
        headers = payload.get("headers") or {}
        job_id = str(headers.get("id") or "")
        delivery = HarnessDelivery(self, queue_key, raw,
                                   (payload.get("properties") or {}).get("delivery_tag"),
                                   str(headers.get("kwargsrepr") or ""))
        message = SimpleNamespace(decode=lambda: json.loads(base64.b64decode(payload["body"])))
        try:
            body = job_body(message, headers)
        except ValueError as exc:
            self.service.reject(job_id, str(exc), None, delivery)
            return
        self.service.accept(body, job_id, delivery, start_row(started) if started else None)
