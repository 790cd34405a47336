"""Continuous batching for text generation: transformers' own manager behind a small engine.

``transformers.generation.continuous_batching`` keeps one generation loop on its own thread
with a paged KV cache: requests join the running batch at the next decoding step and leave
it as soon as they end, so a short request never waits for a long one. ``ContinuousEngine``
builds that manager for a route's loaded pipeline, checks that it serves the model and
device (and gives the pipeline's own greedy tokens), and turns a job's call into what the
local ``pipeline("text-generation")`` returns. What it cannot honour is said, with why:
``ContinuousUnsupported`` at start (the route then batches statically), and
``continuous_plan`` per job (that job then runs on the static path).

Only greedy decoding runs continuously: the manager samples with one setting for every
request, and a sampled text could never equal the local pipeline's anyway.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipeq.worker.model.instances import pipeline_instance

log = logging.getLogger("pipeq.worker")

#: Call parameters a continuous job may carry; anything else runs on the static path.
CONTINUOUS_PARAMS = frozenset({"max_new_tokens", "do_sample", "return_full_text",
                               "clean_up_tokenization_spaces", "skip_special_tokens"})
#: Tokens one KV-cache page holds (a block: one page per layer). Small pages waste less on
#: short sequences; the CPU cache is sized in them.
PAGE_SIZE = 32
#: Tokens one decoding step may process on a CPU (prefill chunks included) when the route
#: sets no max_batch_tokens: bounds the activations of a step.
CPU_STEP_TOKENS = 512
#: Longest sequence (prompt + new tokens) the CPU cache is sized for, per concurrent request.
CPU_SEQUENCE_BUDGET = 2048
#: The warm-up request that proves the manager gives the pipeline's own tokens.
WARMUP_PROMPT, WARMUP_TOKENS = "Hello, world", 4


class ContinuousUnsupported(Exception):
    """Raised when continuous batching cannot serve a route's model or device (why: str)."""


@dataclass(frozen=True, slots=True)
class GenerationPlan:
    """How one job's prompts run continuously and how their text is shaped."""

    max_new_tokens: int
    full_text: bool = True
    clean_up: bool | None = None
    skip_special_tokens: bool = True


