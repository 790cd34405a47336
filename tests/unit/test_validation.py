"""Inputs are checked before anything is enqueued; each refusal says what is wrong.

The last tests go through ``pipeline(...).submit`` with a Redis that does not exist: a
ValidationError (not BrokerUnavailable) proves validation runs before any network traffic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from pipeq import RemotePipeline, pipeline
from pipeq.client import Client
from pipeq.core.config import Settings
from pipeq.core.jsonsafe import MAX_DEPTH
from pipeq.core.keys import Keys
from pipeq.core.validation import InputLimits, check_inputs
from pipeq.errors import UnsupportedTaskError, ValidationError
from pipeq.inputs import normalize_inputs, prepare_inputs

LIMITS = InputLimits(max_chars=50, max_items=4)


def check(task: str, inputs: Any) -> None:
    """Prepare the inputs like the producer does, and check them again like the worker."""
    prepared = prepare_inputs(task, inputs, job_id="j", keys=Keys("t"), limits=LIMITS,
                              claim_check_bytes=0)
    check_inputs(task, prepared.items, LIMITS)


def test_single_input_and_list_are_told_apart() -> None:
    assert normalize_inputs("hi") == (["hi"], True)
    assert normalize_inputs(["hi"]) == (["hi"], False)
    assert normalize_inputs(("a", "b")) == (["a", "b"], False)
    assert normalize_inputs({"text": "a"}) == ([{"text": "a"}], True)


def test_valid_text_inputs_pass() -> None:
    check("text-generation", "hello")
    check("fill-mask", ["a [MASK]", "b [MASK]"])
    check("text-classification", {"text": "a", "text_pair": "b"})
    check("text-classification", [{"text": "a"}, "plain"])
    check("text-generation", "x" * LIMITS.max_chars)  # the limit itself is allowed
    check("feature-extraction", "héllo wörld ✓ 日本")


def test_empty_list_is_refused() -> None:
    with pytest.raises(ValidationError, match="inputs is an empty list: pass at least one"):
        check("text-classification", [])


def test_none_is_refused() -> None:
    with pytest.raises(ValidationError, match="inputs is None"):
        check("text-classification", None)


@pytest.mark.parametrize(("inputs", "shown"), [
    (42, "got int 42"),
    (b"bytes", "got bytes b'bytes'"),
    (["ok", 3.5], "input #1 of fill-mask must be a string, got float 3.5"),
    ([["nested"]], "got list"),
    ({"text": "a"}, "got dict"),  # mappings are only for text-classification
])
def test_wrong_input_types_are_named(inputs: Any, shown: str) -> None:
    with pytest.raises(ValidationError, match="must be a string") as info:
        check("fill-mask", inputs)
    assert shown in str(info.value)


def test_text_pair_mapping_with_unknown_or_missing_keys() -> None:
    with pytest.raises(ValidationError, match=r"got keys \['text', 'txt_pair'\]"):
        check("text-classification", {"text": "a", "txt_pair": "b"})
    with pytest.raises(ValidationError, match=r"got keys \['text_pair'\]"):
        check("text-classification", {"text_pair": "b"})
    with pytest.raises(ValidationError, match="'text_pair' must be a string, got int 5"):
        check("text-classification", {"text": "a", "text_pair": 5})


def test_oversized_string_names_the_input_and_the_limit() -> None:
    with pytest.raises(ValidationError) as info:
        check("text-generation", ["short", "y" * 51])
    message = str(info.value)
    assert "input #1 has 51 characters, over the limit of 50" in message
    assert "PIPEQ_MAX_INPUT_CHARS" in message


def test_oversized_text_pair() -> None:
    with pytest.raises(ValidationError, match="'text_pair' has 60 characters"):
        check("text-classification", {"text": "a", "text_pair": "z" * 60})


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff there", "a\ud83d"])
def test_lone_surrogates_are_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="not valid Unicode text") as info:
        check("text-classification", text)
    assert f"position {text.index(next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF))}" in str(
        info.value)


def test_a_paired_surrogate_is_fine() -> None:
    check("text-classification", "emoji \U0001f600")


def test_too_many_inputs() -> None:
    with pytest.raises(ValidationError) as info:
        check("text-classification", ["a"] * 5)
    assert "5 inputs in one job exceed the limit of 4" in str(info.value)
    assert "PIPEQ_MAX_INPUTS_PER_JOB" in str(info.value)


@pytest.mark.parametrize(("value", "shown"), [
    (math.nan, "contains nan, which JSON cannot carry"),
    ({"scores": [1.0, -math.inf]}, "contains -inf"),
    (b"\x00\x01", "cannot travel as JSON: got bytes"),
    ({1: "a"}, "non-string key 1"),
    ("q" * 51, "51 characters"),
    ({"text": "\ud800"}, "unpaired surrogate"),
])
def test_json_inputs_of_other_tasks(value: Any, shown: str) -> None:
    with pytest.raises(ValidationError, match=shown):
        check("table-question-answering", value)


def test_deeply_nested_json_input() -> None:
    value: Any = "leaf"
    for _ in range(MAX_DEPTH + 2):
        value = [value]
    with pytest.raises(ValidationError, match=f"nested more than {MAX_DEPTH} levels"):
        check("table-question-answering", [value])


# --- through the public API, before any network ----------------------------------------------


@pytest.fixture
def remote() -> Iterator[RemotePipeline]:
    """A remote text-classification pipeline whose Redis does not exist (port 1)."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0", queue_prefix="unit-validation",
                        max_input_chars=20, max_inputs_per_job=3, connect_timeout_s=0.5)
    yield pipeline("text-classification", model="org/m", settings=settings)
    Client.discard(settings)


