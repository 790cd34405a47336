"""The inference stage: one pipeline call for a batch of inputs, one output per input.

``PipelineRunner.run`` is the only place that calls the pipeline. It checks that a batch
gives back exactly as many outputs as inputs and converts them to wire values.
``shape_result`` turns a job's per-input outputs back into what the local pipeline returns
for the job's original call (one input or a list), including transformers' own quirks.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from pipeq.worker.model.streamer import BatchTextStreamer, TextTarget, decode_options
from pipeq.worker.model.wire import to_wire


class BatchSizeMismatch(RuntimeError):
    """Raised when a pipeline call returns a different number of outputs than inputs."""


def is_transient(exc: BaseException) -> bool:
    """True for errors that may pass if the same call is tried again (network, timeouts)."""
    from pipeq.errors import RetryableError

    return isinstance(exc, ConnectionError | TimeoutError | RetryableError)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA, MPS or an injected one).

    cuBLAS and cuDNN report a failed workspace allocation as ``*_STATUS_ALLOC_FAILED``.
    """
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "status_alloc_failed" in text)


def skips_data_loader(pipe: Any) -> bool:
    """True when ``pipe`` iterates with transformers' own ``get_iterator`` (custom pipelines
    may override it), which ``_one_input_iterator`` reproduces without the DataLoader."""
    from transformers.pipelines.base import ChunkPipeline, Pipeline

    method = getattr(type(pipe), "get_iterator", None)
    return method is Pipeline.get_iterator or method is ChunkPipeline.get_iterator


def _one_input_iterator(pipe: Any, inputs: Any, num_workers: int, batch_size: int,
                        preprocess_params: dict[str, Any], forward_params: dict[str, Any],
                        postprocess_params: dict[str, Any]) -> Any:
    """``Pipeline.get_iterator`` for a batch of one, without torch's DataLoader.

    With one input and no loader workers the DataLoader only wraps each item in a list and
    unwraps it again (``no_collate_fn``), at ~0.45 ms a call: a tenth of what a lone request
    pays over the in-process call. The same pre/forward/postprocess iterators run, in the
    same order, so outputs are those of the DataLoader path. Anything else goes to
    transformers' own ``get_iterator``.
    """
    from transformers.pipelines.base import ChunkPipeline
    from transformers.pipelines.pt_utils import (
        PipelineChunkIterator,
        PipelineDataset,
        PipelineIterator,
        PipelinePackIterator,
    )

    original = type(pipe).get_iterator
    if batch_size != 1 or num_workers or not isinstance(inputs, list) or len(inputs) != 1:
        return original(pipe, inputs, num_workers, batch_size, preprocess_params,
                        forward_params, postprocess_params)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as get_iterator does
    # ``pipe.preprocess`` is looked up now: ``_token_lengths`` wraps it for a call.
    if isinstance(pipe, ChunkPipeline):
        model_iterator: Any = PipelinePackIterator(
            PipelineChunkIterator(inputs, pipe.preprocess, preprocess_params), pipe.forward,
            forward_params, loader_batch_size=1)
    else:
        model_iterator = PipelineIterator(
            PipelineDataset(inputs, pipe.preprocess, preprocess_params), pipe.forward,
            forward_params, loader_batch_size=1)
    return PipelineIterator(model_iterator, pipe.postprocess, postprocess_params)


class PipelineRunner:
    """Runs batches of one route's inputs through its loaded pipeline."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.task: str = pipe.task
        self.device = str(getattr(pipe, "device", "cpu"))
        #: CTC speech recognition decodes the logits of padding too (transformers does not
        #: trim them), so its batches hold inputs of equal length only (see MicroBatcher).
        self.equal_lengths_only = (self.task == "automatic-speech-recognition"
                                   and getattr(pipe, "type", None) in ("ctc", "ctc_with_lm"))
        # Installed on this runner's own pipe: ``pipeline_instance`` copies a pipe with its
        # instance attributes, so a copy's attribute would still call the original's.
        if skips_data_loader(pipe):
            pipe.get_iterator = functools.partial(_one_input_iterator, pipe)

    def run(self, items: list[Any], params: dict[str, Any], *,
            text: Sequence[TextTarget | None] | None = None,
            on_step: Callable[[], None] | None = None) -> list[Any]:
        """Outputs (wire values) for ``items``, in order, from a single pipeline call.

        ``text``: per input, where its generated text streams to (None: it does not);
        ``on_step`` runs after each decoding step of such a call.
        """
        call = dict(params)
        if text is not None and any(text):
            call["streamer"] = BatchTextStreamer(self.pipe.tokenizer, text,
                                                 decode_options(self.pipe.tokenizer, params),
                                                 on_step)
        as_list = True
        if self.task == "feature-extraction":
            # Tensors travel as raw bytes; the producer rebuilds the lists tolist() gives.
            as_list = not call.get("return_tensors", False)
            call["return_tensors"] = True
        lengths: list[int] = []
        with torch.inference_mode(), self._token_lengths(lengths):
            # Shallow copies: audio pipelines pop keys from dict inputs, and a batch that
            # fails is retried in halves with the same items.
            batch = [dict(i) if isinstance(i, dict) else i for i in items]
            outputs = self.pipe(batch, batch_size=len(items), **call)
        if self.task == "feature-extraction":
            outputs = [self._unpad(o, n) for o, n in zip(outputs, lengths, strict=True)]
        if len(items) == 1 and self.task == "fill-mask":
            outputs = [outputs]  # fill-mask unwraps one-element lists itself
        if not isinstance(outputs, list) or len(outputs) != len(items):
            count = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
            raise BatchSizeMismatch(f"pipeline returned {count} outputs for {len(items)} inputs")
        return [to_wire(o, tensors_as_list=as_list) for o in outputs]

    @contextlib.contextmanager
    def _token_lengths(self, lengths: list[int]) -> Iterator[None]:
        """Record each input's own token count as the pipeline preprocesses it.

        A batched feature-extraction call returns every input's hidden states at the
        batch's padded length; the unbatched pipeline returns them at the input's own
        length. The counts let ``_unpad`` cut the padding off again.
        """
        if self.task != "feature-extraction":
            yield
            return
        original = self.pipe.preprocess

        def preprocess(inputs: Any, **kwargs: Any) -> Any:
            model_inputs = original(inputs, **kwargs)
            lengths.append(int(model_inputs["input_ids"].shape[-1]))
            return model_inputs

        self.pipe.preprocess = preprocess
        try:
            yield
        finally:
            del self.pipe.preprocess  # back to the class's method

    def _unpad(self, output: Any, length: int) -> Any:
        if not isinstance(output, torch.Tensor) or output.shape[-2] == length:
            return output
        if getattr(self.pipe.tokenizer, "padding_side", "right") == "left":
            return output[..., -length:, :]
        return output[..., :length, :]

    def free_memory(self) -> None:
        """Release cached device memory after an out-of-memory error."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def shape_result(task: str, items: list[Any], single: bool, params: dict[str, Any],
                 outputs: list[Any]) -> Any:
    """The job's result as the local ``pipeline(inputs, **params)`` call would return it."""
    if single:
        output = outputs[0]
        # text-classification wraps a single string's result in a list unless top_k is given.
        if task == "text-classification" and isinstance(items[0], str) and "top_k" not in params:
            return [output]
        return output
    if task == "fill-mask" and len(outputs) == 1:
        return outputs[0]  # fill-mask returns a one-element list's result unwrapped
    return outputs
