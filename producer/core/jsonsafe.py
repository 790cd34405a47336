"""Whether a value can travel as JSON, finite and bounded: the one check both sides use.

Inputs of tasks without a curated schema and parameters without one are JSON values; what
JSON cannot carry (NaN, sets, objects) would otherwise fail late, at publish time, with a
serialiser's error, and a deeply nested value would exhaust the stack of whoever reads it.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from pipeq.errors import ValidationError

#: Deepest nesting of lists and dicts accepted in an input or parameter.
MAX_DEPTH = 8


def describe(value: Any) -> str:
    """A short description of ``value`` for error messages: its type and a clipped repr."""
    # reprlib: a plain repr of a deeply nested value raises RecursionError, not our error.
    return f"{type(value).__name__} {reprlib.repr(value):.60}"


def text_problem(text: str, max_chars: int | None = None) -> str | None:
    """Why ``text`` cannot be an input (too long, or not valid Unicode), or None."""
    if max_chars is not None and len(text) > max_chars:
        return (f"has {len(text):,} characters, over the limit of {max_chars:,} "
                "(PIPEQ_MAX_INPUT_CHARS): shorten or split it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"is not valid Unicode text (unpaired surrogate at position {exc.start}): "
                "decode your bytes with errors='replace' first")
    return None


def json_problem(value: Any, *, max_chars: int | None = None, depth: int = 0) -> str | None:
    """Why ``value`` cannot travel as finite JSON (or a string is too long), or None."""
    if depth > MAX_DEPTH:
        return f"is nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, str):
        return text_problem(value, max_chars)
    if isinstance(value, float):
        return None if math.isfinite(value) else f"contains {value}, which JSON cannot carry"
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, dict):
        bad_keys = [k for k in value if not isinstance(k, str)]
        if bad_keys:
            return f"has a non-string key {bad_keys[0]!r}"
        items: list[Any] = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return f"cannot travel as JSON: got {describe(value)}"
    for item in items:
        problem = json_problem(item, max_chars=max_chars, depth=depth + 1)
        if problem:
            return problem
    return None


def check_json(value: Any, where: str, *, max_chars: int | None = None, depth: int = 0) -> None:
    """Raise ValidationError saying ``where`` and why, when ``value`` cannot travel as JSON."""
    problem = json_problem(value, max_chars=max_chars, depth=depth)
    if problem:
        raise ValidationError(f"{where} {problem}")
