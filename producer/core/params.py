"""Call parameters each pipeline task accepts, validated before anything is enqueued.

One pydantic model per task, ``extra="forbid"``: an unknown or ill-typed parameter is an
error that names the parameter and the accepted ones, never silently dropped. Bounds that
protect workers are enforced here and again by the worker, which validates every message
it receives: every number has a range, every string a length, every list a count
(``stop_sequence`` and ``prefix`` once grew a worker to 24 GB), a zero-shot template takes one
plain ``{}`` and no format specs (a width such as ``{:x>3000000}`` is a CPU bomb), and the
parameters of a job as JSON are at most ``MAX_PARAMS_BYTES``, whatever the task.
"""

from __future__ import annotations

import json
import math
import reprlib
import string
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeq.errors import ValidationError

#: Hard upper bounds; generous for real use, small enough that one request cannot hog a GPU.
MAX_NEW_TOKENS = 4096
MAX_RETURN_SEQUENCES = 16
MAX_TOP_K = 1000
MAX_CANDIDATE_LABELS = 256
#: Characters of a label, a stop sequence, a template; of a generation prefix.
MAX_LABEL_CHARS = 1000
MAX_PREFIX_CHARS = 10_000
#: All parameters of one job as compact JSON (every task, curated schema or not).
MAX_PARAMS_BYTES = 256 * 1024


def _plain_template(value: str) -> str:
    """A zero-shot hypothesis template: text with exactly one bare ``{}`` (no field name, no
    conversion, no format spec: ``{:x>3000000}`` made one job cost seconds of worker time)."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(value)
                  if name is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write it like 'This is {{}}.'") from None
    if fields != [("", "", None)]:
        raise ValueError("must hold exactly one plain {} where the label goes, and no other "
                         "braces or format specs (write literal braces as {{ and }})")
    return value


Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]
Labels = Annotated[list[Label], Field(min_length=1, max_length=MAX_CANDIDATE_LABELS)]
ShortText = Annotated[str, Field(max_length=MAX_LABEL_CHARS)]
Template = Annotated[str, Field(min_length=2, max_length=MAX_LABEL_CHARS),
                     AfterValidator(_plain_template)]


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
    prefix: Annotated[str, Field(max_length=MAX_PREFIX_CHARS)] | None = None
    clean_up_tokenization_spaces: bool | None = None
    skip_special_tokens: bool | None = None
    stop_sequence: Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)] | None = None
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
    ignore_labels: Annotated[list[Label], Field(max_length=MAX_CANDIDATE_LABELS)] | None = None
    stride: Annotated[int, Field(ge=0, le=4096)] | None = None


class FillMaskParams(TaskParams):
    """Parameters of ``fill-mask``."""

    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] | None = None
    targets: Label | Labels | None = None


class ZeroShotClassificationParams(TaskParams):
    """Parameters of ``zero-shot-classification``; ``candidate_labels`` is required."""

    candidate_labels: Label | Labels
    hypothesis_template: Template | None = None
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
    size = _json_size(params)
    if size > MAX_PARAMS_BYTES:
        raise ValidationError(f"invalid call parameters for {task!r}: {size:,} bytes as JSON, "
                              f"over the limit of {MAX_PARAMS_BYTES:,}; pass long text as the "
                              "input instead")
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


def _json_size(params: dict[str, Any]) -> int:
    """Bytes of ``params`` as compact JSON; 0 when they are not JSON (the checks below say why;
    a string's length is counted, so even a value JSON cannot carry is bounded)."""
    try:
        return len(json.dumps(params, separators=(",", ":"), allow_nan=True))
    except (TypeError, ValueError, RecursionError):
        return sum(len(v) for v in params.values() if isinstance(v, str))


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
