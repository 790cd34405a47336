"""Call parameters each pipeline task accepts, validated before anything is enqueued.

One pydantic model per task, ``extra="forbid"``: an unknown or ill-typed parameter is an
error that names the parameter and the accepted ones, never silently dropped. Bounds that
protect workers (``max_new_tokens``, ``num_return_sequences``, ``top_k``) are enforced here
and again by the worker, which validates every message it receives.
"""

from __future__ import annotations

import math
import reprlib
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from pipeq.errors import ValidationError

Finite = Annotated[float, Field(allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Label = Annotated[str, Field(min_length=1, max_length=1000)]

#: Hard upper bounds; generous for real use, small enough that one request cannot hog a GPU.
MAX_NEW_TOKENS = 4096
MAX_RETURN_SEQUENCES = 16
MAX_TOP_K = 1000
MAX_CANDIDATE_LABELS = 256


class TaskParams(BaseModel):
    """Base of every task's call parameters: unknown keys and coercions are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TextGenerationParams(TaskParams):
    """Parameters of ``text-generation`` (pipeline options and generation options)."""

    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] | None = None
    min_new_tokens: Annotated[int, Field(ge=0, le=MAX_NEW_TOKENS)] | None = None
    max_length: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS * 4)] | None = None
    num_return_sequences: Annotated[int, Field(ge=1, le=MAX_RETURN_SEQUENCES)] | None = None
    num_beams: Annotated[int, Field(ge=1, le=MAX_RETURN_SEQUENCES)] | None = None
    do_sample: bool | None = None
    temperature: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] | None = None
    top_p: Probability | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] | None = (
        None
    )
    no_repeat_ngram_size: Annotated[int, Field(ge=0, le=64)] | None = None
    return_full_text: bool | None = None
    return_text: bool | None = None
    prefix: str | None = None
    clean_up_tokenization_spaces: bool | None = None
    skip_special_tokens: bool | None = None
    stop_sequence: str | None = None
    truncation: bool | None = None


class FeatureExtractionParams(TaskParams):
    """Parameters of ``feature-extraction``."""

    truncation: bool | None = None
    return_tensors: bool | None = None


class TextClassificationParams(TaskParams):
    """Parameters of ``text-classification`` (alias ``sentiment-analysis``)."""

    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] | None = None
    truncation: bool | None = None
    function_to_apply: Literal["default", "sigmoid", "softmax", "none"] | None = None


class TokenClassificationParams(TaskParams):
    """Parameters of ``token-classification`` (alias ``ner``)."""

    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] | None = None
    ignore_labels: list[Label] | None = None
    stride: Annotated[int, Field(ge=0, le=4096)] | None = None


class FillMaskParams(TaskParams):
    """Parameters of ``fill-mask``."""

    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] | None = None
    targets: Label | list[Label] | None = None


class ZeroShotClassificationParams(TaskParams):
    """Parameters of ``zero-shot-classification``; ``candidate_labels`` is required."""

    candidate_labels: Label | Annotated[list[Label], Field(min_length=1, max_length=256)]
    hypothesis_template: str | None = None
    multi_label: bool | None = None


class OpenParams(BaseModel):
    """Parameters of tasks without a curated schema: JSON values, checked by the worker."""

    model_config = ConfigDict(extra="allow", frozen=True)


PARAMS_BY_TASK: dict[str, type[BaseModel]] = {
    "text-generation": TextGenerationParams,
    "feature-extraction": FeatureExtractionParams,
    "text-classification": TextClassificationParams,
    "token-classification": TokenClassificationParams,
    "fill-mask": FillMaskParams,
    "zero-shot-classification": ZeroShotClassificationParams,
}


def params_model(task: str) -> type[BaseModel]:
    """The parameter model of a canonical task name."""
    return PARAMS_BY_TASK.get(task, OpenParams)


def validate_params(task: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate call parameters of ``task``; return them without unset (None) values.

    Raises ValidationError naming each bad parameter and, for unknown ones, the accepted names.
    """
    model = params_model(task)
    try:
        parsed = model.model_validate(params)
    except pydantic.ValidationError as exc:
        raise ValidationError(_explain(task, model, exc)) from None
    if model is OpenParams:
        # No schema to type-check against: at least refuse what JSON cannot carry, which
        # would otherwise fail later, at publish time, with a serialiser's error.
        for name, value in params.items():
            problem = _json_problem(value, depth=0)
            if problem:
                raise ValidationError(f"invalid call parameters for {task!r}: "
                                      f"parameter {name!r} {problem}")
    return parsed.model_dump(exclude_none=True)


def _json_problem(value: Any, depth: int) -> str | None:
    """Why ``value`` cannot travel as finite JSON, or None when it can."""
    if depth > 8:
        return "is nested more than 8 levels deep"
    if isinstance(value, float) and not math.isfinite(value):
        return f"contains {value}, which JSON cannot carry"
    if isinstance(value, dict):
        bad_keys = [k for k in value if not isinstance(k, str)]
        if bad_keys:
            return f"has a non-string key {bad_keys[0]!r}"
        items: list[Any] = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif value is None or isinstance(value, (str, bool, int, float)):
        return None
    else:
        return f"cannot travel as JSON: got {type(value).__name__} {value!r:.60}"
    return next((p for p in (_json_problem(v, depth + 1) for v in items) if p), None)


def _explain(task: str, model: type[BaseModel], exc: pydantic.ValidationError) -> str:
    problems = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "parameters"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown parameter {name!r}")
        else:
            # reprlib: a plain repr of a deeply nested value raises RecursionError.
            got = reprlib.repr(err.get("input"))
            message = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"parameter {name!r}: {message} (got {got:.80})")
    accepted = ", ".join(sorted(model.model_fields))
    return f"invalid call parameters for {task!r}: " + "; ".join(problems) + (
        f". Accepted parameters: {accepted}" if accepted else ""
    )
