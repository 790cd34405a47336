"""An out-of-memory batch is split in halves on the worker's real job path (in process, real
Redis), with torch's own ``torch.cuda.OutOfMemoryError`` raised by a stand-in runner: every
input still gets its own answer, cached memory is released, and the failed call's frames
(which on a GPU hold its activations) are gone before the halves run."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from pipeq import Settings, pipeline
from pipeq.core.config import RouteSpec
from pipeq.errors import JobFailed
from pipeq.worker.model.runner import is_out_of_memory
from pipeq.worker.testing import EchoRunner, InProcessWorker

TASK = "text-classification"
MODEL = "org/oom"


class Activations:
    """Stands for the tensors a failed call's frames hold."""


class FakeOomRunner(EchoRunner):
    """Raises torch.cuda.OutOfMemoryError for calls of more than ``fits`` inputs, or for an
    input containing HUGE; records whether a failed call's frames outlived its failure."""

    def __init__(self, fits: int):
        super().__init__(TASK)
        self.fits = fits
        self.sizes: list[int] = []
        self.freed = 0
        self.failed_frames: list[weakref.ref[Activations]] = []
        self.frames_alive_at_retry = 0

    def run(self, items: list[Any], params: dict[str, Any]) -> list[Any]:
        """Fail like a CUDA allocation when the call is too large."""
        gc.collect()
        self.frames_alive_at_retry += sum(ref() is not None for ref in self.failed_frames)
        self.sizes.append(len(items))
        activations = Activations()  # a local of the failing frame, like a hidden state
        if len(items) > self.fits or any("HUGE" in str(i) for i in items):
            self.failed_frames.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (batch of {len(items)})")
        return super().run(items, params)

    def free_memory(self) -> None:
        """Count the releases of cached device memory."""
        self.freed += 1



def test_out_of_memory_batch_is_halved_until_it_fits(settings: Settings) -> None:
    runner = FakeOomRunner(fits=2)
    spec = RouteSpec(task=TASK, model=MODEL, max_wait_ms=0, max_batch_size=8)
    remote = pipeline(TASK, model=MODEL, settings=settings)
    texts = [f"input number {i}" for i in range(8)]
    with InProcessWorker(settings, spec, runner) as worker:
        job = remote.submit(texts)
        worker.drain()
        result = job.result(timeout=5)
    assert result == [{"label": "LEN", "score": len(t)} for t in texts]
    assert runner.sizes == [8, 4, 2, 2, 4, 2, 2]
    assert runner.freed == 3  # after each failed call
    # The frames of the failed calls were released before any retry ran: on a GPU they hold
    # the activations of the batch that did not fit.
    assert runner.frames_alive_at_retry == 0


def test_input_that_never_fits_fails_alone_with_a_clear_error(settings: Settings) -> None:
    runner = FakeOomRunner(fits=8)
    spec = RouteSpec(task=TASK, model=MODEL, max_wait_ms=0, max_batch_size=8)
    remote = pipeline(TASK, model=MODEL, settings=settings)
    with InProcessWorker(settings, spec, runner) as worker:
        fine = remote.submit(["fits", "fits too"])
        huge = remote.submit("a HUGE input")
        worker.drain()
    assert fine.result(timeout=5) == [{"label": "LEN", "score": 4}, {"label": "LEN", "score": 8}]
    with pytest.raises(JobFailed) as info:
        huge.result(timeout=5)
    assert info.value.error_type == "OutOfMemory"
    assert "does not fit in device memory even alone" in info.value.remote_message
    assert "CUDA out of memory" in info.value.remote_message
    assert runner.frames_alive_at_retry == 0


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("MPS backend out of memory"),
])
def test_device_out_of_memory_errors_are_recognised(error: Exception) -> None:
    assert is_out_of_memory(error)


def test_other_errors_are_not_out_of_memory() -> None:
    assert not is_out_of_memory(RuntimeError("index out of range in self"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a device error
