"""Building a route's pipeline on its device: AutoClasses via ``transformers.pipeline()``.

Loading happens once per worker process, before it consumes anything; a model that cannot
be loaded raises :class:`ModelLoadError` and the worker exits non-zero without touching
the queue.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeq.core.config import RouteSpec

log = logging.getLogger("pipeq.loader")


class ModelLoadError(Exception):
    """Raised when a route's pipeline cannot be built (missing, offline, wrong task ...)."""


def load_pipeline(spec: RouteSpec, device: str) -> Any:
    """Build the route's pipeline on ``device`` and prepare it for batched calls."""
    import torch
    import transformers

    kwargs: dict[str, Any] = {
        "task": spec.route.task,
        "model": spec.model,
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "device": torch.device(device),
    }
    if spec.tokenizer:
        kwargs["tokenizer"] = spec.tokenizer
    if spec.dtype != "auto":
        if not isinstance(getattr(torch, spec.dtype, None), torch.dtype):
            raise ModelLoadError(f"unknown dtype {spec.dtype!r}; use e.g. float16, bfloat16")
        kwargs["dtype"] = getattr(torch, spec.dtype)
    missing = missing_folder(spec.model)
    if missing:
        raise ModelLoadError(missing)
    started = time.perf_counter()
    try:
        pipe = transformers.pipeline(**kwargs)
    except Exception as exc:  # any loading failure is fatal for this worker; say which
        raise ModelLoadError(
            f"cannot load {spec.route.describe()} for task {spec.route.task!r} on {device}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    prepare_for_batching(pipe)
    log.info("loaded %s on %s in %.1fs", spec.route.describe(), device,
             time.perf_counter() - started)
    return pipe


def missing_folder(model: str) -> str | None:
    """Why ``model``, written as a local path, cannot be loaded (None: it exists, or it is a
    hub id). transformers would take a missing folder for a hub id and complain about the
    repo id's format instead."""
    if not model.startswith(("/", "./", "../", "~", ".\\")) and model not in (".", ".."):
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        return None
    what = "is a file, not a model folder" if path.exists() else "does not exist"
    return (f"model folder {model} {what} on this machine (working directory "
            f"{Path.cwd()}): give the directory that holds the model's config.json, or a hub "
            "id such as org/name")


def prepare_for_batching(pipe: Any) -> None:
    """Let models whose tokenizer has no pad token (GPT-2 family) run batched.

    Padding uses the EOS token, on the left for decoder-only generation so that new tokens
    follow the prompt directly; the attention mask keeps results equal to unbatched ones.
    """
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(pipe.model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(pipe.model, "generation_config", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if pipe.task == "text-generation":
        tokenizer.padding_side = "left"


def warmup_call(pipe: Any) -> tuple[list[Any], dict[str, Any]] | None:
    """Inputs and parameters that exercise the route once before it serves (None: skip)."""
    task = pipe.task
    tokenizer = getattr(pipe, "tokenizer", None)
    if task == "text-generation":
        return ["Hello, world", "A longer warm-up sentence"], {"max_new_tokens": 2}
    if task == "fill-mask" and tokenizer is not None and tokenizer.mask_token:
        return [f"Hello {tokenizer.mask_token}."], {}
    if task == "zero-shot-classification":
        return ["warm-up"], {"candidate_labels": ["a", "b"]}
    if task in ("feature-extraction", "text-classification", "token-classification"):
        return ["Hello, world", "A longer warm-up sentence for the model"], {}
    from pipeq.worker.model.media import media_warmup_call  # image and audio routes

    return media_warmup_call(pipe)
