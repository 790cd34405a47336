"""Getting a route's pipeline ready: device check, model instances, load, warm-up and the
measured per-call overhead, all before the worker consumes anything."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from pipeq.core.config import RouteSpec
from pipeq.worker.batching.planning import calibrate_overhead
from pipeq.worker.model.instances import instance_plan
from pipeq.worker.model.loader import ModelLoadError, load_pipeline, warmup_call
from pipeq.worker.model.runner import PipelineRunner

if TYPE_CHECKING:
    from pipeq.worker.model.generation import ContinuousEngine

log = logging.getLogger("pipeq.worker")

T = TypeVar("T")


def check_device(device: str) -> None:
    """Fail clearly when a CUDA device is asked for but torch sees none."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"--device {device}: torch sees no CUDA device here "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                "use --device cpu or run on a GPU machine"
            )


def use_instances(spec: RouteSpec, device: str) -> int:
    """How many model instances serve the route here; gives each call its share of threads.

    Set before the model loads: the warm-up and the overhead calibration then run on the
    threads the calls will have (torch's threads take the process-wide count).
    """
    import torch

    # A continuous route's generation loop runs on a call's share of threads too: on 2
    # shared cores one thread decoded 1300 tokens/s against 740 with two (barrier stalls).
    instances, threads = instance_plan(device, spec.cpu_instances, torch.get_num_threads())
    if instances > 1:
        torch.set_num_threads(threads)
        log.info("%d model instances on %s, %d torch thread(s) per call", instances, device,
                 threads)
    return instances


def off_main_thread(action: Callable[[], T]) -> T:
    """Run ``action`` on a short-lived thread; its result, or its exception re-raised.

    Model calls stay off the main thread: OpenMP keeps a team of threads for each thread
    that ran a parallel region, and the main thread's team (from the warm-up) next to the
    batcher thread's made every batch slower (measured on 2 CPU cores with MiniLM: batches
    of 8 ran at 116 instead of 135 inputs/s, single calls 14.0 instead of 12.4 ms). A team
    goes away with its thread, so the batcher threads' teams are then the only ones.
    """
    # Leaving the with block joins the thread: its OpenMP team is gone before serving.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeq-model-setup") as setup:
        return setup.submit(action).result()


def loaded_and_warm(spec: RouteSpec, device: str) -> PipelineRunner:
    """The route's pipeline, loaded on ``device`` and warmed up, in a runner."""
    runner = PipelineRunner(load_pipeline(spec, device))
    warm_up(runner)
    return runner


def measure_call_overhead(runner: PipelineRunner, skip: bool = False) -> float | None:
    """The route's per-call overhead in characters of input (``batching.planning``); None
    when unknown or ``skip`` (injected faults would distort it)."""
    call = warmup_call(runner.pipe)
    if skip or call is None or not isinstance(call[0][0], str):
        return None
    sample, params = call[0][0], call[1]
    try:
        overhead = calibrate_overhead(lambda items: runner.run(items, params), sample,
                                      sample + " and a few more words to make it long" * 5)
    except Exception as exc:  # calibration is an optimisation: never fatal
        log.warning("could not measure the per-call overhead (%s); batches stay whole", exc)
        return None
    log.info("per-call overhead: %s characters of input",
             "unknown" if overhead is None else f"{overhead:.0f}")
    return overhead


def warm_up(runner: PipelineRunner) -> None:
    """Run the pipeline once so the first job does not pay for lazy initialisation."""
    call = warmup_call(runner.pipe)
    if call is None:
        log.info("no warm-up input known for task %s; skipping warm-up", runner.task)
        return
    started = time.perf_counter()
    try:
        runner.run(*call)
    except Exception as exc:
        raise ModelLoadError(f"warm-up call failed: {type(exc).__name__}: {exc}") from exc
    log.info("warm-up done in %.2fs", time.perf_counter() - started)


def continuous_engine(spec: RouteSpec, runner: PipelineRunner) -> ContinuousEngine | None:
    """The started continuous batching engine of a ``batching = "continuous"`` route; None
    for static routes, and, logged with why, where it cannot serve the model or device: the
    route then batches statically (every job still runs, with the same results)."""
    if spec.batching != "continuous":
        return None
    from pipeq.worker.model.generation import ContinuousEngine, ContinuousUnsupported

    try:
        return ContinuousEngine.for_pipeline(runner.pipe, max_requests=spec.max_batch_size,
                                             max_step_tokens=spec.max_batch_tokens)
    except ContinuousUnsupported as exc:
        log.warning("continuous batching unavailable for %s: %s; FALLING BACK to static "
                    "batching", spec.route.describe(), exc)
        return None
