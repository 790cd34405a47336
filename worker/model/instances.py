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
from typing import Any

from pipeq.worker.model.runner import PipelineRunner

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