@pytest.mark.parametrize(("inputs", "params", "shown"), [
    ([], {}, "empty list"),
    (["a", "b", "c", "d"], {}, "4 inputs in one job exceed the limit of 3"),
    ("x" * 21, {}, "21 characters, over the limit of 20"),
    ("\udc80", {}, "unpaired surrogate"),
    (7, {}, "must be a string"),
    ("ok", {"top_k": "2"}, "parameter 'top_k'"),
    ("ok", {"max_new_tokens": 5}, "unknown parameter 'max_new_tokens'"),
])
def test_submit_validates_before_touching_redis(remote: RemotePipeline, inputs: Any,
                                                params: dict[str, Any], shown: str) -> None:
    with pytest.raises(ValidationError, match=shown):
        remote.submit(inputs, **params)


@pytest.mark.parametrize("timeout", [0, -1, math.nan, math.inf])
def test_submit_refuses_a_timeout_that_is_not_a_positive_finite_number(
        remote: RemotePipeline, timeout: float) -> None:
    with pytest.raises(ValidationError, match="timeout must be a positive"):
        remote.submit("ok", timeout=timeout)


def test_pipeline_refuses_worker_side_and_unknown_options() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", queue_prefix="unit-validation")
    with pytest.raises(ValidationError, match="device is chosen by the worker"):
        pipeline("fill-mask", model="m", settings=settings, device="cuda:0")
    with pytest.raises(ValidationError, match=r"unknown pipeline\(\) option\(s\) \['colour'\]"):
        pipeline("fill-mask", model="m", settings=settings, colour="blue")
    with pytest.raises(ValidationError, match="needs model="):
        pipeline("fill-mask", settings=settings)


def test_pipeline_with_removed_or_unknown_task() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", queue_prefix="unit-validation")
    with pytest.raises(ValidationError, match="removed in transformers 5"):
        pipeline("question-answering", model="m", settings=settings)
    with pytest.raises(ValidationError, match="unknown task 'txt-gen'; supported tasks:"):
        pipeline("txt-gen", model="m", settings=settings)
    assert issubclass(UnsupportedTaskError, ValidationError)
