"""Fair lanes inside one worker: interactive jobs first, bulk chunks in length-sorted plans.

A bulk job (``pipeq.bulk``) keeps a few chunks of many inputs each in flight. Fed to the
micro-batcher first-come first-served, an interactive request arriving behind them would wait
for every queued bulk input to run. :class:`LaneQueue` replaces the batcher's FIFO:

- a batch is either interactive or bulk. A blocking ``get()`` without a timeout begins a
  batch (that is how ``MicroBatcher._gather`` takes a batch's first input) and picks the
  interactive lane whenever it holds anything; the gets that continue the batch
  (``get_nowait()``, ``get(timeout=...)``) return interactive inputs first and, in a bulk
  batch only, bulk inputs after them, at most ``bulk_batch`` of them (one pipeline call's
  worth: the batcher may gather several calls' worth, and would run them all before looking
  at the queue again). An interactive request therefore waits for at most one bulk call, and
  its own batch is not padded out with bulk inputs.
- bulk inputs are served from a *plan*: the oldest half of the waiting bulk inputs (at least
  one batch, at most ``plan_size``) sorted by length, so bulk batches pad little (like the
  in-process sorted-batched loop) while chunks still finish roughly in the order they came
  (oldest first). Half, so that while one plan runs, the producer gets the chunks of the
  previous one back and sends new ones: the worker never waits for them.

The Redis side of the lanes is ``Keys.queue_for(route, "bulk")``: the worker consumes both
queues and kombu polls them round-robin, so interactive messages are never stuck behind
bulk messages.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

INTERACTIVE = "interactive"
BULK = "bulk"


def slot_lane(slot: Any) -> str:
    """The lane of a batcher ``Slot`` (its job's request says)."""
    return str(getattr(slot.job.request, "lane", INTERACTIVE))


def slot_length(slot: Any) -> int:
    """The length proxy of a batcher ``Slot``."""
    return int(slot.length)


class LaneQueue(Generic[T]):
    """A two-lane drop-in for the batcher's ``SimpleQueue`` (``put``, ``get``, ``get_nowait``).

    ``None`` (the batcher's stop signal) is returned before anything else.
    """

    def __init__(self, plan_size: int = 128, bulk_batch: int = 32,
                 lane_of: Callable[[T], str] = slot_lane,
                 length_of: Callable[[T], int] = slot_length):
        self.plan_size = max(1, plan_size)
        self.bulk_batch = max(1, bulk_batch)
        self._lane_of = lane_of
        self._length_of = length_of
        self._cond = threading.Condition()
        self._interactive: deque[T] = deque()
        self._pending: deque[T] = deque()  # bulk inputs not yet in a plan, oldest first
        self._plan: deque[T] = deque()  # bulk inputs sorted by length, served next
        self._stops = 0
        self._batch_lane = INTERACTIVE
        self._batch_bulk = 0  # bulk inputs handed out in the batch being formed

    def put(self, item: T | None) -> None:
        """Add an input (or the stop signal ``None``)."""
        with self._cond:
            if item is None:
                self._stops += 1
            elif self._lane_of(item) == BULK:
                self._pending.append(item)
            else:
                self._interactive.append(item)
            self._cond.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> T | None:
        """The next input; a blocking get without a timeout begins a new batch."""
        begins = block and timeout is None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                found, item = self._take(begins)
                if found:
                    return item
                if not block or self._bulk_batch_full():
                    raise queue.Empty
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise queue.Empty
                self._cond.wait(remaining)

    def empty(self) -> bool:
        """True when no input waits (a snapshot: another thread may put one at once)."""
        with self._cond:
            return not (self._interactive or self._pending or self._plan)

    def get_nowait(self) -> T | None:
        """The next input of the batch being formed, or ``queue.Empty``."""
        return self.get(block=False)

    def _take(self, begins: bool) -> tuple[bool, T | None]:
        if self._stops:
            self._stops -= 1
            return True, None
        if begins:
            self._batch_lane = INTERACTIVE if self._interactive else BULK
            self._batch_bulk = 0
        if self._interactive:
            return True, self._interactive.popleft()
        if self._batch_lane == INTERACTIVE or self._bulk_batch_full():
            return False, None  # never fill an interactive batch with bulk inputs
        if not self._plan and self._pending:
            size = min(self.plan_size, max(self.bulk_batch, len(self._pending) // 2))
            take = [self._pending.popleft() for _ in range(min(size, len(self._pending)))]
            take.sort(key=self._length_of)
            self._plan.extend(take)
        if self._plan:
            self._batch_bulk += 1
            return True, self._plan.popleft()
        return False, None

    def _bulk_batch_full(self) -> bool:
        return self._batch_lane == BULK and self._batch_bulk >= self.bulk_batch
