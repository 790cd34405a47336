"""Request validation before anything is enqueued (and again by the worker).

Each problem gets a ValidationError that says what is wrong and how to fix it.
"""

from __future__ import annotations

import reprlib
from typing import Any

from .errors import ValidationError
from .media import check_envelope, is_envelope, media_kind

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

MAX_DEPTH = 8


def normalize_inputs(inputs: Any) -> tuple[list[Any], bool]:
    """Split a call's inputs into a list and whether the caller passed a single input."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValidationError("inputs is an empty list: pass at least one input")
        return list(inputs), False
    if inputs is None:
        raise ValidationError("inputs is None: pass a string (or a list of strings)")
    return [inputs], True


def validate_inputs(task: str, items: list[Any], *, max_chars: int, max_items: int,
                    max_payload_bytes: int | None = None) -> None:
    """Check every input of a job for its task; raise ValidationError naming the first bad one.

    Image and audio tasks take media envelopes (``producer.media``), each payload at most
    ``max_payload_bytes``; a plain value where media belongs is an error.
    """
    if len(items) > max_items:
        raise ValidationError(
            f"{len(items)} inputs in one job exceed the limit of {max_items} "
            "(PIPEQ_MAX_INPUTS_PER_JOB); split them, or use pipeline.map() for bulk work"
        )
    for index, item in enumerate(items):
        where = f"input #{index}" if len(items) > 1 else "the input"
        if task in TEXT_TASKS:
            _check_text_item(task, item, where, max_chars)
        elif media_kind(task) is not None:
            _check_media_item(item, where, max_chars, max_payload_bytes)
        else:
            _check_json(item, where, max_chars, depth=0)


def _check_text_item(task: str, item: Any, where: str, max_chars: int) -> None:
    if isinstance(item, str):
        _check_string(item, where, max_chars)
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
                raise ValidationError(f"{where}: {key!r} must be a string, got {_kind(value)}")
            _check_string(value, f"{where} {key!r}", max_chars)
        return
    raise ValidationError(f"{where} of {task} must be a string, got {_kind(item)}")


def _check_media_item(item: Any, where: str, max_chars: int, max_payload_bytes: int | None
                      ) -> None:
    """A media envelope, or a dict (document-style tasks) whose media are envelopes."""
    if is_envelope(item):
        check_envelope(item, where, max_payload_bytes)
        return
    if not isinstance(item, dict):
        raise ValidationError(f"{where} must be a media envelope (see producer.media), got "
                              f"{_kind(item)}")
    for key, value in item.items():
        values = value if isinstance(value, list) else [value]
        for part in values:
            if is_envelope(part):
                check_envelope(part, f"{where} {key!r}", max_payload_bytes)
            else:
                _check_json(part, f"{where} {key!r}", max_chars, depth=1)


def _check_string(text: str, where: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise ValidationError(
            f"{where} has {len(text):,} characters, over the limit of {max_chars:,} "
            "(PIPEQ_MAX_INPUT_CHARS): shorten or split it"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(
            f"{where} is not valid Unicode text (unpaired surrogate at position {exc.start}): "
            "decode your bytes with errors='replace' first"
        ) from None


def _check_json(value: Any, where: str, max_chars: int, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValidationError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        _check_string(value, where, max_chars)
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValidationError(f"{where} contains {value}, which JSON cannot carry")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(f"{where} has a non-string key {key!r}")
            _check_json(item, where, max_chars, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_json(item, where, max_chars, depth + 1)
    elif not (value is None or isinstance(value, (bool, int))):
        raise ValidationError(f"{where} cannot travel as JSON: got {_kind(value)}")


def _kind(value: Any) -> str:
    # reprlib: a plain repr of a deeply nested input raises RecursionError, not our error.
    return f"{type(value).__name__} {reprlib.repr(value):.60}"
