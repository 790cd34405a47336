"""How Celery's consumer hands pipeq jobs to the route service: a task *strategy*.

Celery runs each task message through a strategy (``Task.Strategy``); its default builds a
Request and runs the task on a pool thread. pipeq's strategy hands the message straight to
:meth:`RouteService.accept` on the consumer's own thread: no pool thread waits per job (the
batcher runs the jobs), and messages are acknowledged by the service once the job's record is
stored, through :class:`LoopSettler` on the consumer's event loop, a whole batch at a time.

A message the strategy cannot read as a pipeq job (positional arguments, an ``eta``, extra
arguments, a body of another shape) is recorded as a FAILURE of its job and kept as a dead
letter (the consumer's ``on_invalid_task``): nothing is held forever, nothing runs that pipeq
did not send.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from celery.exceptions import InvalidTaskError
from kombu.exceptions import ContentDisallowed, DecodeError

from pipeq.core.contract import JobState
from pipeq.core.store import start_row
from pipeq.worker.broker.claiming import CLAIM_START_PROPERTY
from pipeq.worker.broker.events import CeleryBridge
from pipeq.worker.service import RouteService

log = logging.getLogger("pipeq.consumer")

#: Celery message headers that ask for what pipeq jobs do not do (their deadline is theirs).
_REFUSED_HEADERS = {"eta": "an eta or countdown", "expires": "a Celery expiry",
                    "chord": "a chord", "group": "a group"}



class CeleryDelivery:
    """A job's kombu message, settled on the consumer's event loop."""

    __slots__ = ("delivery_tag", "message", "summary")

    def __init__(self, message: Any):
        self.message = message
        self.delivery_tag: str | None = getattr(message, "delivery_tag", None)
        headers = message.headers if isinstance(message.headers, dict) else {}
        self.summary = str(headers.get("kwargsrepr") or "")

    def ack(self) -> None:
        """Acknowledge the message (its job's record is stored)."""
        self.message.ack()

    def requeue(self) -> None:
        """Give the message back to its queue (its job was not started here)."""
        self.message.reject(requeue=True)


class LoopSettler:
    """Runs settling closures on the consumer's event loop, many per wake-up.

    kombu channels are not meant to be shared across threads, so acknowledgements made by
    batcher threads are queued here and run by the loop. While the worker drains at
    shutdown the loop is blocked; settling then runs at once, under a lock.
    """

    def __init__(self) -> None:
        self.hub: Any = None
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._scheduled = False
        self._lock = threading.Lock()
        self._direct = threading.Event()

    def bind(self, hub: Any) -> None:
        """Use the consumer's event loop (None: run closures at once)."""
        self.hub = hub

    def __call__(self, closure: Callable[[], None]) -> None:
        hub = self.hub
        if self._direct.is_set() or hub is None:
            with self._lock:
                closure()
            return
        with self._lock:
            self._pending.append(closure)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule:
            hub.call_soon(self.run_pending)

    def run_pending(self) -> None:
        """Run every queued closure (on the loop thread)."""
        with self._lock:
            self._scheduled = False
            closures, self._pending = self._pending, collections.deque()
            for closure in closures:
                try:
                    closure()
                except Exception:  # one job's settling never stops another's
                    log.exception("settling messages failed")

    def go_direct(self) -> None:
        """From now on run closures at once (the loop stops), after those still queued."""
        self._direct.set()
        self.run_pending()


def job_strategy(service: RouteService, settler: LoopSettler,
                 bridge: CeleryBridge) -> Callable[..., Any]:
    """A ``Task.Strategy`` factory for the route's task: Celery calls it with
    (task, app, consumer) each time its consumer (re)starts."""

    def start_strategy(task: Any, app: Any, consumer: Any, **_: Any) -> Callable[..., None]:
        settler.bind(consumer.hub)
        bridge.bind(consumer)

        def on_message(message: Any, body: Any = None, ack: Any = None, reject: Any = None,
                       callbacks: Any = None, **__: Any) -> None:
            headers = message.headers if isinstance(message.headers, dict) else {}
            job_id = headers.get("id")
            if not isinstance(job_id, str) or not job_id or len(job_id) > 128:
                # No job to record a failure for: the consumer dead-letters the message.
                raise InvalidTaskError(f"no usable task id in the message headers: {job_id!r}")
            try:
                request = job_body(message, headers)
            except (ContentDisallowed, DecodeError):
                raise  # Celery's consumer keeps the undecodable message as a dead letter
            except Exception as exc:
                # The job ends with a FAILURE record (someone may wait for it), and the
                # consumer keeps the message as a dead letter for the operator.
                reason = str(exc) if isinstance(exc, ValueError) else (
                    f"the worker could not read the message: {type(exc).__name__}: {exc}")
                service.reject(job_id, reason, None, None)
                raise InvalidTaskError(reason) from None
            service.accept(request, job_id, CeleryDelivery(message), claim_start(message))

        return on_message

    return start_strategy


def claim_start(message: Any) -> tuple[JobState, int] | None:
    """How the claim that took ``message`` started its job (state before, starts), or None
    when it left the start to the batcher (``claiming.ClaimStart``)."""
    properties = getattr(message, "properties", None)
    row = properties.get(CLAIM_START_PROPERTY) if isinstance(properties, dict) else None
    return start_row(row) if row else None


def job_body(message: Any, headers: dict[str, Any]) -> Any:
    """The job request of a Celery protocol 2 message; ValueError saying why not."""
    refused = [what for name, what in _REFUSED_HEADERS.items() if headers.get(name)]
    if headers.get("timelimit") not in (None, [None, None], (None, None)):
        refused.append("a Celery time limit (a route's timeout_s limits its run time)")
    if refused:
        raise ValueError(f"malformed job message: pipeq jobs do not take "
                         f"{' or '.join(refused)}; a job's deadline is its request's")
    body = message.decode()
    if not (isinstance(body, (list, tuple)) and len(body) == 3):
        raise ValueError("malformed job message: not a Celery protocol 2 body "
                         "[args, kwargs, embed]")
    args, kwargs, _embed = body
    if args:
        raise ValueError("malformed job message: pipeq jobs take no positional arguments, "
                         "only request=...")
    if not isinstance(kwargs, dict) or set(kwargs) != {"request"}:
        keys = sorted(kwargs) if isinstance(kwargs, dict) else type(kwargs).__name__
        raise ValueError(f"malformed job message: expected kwargs {{'request': ...}}, got "
                         f"{keys}")
    return kwargs["request"]
