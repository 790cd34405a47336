"""Celery's consumer, with dead letters instead of silent drops.

Celery acknowledges (deletes) a message it cannot decode and rejects (deletes) one that is
not a task: on Redis both vanish. pipeq's consumer first keeps such a message in the
dead-letter list with the reason, then lets Celery drop it; the worker goes on.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import WorkerShutdown, WorkerTerminate
from celery.worker.consumer import Consumer
from vine import promise

from pipeq.core.deadletters import DeadLetters

log = logging.getLogger("pipeq.consumer")

#: Task events (for Flower) are sent at most this often, many per message: Celery sends
#: them on every turn of its event loop, one Redis publish each (measured: the largest
#: per-job CPU cost in a busy worker after the job itself). Each send is a burst of work on
#: the worker's main thread that slows the model call it overlaps: at one request at a time
#: (MiniLM, 2 cores) sending every 50 ms added ~2 ms to a call, every 0.5 s next to nothing.
#: Flower learns of a job up to this much later.
EVENT_FLUSH_S = 0.5
#: Or as soon as this many task events wait (Celery's default is 24: under load that was a
#: send every ~8 jobs).
EVENT_BUFFER = 500
#: Longest wait between two attempts to reach a lost broker (Celery logs each attempt).
RECONNECT_MAX_S = 2.0


class BatchedEventsConsumer(Consumer):
    """Celery's consumer, sending buffered task events every EVENT_FLUSH_S (or EVENT_BUFFER
    events), not on every turn of its loop."""

    _flush_pending = False

    def on_send_event_buffered(self) -> None:
        dispatcher = self.event_dispatcher
        if dispatcher is not None and dispatcher.buffer_limit < EVENT_BUFFER:
            dispatcher.buffer_limit = EVENT_BUFFER
        if self.hub is not None and not self._flush_pending:
            self._flush_pending = True
            self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        self._flush_pending = False
        self._flush_events()


class PipeqConsumer(BatchedEventsConsumer):
    """Celery's consumer, keeping poison messages as dead letters and running no task but
    the route's (``consumer_class`` sets both)."""

    dead_letters: DeadLetters
    served_task: str
    #: Called on the consumer's thread once its loop ends for a shutdown (True: warm).
    on_shutdown: Callable[[bool], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        loop: Callable[..., Any] = self.loop  # type: ignore[has-type]  # set by Celery
        self.loop = self._ending_with_shutdown(loop)

    def _ending_with_shutdown(self, loop: Callable[..., Any]) -> Callable[..., Any]:
        """The event loop, then ``on_shutdown`` when a shutdown ends it.

        Celery's signal handler only flags the shutdown and the loop raises at its next
        turn: the jobs in hand are finished here, on the consumer's own thread, and never
        inside the signal handler, which may have interrupted any line (one holding the
        settling lock, or halfway through a Redis reply on the channel's connection).
        """
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return loop(*args, **kwargs)
            except (WorkerShutdown, WorkerTerminate) as exc:
                if self.on_shutdown is not None:
                    self.on_shutdown(isinstance(exc, WorkerShutdown))
                raise

        return run

    def ensure_connected(self, conn: Any) -> Any:
        """Celery's reconnect loop, retrying sooner: kombu waits 2 s, then 4, 6 ... up to
        30 s between attempts, so a Redis back (or a replica promoted by Sentinel) after
        2.3 s was reached only after 6 s (measured in the failover test). Here the waits are
        0.25 s, 0.5 s ... at most RECONNECT_MAX_S."""
        conn.ensure_connection = functools.partial(
            conn.ensure_connection, interval_start=0.25, interval_step=0.25,
            interval_max=RECONNECT_MAX_S)
        return super().ensure_connected(conn)

    def update_strategies(self) -> None:
        """Celery's strategies; every task but the route's (Celery's built-in tasks such as
        ``celery.accumulate``, registered in every app) dead-letters its messages: a forged
        message must not run code pipeq never meant to run."""
        super().update_strategies()
        for name in list(self.strategies):
            if name != self.served_task:
                self.strategies[name] = self._refuse(name)

    def _refuse(self, name: str) -> Any:
        def refuse(message: Any, *_: Any, **__: Any) -> None:
            self._keep(message, f"task {name!r} is not served by pipeq workers")
            message.ack()

        return refuse

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._keep(message, f"message cannot be decoded ({message.content_type}): {exc}")
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._keep(message, "not a task message (no task name in its headers)")
        super().on_unknown_message(body, message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._keep(message, f"invalid task message: {exc}")
        super().on_invalid_task(body, message, exc)

    def create_task_handler(self, promise: Any = promise) -> Any:
        """Celery's task handler; a message it chokes on becomes an invalid task.

        Celery lets an error from a malformed task message (no ``id`` header, an unparseable
        ``eta`` or ``expires``) escape to the event loop, which takes it for a lost
        connection: it restores the message, receives it again and, after five restarts in
        a second, stops the worker.
        """
        handle = super().create_task_handler(promise)
        # kombu's Redis transport counts KeyError among its connection errors.
        lost = tuple(e for e in self.connection_errors if e is not KeyError)

        def on_task_received(message: Any) -> Any:
            try:
                return handle(message)
            except lost:
                raise
            except Exception as exc:
                return self.on_invalid_task(None, message, exc)

        return on_task_received

    def _keep(self, message: Any, reason: str) -> None:
        try:
            headers = getattr(message, "headers", None) or {}
            info = getattr(message, "delivery_info", None) or {}
            entry = self.dead_letters.add(
                reason, queue=info.get("routing_key"), job_id=headers.get("id"),
                raw=message.body if isinstance(message.body, bytes)
                else str(message.body).encode(),
            )
            log.warning("dead letter %s: %s", entry.id, reason)
        except Exception:  # never let bookkeeping stop the consumer
            log.exception("could not record a dead letter (%s)", reason)


def consumer_class(dead_letters: DeadLetters, served_task: str,
                   on_shutdown: Callable[[bool], None] | None = None) -> type[Consumer]:
    """The consumer class of a worker serving ``served_task``, dead-lettering into
    ``dead_letters`` and calling ``on_shutdown(warm)`` when a shutdown ends its loop."""
    return type("PipeqRouteConsumer", (PipeqConsumer,),
                {"dead_letters": dead_letters, "served_task": served_task,
                 "on_shutdown": staticmethod(on_shutdown) if on_shutdown else None})