def continuous_plan(pipe: Any, params: dict[str, Any]) -> GenerationPlan | str:
    """The plan of a job with call ``params``, or why it cannot run continuously."""
    unsupported = sorted(set(params) - CONTINUOUS_PARAMS)
    if unsupported:
        return f"parameter(s) {', '.join(unsupported)} not supported by continuous batching"
    generate = {k: params[k] for k in ("max_new_tokens", "do_sample") if k in params}
    # The pipeline's own merge: call, model generation config, pipeline defaults (which
    # sample with max_new_tokens=256 unless told otherwise).
    try:
        effective = pipe._get_set_generation_params(pipe._prepare_generate_kwargs(generate))
    except AttributeError:  # (private helpers of transformers 5's pipelines)
        return "this transformers version's pipeline does not say its generation defaults"
    if effective.get("do_sample"):
        return ("sampling (do_sample=True, the text-generation pipeline's default) is not "
                "continuous: pass do_sample=False for greedy decoding")
    if (effective.get("num_beams") or 1) > 1 or (effective.get("num_return_sequences") or 1) > 1:
        return "beam search and num_return_sequences > 1 are not continuous"
    max_new = effective.get("max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        return "no max_new_tokens >= 1 (a total max_length is not continuous)"
    return GenerationPlan(max_new, bool(params.get("return_full_text", True)),
                          params.get("clean_up_tokenization_spaces"),
                          bool(params.get("skip_special_tokens", True)))


class ContinuousEngine:
    """transformers' continuous batching manager for one route's model, with its tokenizer.

    Build with :meth:`for_pipeline`; ``add`` requests, read ``outputs``; one thread reads.
    """

    def __init__(self, pipe: Any, manager: Any, max_sequence: int | None = None):
        self.pipe = pipe
        self.manager = manager
        self.tokenizer = pipe.tokenizer
        #: Longest prompt + new tokens a request may have here (None: no limit known); a
        #: longer one would fail the whole running batch's step, so it runs statically.
        self.max_sequence = max_sequence

    @classmethod
    def for_pipeline(cls, pipe: Any, *, max_requests: int, max_step_tokens: int = 0
                     ) -> ContinuousEngine:
        """A started engine for a loaded text-generation pipeline, proven on one warm-up
        request to give the pipeline's own greedy tokens; ContinuousUnsupported if not."""
        model = pipe.model
        device = torch.device(model.device)
        problem = _unsupported(pipe, device)
        if problem:
            raise ContinuousUnsupported(problem)
        from transformers import ContinuousBatchingConfig

        # transformers' manager logs every start, stop and cache size at INFO.
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)

        greedy = copy.deepcopy(model.generation_config)
        greedy.do_sample = False
        if processors := model._get_logits_processor(greedy):
            names = ", ".join(type(p).__name__ for p in processors)
            raise ContinuousUnsupported(f"the model's generation config adds logits processors "
                                        f"({names}) that continuous batching may not apply")
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE, max_requests_per_batch=max_requests,
            # Keep the attention the pipeline was loaded with: the static path shares the
            # model, and greedy tokens must equal the local pipeline's.
            auto_switch_to_flash=False, **_cache_size(model, device, max_requests,
                                                      max_step_tokens))
        instance = pipeline_instance(pipe)  # its own tokenizer: the static path uses the other
        try:
            manager = model.init_continuous_batching(generation_config=greedy,
                                                     continuous_batching_config=config)
            manager.start()
        except Exception as exc:
            raise ContinuousUnsupported(f"transformers' manager failed to start: "
                                        f"{type(exc).__name__}: {exc}") from exc
        engine = cls(instance, manager, _longest_sequence(model, device))
        try:
            engine.check_warmup()
        except Exception:
            engine.stop()
            raise
        return engine

    def check_warmup(self) -> None:
        """Run one greedy request and compare it with the pipeline's own call."""
        started = time.perf_counter()
        ids = self.encode(WARMUP_PROMPT)
        self.add("__pipeq_warmup__", ids, WARMUP_TOKENS)
        deadline = time.monotonic() + 60
        output = None
        while time.monotonic() < deadline and (output is None or not output.is_finished()):
            output = self.manager.get_result(timeout=0.5)
            if output is None and not self.running:
                break
        if output is None or not output.is_finished() or output.error:
            why = output.error if output is not None else "no result within 60s"
            raise ContinuousUnsupported(f"the warm-up request failed: {why}")
        with torch.inference_mode(), self.exclusive():
            local = self.pipe(WARMUP_PROMPT, max_new_tokens=WARMUP_TOKENS, do_sample=False)
        mine = self.record(WARMUP_PROMPT, list(output.generated_tokens), GenerationPlan(
            WARMUP_TOKENS))
        if [mine] != local:
            raise ContinuousUnsupported(f"its greedy tokens differ from the pipeline's on this "
                                        f"model ({mine} != {local[0]})")
        log.info("continuous batching warm-up done in %.2fs", time.perf_counter() - started)

    # --- requests -----------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids as the pipeline's preprocessing makes them."""
        inputs = self.pipe.preprocess(prompt, **self.pipe._preprocess_params)
        ids: list[int] = inputs["input_ids"][0].tolist()
        return ids

    def add(self, request_id: str, input_ids: list[int], max_new_tokens: int) -> None:
        """Queue a request; it joins the running batch at the next decoding step."""
        added = self.manager.add_request(input_ids, request_id=request_id,
                                         max_new_tokens=max_new_tokens, streaming=True)
        if added is None:
            raise RuntimeError("the continuous batching loop does not take requests "
                               "(stopping, or it failed)")

    def cancel(self, request_id: str) -> None:
        """Drop a request from the running batch (no output follows)."""
        self.manager.cancel_request(request_id)

    def outputs(self, timeout: float) -> list[Any]:
        """The outputs ready now (GenerationOutput: one per request and step), waiting at
        most ``timeout`` for the first."""
        first = self.manager.get_result(timeout=timeout) if timeout > 0 else None
        found = [] if first is None else [first]
        queue = self.manager.output_router.output_queue
        while not queue.empty():
            found.append(queue.get_nowait())
        return found

    def decode(self, tokens: list[int], plan: GenerationPlan) -> str:
        """The generated text of ``tokens``, decoded as the pipeline decodes it."""
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=plan.skip_special_tokens,
                                          clean_up_tokenization_spaces=plan.clean_up)
        return text

    def record(self, prompt: str, tokens: list[int], plan: GenerationPlan) -> dict[str, str]:
        """One sequence's record, as the local pipeline returns it."""
        text = self.decode(tokens, plan)
        return {"generated_text": prompt + text if plan.full_text else text}

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The model to the caller alone: the loop pauses after its current step, keeping
        its requests, until the block ends (several callers may hold it at once).

        Needed by every other call on the same model: transformers' forward sets the shared
        ``config.is_causal`` for its duration (the loop's passes False), and two threads'
        forwards interleaving left it False for good: every later call then attended to
        future tokens (measured: the static path's results changed for the rest of the run).
        """
        try:
            pause = self.manager.pause()
            pause.__enter__()
        except RuntimeError:  # no loop running: nothing to pause
            yield
            return
        try:
            yield
        finally:
            pause.__exit__(None, None, None)

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the generation loop runs."""
        return bool(self.manager.is_running())

    def restart(self) -> None:
        """Start the generation loop again after it failed (its requests were failed)."""
        self.manager.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the generation loop (requests in it are failed) and free its cache."""
        try:
            self.manager.stop(block=True, timeout=timeout, hard_stop=True)
        except Exception as exc:  # stopping is best effort at shutdown
            log.warning("continuous batching loop did not stop cleanly: %s", exc)


def _unsupported(pipe: Any, device: torch.device) -> str | None:
    """Why the manager cannot serve this pipeline (None: it can)."""
    model = pipe.model
    if pipe.task != "text-generation":
        return f"task {pipe.task!r} is not text-generation"
    if not hasattr(model, "init_continuous_batching"):
        return f"{type(model).__name__} has no continuous batching support in transformers"
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    attention = getattr(config, "_attn_implementation", None)
    if attention != "sdpa" and not str(attention).startswith("flash"):
        return (f"the model runs {attention!r} attention; continuous batching would switch the "
                "shared model to paged attention under the static path (needs sdpa or flash)")
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type!r} (continuous batching here: cpu and cuda)"
    return None


def _longest_sequence(model: Any, device: torch.device) -> int | None:
    """The model's maximum positions; on a CPU at most what the cache is sized for."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if device.type == "cpu":
        return min(int(positions or CPU_SEQUENCE_BUDGET), CPU_SEQUENCE_BUDGET)
    return int(positions) if positions else None


def _cache_size(model: Any, device: torch.device, max_requests: int, max_step_tokens: int
                ) -> dict[str, Any]:
    """The paged cache's size: on a CPU, room for ``max_requests`` sequences of up to
    CPU_SEQUENCE_BUDGET tokens (transformers would take 60% of the machine's RAM); on a GPU,
    60% of free memory (leaving room for the static path's calls on the same model)."""
    size: dict[str, Any] = {}
    if max_step_tokens:
        size["max_batch_tokens"] = max_step_tokens
    if device.type == "cpu":
        longest = _longest_sequence(model, device) or CPU_SEQUENCE_BUDGET
        size["num_blocks"] = max_requests * math.ceil(longest / PAGE_SIZE)
        size.setdefault("max_batch_tokens", CPU_STEP_TOKENS)
    else:
        size["max_memory_percent"] = 0.6
    return size
