"""Call parameters: unknown, ill-typed, non-finite or out-of-bounds ones are refused by name."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pipeq.core.params import (
    MAX_CANDIDATE_LABELS,
    MAX_NEW_TOKENS,
    MAX_RETURN_SEQUENCES,
    MAX_TOP_K,
    PARAMS_BY_TASK,
    OpenParams,
    params_model,
    validate_params,
)
from pipeq.core.tasks import SUPPORTED_TASKS, canonical_task
from pipeq.errors import ValidationError

#: A task without a curated parameter schema (its parameters are only checked to be JSON).
OPEN_TASK = next(t for t in sorted(SUPPORTED_TASKS)
                 if params_model(canonical_task(t)) is OpenParams)


def test_known_parameters_pass_and_unset_ones_are_dropped() -> None:
    got = validate_params("text-generation", {"max_new_tokens": 5, "do_sample": False,
                                              "temperature": 0.7, "top_p": None})
    assert got == {"max_new_tokens": 5, "do_sample": False, "temperature": 0.7}
    assert validate_params("fill-mask", {}) == {}
    assert validate_params("zero-shot-classification", {"candidate_labels": ["a", "b"]}) == {
        "candidate_labels": ["a", "b"]}
    assert validate_params("fill-mask", {"targets": "paris"}) == {"targets": "paris"}


def test_unknown_parameter_names_it_and_lists_accepted_ones() -> None:
    with pytest.raises(ValidationError) as info:
        validate_params("text-generation", {"max_tokens": 20})
    message = str(info.value)
    assert "invalid call parameters for 'text-generation'" in message
    assert "unknown parameter 'max_tokens'" in message
    assert "Accepted parameters:" in message and "max_new_tokens" in message


def test_every_unknown_parameter_is_reported() -> None:
    with pytest.raises(ValidationError) as info:
        validate_params("fill-mask", {"topk": 1, "target": "x"})
    assert "unknown parameter 'topk'" in str(info.value)
    assert "unknown parameter 'target'" in str(info.value)
    assert "Accepted parameters: targets, top_k" in str(info.value)


@pytest.mark.parametrize(("task", "params", "name"), [
    ("text-generation", {"max_new_tokens": "20"}, "max_new_tokens"),
    ("text-generation", {"max_new_tokens": 20.0}, "max_new_tokens"),
    ("text-generation", {"do_sample": "false"}, "do_sample"),
    ("text-generation", {"do_sample": 0}, "do_sample"),
    ("text-generation", {"temperature": "0.7"}, "temperature"),
    ("fill-mask", {"top_k": True}, "top_k"),
    ("fill-mask", {"targets": 3}, "targets"),
    ("text-classification", {"function_to_apply": "relu"}, "function_to_apply"),
    ("token-classification", {"aggregation_strategy": "mean"}, "aggregation_strategy"),
    ("token-classification", {"ignore_labels": "O"}, "ignore_labels"),
    ("zero-shot-classification", {"candidate_labels": [1, 2]}, "candidate_labels"),
    ("feature-extraction", {"return_tensors": "yes"}, "return_tensors"),
])
def test_ill_typed_parameter_is_named(task: str, params: dict[str, Any], name: str) -> None:
    with pytest.raises(ValidationError, match=f"parameter '{name}") as info:
        validate_params(task, params)
    # The value the caller gave is quoted back, so they can see what was wrong.
    assert repr(next(iter(params.values())))[:20] in str(info.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty"])
def test_non_finite_floats_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValidationError, match=f"parameter '{name}'"):
        validate_params("text-generation", {name: value})


@pytest.mark.parametrize(("task", "params", "bound"), [
    ("text-generation", {"max_new_tokens": MAX_NEW_TOKENS + 1},
     f"less than or equal to {MAX_NEW_TOKENS}"),
    ("text-generation", {"max_new_tokens": 0}, "greater than or equal to 1"),
    ("text-generation", {"num_return_sequences": MAX_RETURN_SEQUENCES + 1},
     f"less than or equal to {MAX_RETURN_SEQUENCES}"),
    ("text-generation", {"num_beams": 0}, "greater than or equal to 1"),
    ("text-generation", {"temperature": 0.0}, "greater than 0"),
    ("text-generation", {"top_p": 1.5}, "less than or equal to 1"),
    ("text-generation", {"top_k": -1}, "greater than or equal to 0"),
    ("fill-mask", {"top_k": MAX_TOP_K + 1}, f"less than or equal to {MAX_TOP_K}"),
    ("text-classification", {"top_k": 0}, "greater than or equal to 1"),
    ("zero-shot-classification", {"candidate_labels": []}, "at least 1 item"),
    ("zero-shot-classification", {"candidate_labels": ["x"] * (MAX_CANDIDATE_LABELS + 1)},
     f"at most {MAX_CANDIDATE_LABELS} items"),
    ("zero-shot-classification", {"candidate_labels": [""]}, "at least 1 character"),
])
def test_out_of_bounds_parameters_are_refused(task: str, params: dict[str, Any],
                                              bound: str) -> None:
    name = next(iter(params))
    with pytest.raises(ValidationError, match=f"parameter '{name}") as info:
        validate_params(task, params)
    assert bound in str(info.value)


def test_required_parameter_missing() -> None:
    with pytest.raises(ValidationError, match="parameter 'candidate_labels': Field required"):
        validate_params("zero-shot-classification", {"multi_label": True})


def test_curated_tasks_cover_the_text_tasks() -> None:
    assert set(PARAMS_BY_TASK) >= {"text-generation", "feature-extraction",
                                   "text-classification", "token-classification",
                                   "fill-mask", "zero-shot-classification"}


def test_open_task_passes_json_parameters_through() -> None:
    params = {"top_k": 3, "labels": ["a", "b"], "options": {"x": None, "y": 1.5}}
    assert validate_params(OPEN_TASK, params) == {
        "top_k": 3, "labels": ["a", "b"], "options": {"y": 1.5, "x": None}}


@pytest.mark.parametrize(("value", "problem"), [
    (math.nan, "nan"),
    ([1.0, math.inf], "inf"),
    (b"raw", "bytes"),
    (object(), "object"),
    ({1: "a"}, "non-string key"),
])
def test_open_task_refuses_what_json_cannot_carry(value: Any, problem: str) -> None:
    """Tasks without a curated schema still get only JSON-safe, finite parameters."""
    with pytest.raises(ValidationError, match="parameter 'threshold'") as info:
        validate_params(OPEN_TASK, {"threshold": value})
    assert problem in str(info.value)
