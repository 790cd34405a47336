"""Model instances: how many pipeline calls a worker runs side by side, and on what threads.

On a GPU one call at a time keeps the device busy: one instance. On a CPU, one call spread
over every core (torch's default) loses time at each of the model's thread barriers, and
much more when anything else on the machine (the worker's own Celery thread, a producer,
Redis) preempts one of its threads: the others wait at the barrier. Independent calls on
fewer threads each do not wait for one another. Measured with all-MiniLM-L6-v2 on 2 cores,
2000 sentences in length-sorted batches: two single-threaded instances 163-182 inputs/s
against 135-152 for one two-threaded call at a time, and 130-135 against 99-101 while
another process used a tenth of a core.

All instances share the model's weights (no extra memory for them); each has its own
pipeline object and tokenizer/processor copies, because a pipeline call changes state on
both (the call parameters; a fast tokenizer's padding and truncation settings, which
refuses concurrent use: "RuntimeError: Already borrowed", huggingface/tokenizers#537).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pipeq.worker.model.runner import PipelineRunner

T = TypeVar("T")

#: How long a call that becomes ready waits for a lone call to end before it starts beside
#: it anyway (a lone call may be long: a generation, a slow input).
LONE_CALL_WAIT_S = 0.05

#: Instances on a CPU when the route does not say (``cpu_instances = 0``).
AUTO_CPU_INSTANCES = 2
#: A pipeline's parts that hold per-call state and are cheap to copy (never the model).
_PER_INSTANCE_PARTS = ("tokenizer", "feature_extractor", "image_processor", "processor")


def instance_plan(device: str, requested: int, cpu_threads: int) -> tuple[int, int]:
    """(instances, torch threads per call) for a worker on ``device``.

    ``requested``: the route's ``cpu_instances`` (0: automatic). ``cpu_threads``: the
    threads torch would give one call (``torch.get_num_threads()``: the cores, or
    OMP_NUM_THREADS). GPUs and MPS always get one instance and keep torch's threads.
    """
    if device != "cpu":
        return 1, cpu_threads
    instances = max(1, requested or min(AUTO_CPU_INSTANCES, cpu_threads))
    return instances, max(1, cpu_threads // instances)


def replicate(runner: PipelineRunner, instances: int) -> list[PipelineRunner]:
    """``runner`` and ``instances - 1`` runners on copies of its pipeline sharing the model."""
    runners = [runner]
    for _ in range(instances - 1):
        runners.append(PipelineRunner(pipeline_instance(runner.pipe)))
    return runners


def pipeline_instance(pipe: Any) -> Any:
    """A pipeline that calls the same model as ``pipe`` with its own state and tokenizer."""
    instance = copy.copy(pipe)
    for part in _PER_INSTANCE_PARTS:
        value = getattr(pipe, part, None)
        if value is not None:
            setattr(instance, part, copy.deepcopy(value))
    return instance


def core_share(runners: Sequence[PipelineRunner]) -> CoreShare | None:
    """How ``runners`` (a worker's instances, built by ``replicate``) share a CPU's cores;
    None on a GPU or with one instance. Call it after ``use_instances`` set the threads."""
    if len(runners) < 2 or not runners[0].device.startswith("cpu"):
        return None
    import torch

    return CoreShare(len(runners), torch.get_num_threads())


class CoreShare:
    """Runs a call that runs alone on every core of a CPU worker whose instances have one
    torch thread each.

    Side by side, each instance's call runs on one core (``instance_plan``); but under light
    load a lone request then runs on one core while the others idle (MiniLM on 2 cores: a
    call took 19 ms in the worker against 13 ms on both cores). A call the batcher marks
    *alone* (one input under light traffic: the gather before found one input too, and
    nothing else is planned or queued) that starts while no other call runs
    goes to one dedicated thread whose torch threads are every core; calls that become
    ready meanwhile wait for it (one lone call: milliseconds) rather than start beside it,
    because threads beyond the cores stall every call at the model's thread barriers; but
    never longer than ``LONE_CALL_WAIT_S``, so that a long lone call holds up no one.

    Why one dedicated thread, set once, rather than raising the count per call: OpenMP
    (torch's CPU threads) keeps a team of threads for each thread that runs a parallel
    region, and libgomp stops spin-waiting (its threads sleep and wake at every one of the
    model's barriers) once it manages more threads than there are cores. Single-threaded
    instances start no team; the dedicated thread's team is the only one, so it fits the
    cores. For the same reason the share is used only when each instance has one thread
    (``cpu_instances`` equal to the cores, the default on 2 cores): with more, the extra
    team would push the process over the cores and slow every call under load.
    """

    def __init__(self, instances: int, threads_per_call: int):
        self.share = threads_per_call
        self.every = threads_per_call * instances
        self._changed = threading.Condition()
        self._running = 0
        self._lone_running = False
        #: The lone call's thread; None where the share is off (one instance, or several
        #: threads per instance).
        self._lone: ThreadPoolExecutor | None = None
        if instances > 1 and threads_per_call == 1:
            self._lone = ThreadPoolExecutor(1, thread_name_prefix="pipeq-lone-call")
            self._lone.submit(self._take_every_core).result()

    @property
    def enabled(self) -> bool:
        """Whether a lone call can get every core here."""
        return self._lone is not None

    def _take_every_core(self) -> None:
        import torch

        # torch reads the process-wide count into a thread at its first parallel work, and
        # set_num_threads also changes that process-wide count: read it first (this thread
        # keeps ``every``), then the instances' threads set theirs (``own_share``).
        torch.get_num_threads()
        torch.set_num_threads(self.every)

    def own_share(self) -> None:
        """Give the calling instance thread its share of the cores (call it once, first)."""
        if self.enabled:
            import torch

            torch.get_num_threads()
            torch.set_num_threads(self.share)

    def run(self, call: Callable[[], T], alone: bool,
            then: Callable[[], object] | None = None) -> T:
        """``call()``: on every core when ``alone`` and no other call runs, else on this
        thread's share; waits while a lone call runs (at most ``LONE_CALL_WAIT_S``).

        ``then()`` runs next on the same thread, once other calls may start: a lone call's
        thread stores its jobs' results itself rather than waking this thread to do it
        (~0.1 ms of a lone request).
        """
        if self._lone is None:
            return self._call_then(call, then, False)
        deadline = time.monotonic() + LONE_CALL_WAIT_S
        with self._changed:
            while self._lone_running and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            lone = alone and self._running == 0
            self._running += 1
            if lone:
                self._lone_running = True
        if not lone:
            return self._call_then(call, then, False)
        try:
            future = self._lone.submit(self._call_then, call, then, True)
        except BaseException:  # not submitted (shut down): its share is free again
            self._release(True)
            raise
        return future.result()

    def _call_then(self, call: Callable[[], T], then: Callable[[], object] | None,
                   lone: bool) -> T:
        try:
            result = call()
        finally:
            if self._lone is not None:  # (no share: nothing was counted)
                self._release(lone)
        if then is not None:
            then()
        return result

    def _release(self, lone: bool) -> None:
        with self._changed:
            self._running -= 1
            if lone:
                self._lone_running = False
            self._changed.notify_all()

    def close(self) -> None:
        """Stop the lone call's thread (after the last call)."""
        if self._lone is not None:
            self._lone.shutdown(wait=True)
