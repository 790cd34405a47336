"""Fault injection for pipeq's own fault tests: real failures, on purpose, on the CPU.

Enabled only by the ``PIPEQ_FAULTS`` setting (never in production). A comma-separated list:

- ``oom_above=N``: a pipeline call with more than N inputs raises a CUDA-style
  out-of-memory RuntimeError (the batch must be split);
- ``oom_marker=TEXT``: any call containing an input with TEXT raises out-of-memory, even
  alone (that input must fail by itself);
- ``transient=N``: the first N calls raise ConnectionError (must be retried);
- ``slow_ms=N``: every call sleeps N ms first (long jobs, visibility timeout); with
  ``slow_marker=TEXT``, only calls containing an input with TEXT do (one job times out);
- ``step_ms=N``: every decoding step of a generation call that streams sleeps N ms (a
  stream long enough to kill its worker in the middle);
- ``crash_marker=TEXT``: a call containing an input with TEXT kills the process (SIGKILL),
  as a segfaulting model would;
- ``claim_crash_marker=TEXT``: a message whose job has TEXT kills the process (SIGKILL) the
  instant it is taken off the queue, before Celery sees it (the window kombu's BRPOP had).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from typing import Any

from pipeq.worker.hooks import Middleware


class FaultInjector(Middleware):
    """Injects the faults named in the spec: before pipeline calls (as middleware), and
    after claims (called by pipeq's kombu channel, which builds its own injector from the
    same spec: kombu creates channels where no middleware can reach)."""

    def __init__(self, spec: str):
        self.options: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            self.options[name] = value
        self._transient_left = int(self.options.get("transient", "0"))
        self._lock = threading.Lock()

    def before_call(self, items: list[Any]) -> None:
        """Raise (or sleep, or die) as configured, before a pipeline call on ``items``."""
        texts = [str(i) for i in items]
        crash = self.options.get("crash_marker")
        if crash and any(crash in t for t in texts):
            os.kill(os.getpid(), signal.SIGKILL)
        slow = self.options.get("slow_marker")
        if "slow_ms" in self.options and (not slow or any(slow in t for t in texts)):
            time.sleep(int(self.options["slow_ms"]) / 1000)
        with self._lock:
            if self._transient_left > 0:
                self._transient_left -= 1
                raise ConnectionError("injected transient fault: connection reset")
        marker = self.options.get("oom_marker")
        if marker and any(marker in t for t in texts):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        above = self.options.get("oom_above")
        if above and len(items) > int(above):
            raise RuntimeError(
                f"CUDA out of memory: batch of {len(items)} (injected above {above})")

    def after_stream_step(self) -> None:
        """Sleep, as configured, after a decoding step of a streaming generation call."""
        if "step_ms" in self.options:
            time.sleep(int(self.options["step_ms"]) / 1000)

    def after_claim(self, item: bytes) -> None:
        """Die, as configured, right after a message is taken off the queue."""
        marker = self.options.get("claim_crash_marker")
        if not marker:
            return
        try:
            body = base64.b64decode(json.loads(item)["body"])
        except (ValueError, KeyError, TypeError):
            return
        if marker.encode() in body:
            os.kill(os.getpid(), signal.SIGKILL)
