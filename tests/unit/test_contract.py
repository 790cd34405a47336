"""The wire contract: route ids, key names, job messages and task names."""

from __future__ import annotations

import re
from typing import Any

import pydantic
import pytest

from pipeq.core.contract import SCHEMA_VERSION, JobRequest, JobState, Route
from pipeq.core.keys import Keys
from pipeq.core.tasks import REMOVED_TASKS, SUPPORTED_TASKS, canonical_task
from pipeq.errors import UnsupportedTaskError, ValidationError

MODEL = "org/tiny-model"


def _request(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": "abc123",
        "route": {"task": "text-classification", "model": MODEL},
        "inputs": ["hello"],
        "single": True,
        "params": {},
        "submitted_at": 1_700_000_000.0,
    }
    body.update(overrides)
    return body


# --- Route ---------------------------------------------------------------------------------


def test_route_id_is_stable_across_instances() -> None:
    first = Route(task="text-classification", model=MODEL, revision="v1")
    second = Route(task="text-classification", model=MODEL, revision="v1")
    assert first.id == second.id
    assert first.id == Route.model_validate_json(first.model_dump_json()).id
    # Pinned: the id names queues in Redis, so changing it strands queued jobs on upgrade
    # (and it must not depend on PYTHONHASHSEED or the process).
    assert first.id == "text-classification.tiny-model.d4a36249b4"


def test_the_cached_route_id_follows_the_fields_and_stays_off_the_wire() -> None:
    # Route.id is cached by the route's fields: a copy with other fields gets its own id,
    # and reading it changes neither the message (workers refuse unknown fields) nor equality.
    asked = Route(task="text-classification", model=MODEL)
    assert asked.id == Route(task="text-classification", model=MODEL).id
    moved = asked.model_copy(update={"model": "org/other"})
    assert moved.id == Route(task="text-classification", model="org/other").id != asked.id
    fresh = Route(task="text-classification", model=MODEL)
    assert asked.model_dump() == fresh.model_dump() == {
        "task": "text-classification", "model": MODEL, "revision": None, "tokenizer": None}
    assert asked.model_dump_json() == fresh.model_dump_json()
    assert asked == fresh and hash(asked) == hash(fresh)


def test_route_id_is_readable_and_safe_for_queue_names() -> None:
    route = Route(task="text-generation", model="/models/my model!/distil gpt2/")
    assert route.id.startswith("text-generation.distil-gpt2.")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", route.id), route.id


@pytest.mark.parametrize(("alias", "canonical"),
                         [("sentiment-analysis", "text-classification"),
                          ("ner", "token-classification"),
                          ("Sentiment-Analysis", "text-classification")])
def test_task_aliases_map_to_the_same_route(alias: str, canonical: str) -> None:
    via_alias = Route(task=alias, model=MODEL)
    direct = Route(task=canonical, model=MODEL)
    assert via_alias.task == canonical
    assert via_alias == direct
    assert via_alias.id == direct.id
    keys = Keys("p")
    assert keys.queue(via_alias) == keys.queue(direct)
    assert keys.task_name(via_alias) == keys.task_name(direct)


def test_route_ids_are_unique_per_identity() -> None:
    routes = [
        Route(task="text-classification", model=MODEL),
        Route(task="text-classification", model=MODEL, revision="v1"),
        Route(task="text-classification", model=MODEL, revision="v2"),
        Route(task="text-classification", model=MODEL, tokenizer="other/tok"),
        Route(task="token-classification", model=MODEL),
        Route(task="text-classification", model="other-org/tiny-model"),
        Route(task="text-classification", model="org/tiny-model-2"),
    ]
    ids = [r.id for r in routes]
    assert len(set(ids)) == len(ids), ids
    queues = [Keys().queue(r) for r in routes]
    assert len(set(queues)) == len(queues)


def test_different_revision_means_different_queue() -> None:
    keys = Keys("pipeq")
    main = Route(task="text-generation", model=MODEL, revision="main")
    pinned = Route(task="text-generation", model=MODEL, revision="0123abcd")
    assert keys.queue(main) != keys.queue(pinned)
    assert keys.lane_queue_key(main, "interactive") != keys.lane_queue_key(pinned, "interactive")


def test_route_describe_and_worker_command() -> None:
    route = Route(task="ner", model=MODEL, revision="v2", tokenizer="org/tok")
    assert route.describe() == f"token-classification:{MODEL}@v2 (tokenizer org/tok)"
    assert route.worker_command() == (
        f"pipeq worker --task token-classification --model {MODEL} --revision v2 "
        "--tokenizer org/tok"
    )


def test_route_refuses_unknown_fields_and_empty_model() -> None:
    with pytest.raises(pydantic.ValidationError, match="Extra inputs are not permitted"):
        Route.model_validate({"task": "fill-mask", "model": MODEL, "device": "cuda:0"})
    with pytest.raises(pydantic.ValidationError, match="at least 1 character"):
        Route(task="fill-mask", model="")


def test_route_with_removed_task_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="removed in transformers 5"):
        Route(task="summarization", model=MODEL)


# --- Keys ----------------------------------------------------------------------------------


