"""Checks of a job's inputs as they travel: text, JSON values and media envelopes.

The producer checks each input as it prepares it (``pipeq.inputs``); the worker checks every
message it receives again with :func:`check_inputs` (messages may come from anywhere). Each
problem is a ValidationError that says which input is wrong, what is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeq.core.envelopes import check_envelope, is_envelope, media_kind
from pipeq.core.jsonsafe import check_json, describe, text_problem
from pipeq.errors import ValidationError

#: Tasks whose inputs are text (a string, or a mapping of strings such as text/text_pair).
TEXT_TASKS = frozenset(
    {
        "text-generation",
        "feature-extraction",
        "text-classification",
        "token-classification",
        "fill-mask",
        "zero-shot-classification",
    }
)


@dataclass(frozen=True, slots=True)
class InputLimits:
    """How much one job may carry: characters per string, inputs, media bytes per input,
    pixels per image (checked by the producer from the header when it has Pillow)."""

    max_chars: int
    max_items: int
    max_payload_bytes: int | None = None
    max_image_pixels: int | None = None


def where_of(index: int, count: int) -> str:
    """How an error names input ``index`` of ``count``."""
    return f"input #{index}" if count > 1 else "the input"


def check_count(count: int, limits: InputLimits) -> None:
    """Refuse a job with more inputs than ``limits.max_items``."""
    if count > limits.max_items:
        raise ValidationError(
            f"{count} inputs in one job exceed the limit of {limits.max_items} "
            "(PIPEQ_MAX_INPUTS_PER_JOB); split them, or use pipeline.map() for bulk work"
        )


def check_inputs(task: str, items: list[Any], limits: InputLimits) -> None:
    """Check every (packed) input of a job; raise ValidationError naming the first bad one.

    Image and audio tasks take media envelopes, each payload at most
    ``limits.max_payload_bytes``; a plain value where media belongs is an error.
    """
    check_count(len(items), limits)
    kind = media_kind(task)
    for index, item in enumerate(items):
        where = where_of(index, len(items))
        if kind is not None:
            check_media_item(item, where, limits)
        else:
            check_item(task, item, where, limits)


def check_item(task: str, item: Any, where: str, limits: InputLimits) -> None:
    """Check one input of a task without media: text for text tasks, else a JSON value."""
    if task not in TEXT_TASKS:
        check_json(item, where, max_chars=limits.max_chars)
        return
    if isinstance(item, str):
        check_text(item, where, limits.max_chars)
        return
    if isinstance(item, dict) and task == "text-classification":
        unknown = set(item) - {"text", "text_pair"}
        if "text" not in item or unknown:
            raise ValidationError(
                f"{where} of text-classification must be a string or "
                f"{{'text': ..., 'text_pair': ...}}, got keys {sorted(item)}"
            )
        for key, value in item.items():
            if not isinstance(value, str):
                raise ValidationError(f"{where}: {key!r} must be a string, got "
                                      f"{describe(value)}")
            check_text(value, f"{where} {key!r}", limits.max_chars)
        return
    raise ValidationError(f"{where} of {task} must be a string, got {describe(item)}")


def check_text(text: str, where: str, max_chars: int) -> None:
    """Refuse a string over ``max_chars`` characters or with unpaired surrogates."""
    problem = text_problem(text, max_chars)
    if problem:
        raise ValidationError(f"{where} {problem}")


def check_media_item(item: Any, where: str, limits: InputLimits) -> None:
    """A media envelope, or a dict (document-style tasks) whose media are envelopes."""
    if is_envelope(item):
        check_envelope(item, where, limits.max_payload_bytes)
        return
    if not isinstance(item, dict):
        raise ValidationError(f"{where} must be a media envelope (see pipeq.core.envelopes), "
                              f"got {describe(item)}")
    for key, value in item.items():
        for part in value if isinstance(value, list) else [value]:
            if is_envelope(part):
                check_envelope(part, f"{where} {key!r}", limits.max_payload_bytes)
            else:
                check_json(part, f"{where} {key!r}", max_chars=limits.max_chars, depth=1)