def test_key_names() -> None:
    keys = Keys("dep1")
    route = Route(task="fill-mask", model=MODEL)
    assert keys.broker_prefix == "dep1:celery:"
    assert keys.queue(route) == f"dep1.q.{route.id}"
    assert keys.lane_queue_key(route, "interactive") == f"dep1:celery:dep1.q.{route.id}"
    assert keys.lane_queue_key(route, "bulk") == f"dep1:celery:dep1.q.{route.id}.bulk"
    assert keys.bell(route) == f"dep1:celery:dep1.q.{route.id}.bell"
    assert keys.unacked() == "dep1:celery:unacked"
    assert keys.unacked_index() == "dep1:celery:unacked_index"
    assert keys.task_name(route) == f"pipeq.run[{route.id}]"
    assert keys.result("J") == "dep1:job:J"
    assert keys.reply("C") == "dep1:reply:C"
    assert keys.route_workers(route) == f"dep1:route:{route.id}:workers"
    assert keys.routes() == "dep1:routes"
    assert keys.worker_info("w@h") == "dep1:worker:w@h"
    assert keys.dead_letters() == "dep1:dead"
    assert keys.idempotency("k") == "dep1:idem:k"


def test_every_key_lives_under_the_prefix() -> None:
    """Deployments sharing one Redis only ever touch keys under their own prefix."""
    keys = Keys("depX")
    route = Route(task="fill-mask", model=MODEL)
    names = [keys.lane_queue_key(route, "bulk"), keys.bell(route), keys.unacked(),
             keys.unacked_index(), keys.result("j"), keys.reply("c"), keys.route_workers(route),
             keys.routes(), keys.worker_info("h"), keys.dead_letters(), keys.idempotency("k"),
             keys.bulk("b"), keys.cache("d"), keys.payload("j", 0), keys.route_stats(route)]
    assert all(name.startswith("depX") for name in names), names
    assert Keys().prefix == "pipeq"


# --- JobRequest ----------------------------------------------------------------------------


def test_job_request_round_trips_through_json() -> None:
    request = JobRequest.model_validate(_request(params={"top_k": 2}, deadline=1.7e9 + 30,
                                                 reply_to="p:reply:x"))
    again = JobRequest.model_validate_json(request.model_dump_json())
    assert again == request
    assert again.v == SCHEMA_VERSION
    assert again.route == Route(task="text-classification", model=MODEL)


def test_job_request_refuses_extra_keys() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        JobRequest.model_validate(_request(priority=9))
    assert info.value.errors()[0]["loc"] == ("priority",)
    assert info.value.errors()[0]["type"] == "extra_forbidden"


def test_job_request_refuses_extra_keys_in_route() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"route\.device"):
        JobRequest.model_validate(_request(route={"task": "fill-mask", "model": MODEL,
                                                  "device": "cpu"}))


def test_job_request_refuses_unknown_schema_version() -> None:
    with pytest.raises(pydantic.ValidationError,
                       match=f"unsupported message schema version 99 \\(this is {SCHEMA_VERSION}"):
        JobRequest.model_validate(_request(v=99))


@pytest.mark.parametrize(("field", "value"), [("inputs", []), ("job_id", ""),
                                              ("inputs", "not a list"), ("single", "maybe")])
def test_job_request_refuses_bad_fields(field: str, value: Any) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        JobRequest.model_validate(_request(**{field: value}))
    assert info.value.errors()[0]["loc"][0] == field


def test_job_request_is_frozen() -> None:
    request = JobRequest.model_validate(_request())
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        request.job_id = "other"  # type: ignore[misc]


def test_job_states() -> None:
    assert {s for s in JobState if s.is_final} == {
        JobState.SUCCESS, JobState.FAILURE, JobState.CANCELLED, JobState.EXPIRED}
    assert not JobState.PENDING.is_final and not JobState.STARTED.is_final
    assert JobState("CANCELLED") is JobState.CANCELLED


# --- canonical_task ------------------------------------------------------------------------


@pytest.mark.parametrize("task", [*sorted(REMOVED_TASKS), "translation_en_to_fr"])
def test_removed_tasks_say_so(task: str) -> None:
    with pytest.raises(UnsupportedTaskError, match="removed in transformers 5") as info:
        canonical_task(task)
    assert repr(task) in str(info.value)
    assert "text-generation" in str(info.value)  # says what to use instead
    assert isinstance(info.value, ValidationError)


def test_unknown_task_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedTaskError, match="unknown task 'text-clasification'") as info:
        canonical_task("text-clasification")
    message = str(info.value)
    for task in ("text-classification", "text-generation", "fill-mask", "ner"):
        assert task in message
    assert message.count(",") == len(SUPPORTED_TASKS) - 1


@pytest.mark.parametrize("task", ["", None, 3])
def test_task_must_be_a_non_empty_string(task: Any) -> None:
    with pytest.raises(UnsupportedTaskError, match="task must be a non-empty string"):
        canonical_task(task)


def test_canonical_task_normalises_case_and_space() -> None:
    assert canonical_task(" Fill-Mask ") == "fill-mask"
    assert canonical_task("NER") == "token-classification"
    assert canonical_task("text-to-speech") == "text-to-audio"


def test_revision_main_and_no_revision_are_one_route() -> None:
    """The hub's default revision is "main": a worker started with --revision main (as the
    compose file does) serves producers that name no revision, under one queue."""
    plain = Route(task="text-classification", model="org/model")
    main = Route(task="text-classification", model="org/model", revision="main")
    assert main == plain and main.id == plain.id and main.revision is None
    assert main.worker_command() == "pipeq worker --task text-classification --model org/model"
    other = Route(task="text-classification", model="org/model", revision="v2")
    assert other.id != plain.id and other.revision == "v2"
