"""The bad-input corpus of tests/faults/test_messages.py, and the route it runs against:
calls the producer must refuse, Celery messages that bypass the producer, raw queue items."""


import base64
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from compare import assert_same
from conftest import Deployment, WorkerProcess
from fault_support import (
    TASK,
    kombu_envelope,
)

from pipeq import RemotePipeline, pipeline
from pipeq.core.contract import JobRequest, new_job_id
from pipeq.errors import NoWorkerError, PipeqError, ValidationError

NAN, INF = math.nan, math.inf


@dataclass
class Served:
    """The module's route, its worker, what was seen before the worker started."""

    dep: Deployment
    model: str
    remote: RemotePipeline
    worker: WorkerProcess
    local: Any
    #: Two submissions with one idempotency key before any worker ran (ids, queue length).
    early_ids: tuple[str, str]
    early_queue_length: int

    @property
    def queue(self) -> str:
        """The route's Celery queue name."""
        return self.dep.settings.keys.queue(self.remote.route)

    @property
    def task_name(self) -> str:
        """The route's Celery task name."""
        return self.dep.settings.keys.task_name(self.remote.route)

    def good_job(self, text: str = "a good job after a bad one") -> None:
        """A normal call gets the local pipeline's result (the worker is still serving)."""
        assert_same(self.remote(text, timeout=30), self.local(text))

    def request(self, **overrides: Any) -> dict[str, Any]:
        """A valid job message body for this route, then ``overrides``."""
        body = JobRequest(job_id=new_job_id(), route=self.remote.route, inputs=["hello"],
                          single=True, submitted_at=time.time(),
                          deadline=time.time() + 60).model_dump(mode="json")
        return {**body, **overrides}

    def known(self, job_id: str) -> str:
        """Give a job id its PENDING record, as pipeq's producer does when it submits (a
        message that bypasses the producer has none, and its id would be unknown)."""
        self.dep.redis.hset(self.dep.settings.keys.result(job_id), "state", "PENDING")
        return job_id

    def push(self, item: bytes | dict[str, Any]) -> None:
        """LPUSH a raw item onto the route's queue list, as a stray client could."""
        raw = json.dumps(item).encode() if isinstance(item, dict) else item
        self.dep.redis.lpush(
            self.dep.settings.keys.lane_queue_key(self.remote.route, "interactive"), raw)



# --- the bad-input corpus ------------------------------------------------------------------


def nested(depth: int, leaf: Any = "x") -> Any:
    """``[[[...leaf...]]]``, ``depth`` lists deep (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> dict[str, Any]:
    """``{"text": {"text": ...}}``, ``depth`` levels deep."""
    value: Any = "x"
    for _ in range(depth):
        value = {"text": value}
    return value


ProducerCase = tuple[str, Callable[[], Any], type[PipeqError], str]


def producer_cases(served: Served) -> list[ProducerCase]:
    """Calls the producer must refuse with a clear error, enqueueing nothing."""
    tc = served.remote
    dep, model = served.dep, served.model
    # Routes without a worker: parameters are validated before the worker check.
    gen = dep.remote("text-generation", model)
    zero = dep.remote("zero-shot-classification", model)
    fill = dep.remote("fill-mask", model)
    feat = dep.remote("feature-extraction", model)
    tok = dep.remote("token-classification", model)
    open_task = dep.remote("text-to-speech", model)  # parameters without a curated schema
    bad = ValidationError
    labels = {"candidate_labels": ["a", "b"]}
    return [
        # issue #19: unbounded strings and format widths in parameters
        ("stop_sequence of 10M chars", lambda: gen.submit("hi", max_new_tokens=2,
                                                          stop_sequence="x" * 10_000_000),
         bad, "bytes as JSON, over the limit of 262,144"),
        ("stop_sequence of 2,000 chars", lambda: gen.submit("hi", stop_sequence="x" * 2000),
         bad, "parameter 'stop_sequence': String should have at most 1000 characters"),
        ("stop_sequence empty", lambda: gen.submit("hi", stop_sequence=""), bad,
         "parameter 'stop_sequence'"),
        ("prefix of 10M chars", lambda: gen.submit("hi", prefix="x" * 10_000_000), bad,
         "over the limit of 262,144"),
        ("prefix of 20,000 chars", lambda: gen.submit("hi", prefix="x" * 20_000), bad,
         "parameter 'prefix': String should have at most 10000 characters"),
        ("hypothesis_template format width",
         lambda: zero.submit("hi", hypothesis_template="{:x>3000000}", **labels), bad,
         "must hold exactly one plain {}"),
        ("hypothesis_template two fields",
         lambda: zero.submit("hi", hypothesis_template="{} {}", **labels), bad,
         "must hold exactly one plain {}"),
        ("hypothesis_template attribute access",
         lambda: zero.submit("hi", hypothesis_template="{0.__class__}", **labels), bad,
         "must hold exactly one plain {}"),
        ("hypothesis_template without {}",
         lambda: zero.submit("hi", hypothesis_template="no label here", **labels), bad,
         "must hold exactly one plain {}"),
        ("hypothesis_template unbalanced",
         lambda: zero.submit("hi", hypothesis_template="This is {", **labels), bad,
         "not a valid template"),
        ("257 candidate_labels", lambda: zero.submit(
            "hi", candidate_labels=[f"l{i}" for i in range(257)]), bad,
         "List should have at most 256 items"),
        ("candidate label of 1,001 chars", lambda: zero.submit(
            "hi", candidate_labels=["x" * 1001]), bad, "at most 1000 characters"),
        ("ignore_labels of 10,000", lambda: tok.submit(
            "hi", ignore_labels=["O"] * 10_000), bad, "List should have at most 256 items"),
        ("fill-mask 257 targets", lambda: fill.submit(
            "a [MASK]", targets=[f"t{i}" for i in range(257)]), bad, "at most 256 items"),
        ("parameter of an open task, 1 MB", lambda: open_task.submit(
            "hi", anything="x" * 1_000_000), bad, "over the limit of 262,144"),
        ("parameter of an open task, deep", lambda: open_task.submit(
            "hi", anything=nested(100_000)), bad, "nested more than 8 levels deep"),
        ("timeout as a string", lambda: tc.submit("hi", timeout="5"), bad,
         "timeout must be a positive, finite number of seconds, got '5'"),
        ("timeout True", lambda: tc.submit("hi", timeout=True), bad, "timeout must be"),
        ("idempotency_key an int", lambda: tc.submit("hi", idempotency_key=5), bad,
         "idempotency_key must be a non-empty string of <= 256 chars, got int 5"),
        ("result timeout as a string", lambda: tc.job(served.early_ids[0]).result(
            timeout="5"), bad, "timeout must be a number of seconds"),

        ("inputs None", lambda: tc.submit(None), bad, "inputs is None"),
        ("inputs empty list", lambda: tc.submit([]), bad, "inputs is an empty list"),
        ("inputs empty tuple", lambda: tc.submit(()), bad, "inputs is an empty list"),
        ("inputs int", lambda: tc.submit(7), bad, "must be a string, got int"),
        ("inputs float NaN", lambda: tc.submit(NAN), bad, "must be a string, got float"),
        ("inputs bool", lambda: tc.submit(True), bad, "must be a string, got bool"),
        ("inputs bytes", lambda: tc.submit(b"hello"), bad, "must be a string, got bytes"),
        ("inputs set", lambda: tc.submit({"hello"}), bad, "must be a string, got set"),
        ("list with None", lambda: tc.submit(["ok", None]), bad, "input #1 of"),
        ("list of lists", lambda: tc.submit([["nested"]]), bad, "got list"),
        ("dict without text", lambda: tc.submit({"txt": "a"}), bad, "got keys ['txt']"),
        ("dict text not str", lambda: tc.submit({"text": 5}), bad, "'text' must be a string"),
        ("dict unknown key", lambda: tc.submit({"text": "a", "evil": "b"}), bad, "got keys"),
        ("deep nesting (dict x1000)", lambda: tc.submit(nested_dict(1000)), bad,
         "'text' must be a string"),
        ("deep nesting (list x100000)", lambda: tc.submit([nested(100_000)]), bad,
         "must be a string, got list"),
        ("huge string (100,001 chars)", lambda: tc.submit("x" * 100_001), bad,
         "over the limit of 100,000 (PIPEQ_MAX_INPUT_CHARS)"),
        ("huge string in a dict", lambda: tc.submit({"text": "x" * 100_001}), bad,
         "over the limit of 100,000"),
        ("10,001 inputs", lambda: tc.submit(["a"] * 10_001), bad,
         "exceed the limit of 10000 (PIPEQ_MAX_INPUTS_PER_JOB)"),
        ("lone surrogate", lambda: tc.submit("bad \ud800 text"), bad,
         "not valid Unicode text (unpaired surrogate at position 4)"),
        ("invalid UTF-8 (surrogateescape)",
         lambda: tc.submit(b"caf\xe9".decode("utf-8", "surrogateescape")), bad,
         "not valid Unicode text"),
        ("unknown parameter", lambda: tc.submit("hi", foo=1), bad, "unknown parameter 'foo'"),
        ("parameter of another task", lambda: tc.submit("hi", max_new_tokens=5), bad,
         "unknown parameter 'max_new_tokens'"),
        ("top_k string", lambda: tc.submit("hi", top_k="2"), bad, "parameter 'top_k'"),
        ("top_k zero", lambda: tc.submit("hi", top_k=0), bad, "parameter 'top_k'"),
        ("top_k negative", lambda: tc.submit("hi", top_k=-1), bad, "parameter 'top_k'"),
        ("top_k absurd", lambda: tc.submit("hi", top_k=10**12), bad, "parameter 'top_k'"),
        ("top_k NaN", lambda: tc.submit("hi", top_k=NAN), bad, "parameter 'top_k'"),
        ("top_k inf", lambda: tc.submit("hi", top_k=INF), bad, "parameter 'top_k'"),
        ("top_k bool", lambda: tc.submit("hi", top_k=True), bad, "parameter 'top_k'"),
        ("top_k deep list", lambda: tc.submit("hi", top_k=nested(100_000, 1)), bad,
         "parameter 'top_k'"),
        ("function_to_apply unknown", lambda: tc.submit("hi", function_to_apply="bogus"), bad,
         "parameter 'function_to_apply'"),
        ("timeout inf", lambda: tc.submit("hi", timeout=INF), bad,
         "timeout must be a positive, finite number"),
        ("timeout NaN", lambda: tc.submit("hi", timeout=NAN), bad, "timeout must be"),
        ("timeout negative", lambda: tc.submit("hi", timeout=-1), bad, "timeout must be"),
        ("idempotency_key empty", lambda: tc.submit("hi", idempotency_key=""), bad,
         "idempotency_key must be"),
        ("idempotency_key 300 chars", lambda: tc.submit("hi", idempotency_key="k" * 300), bad,
         "idempotency_key must be"),
        ("max_new_tokens negative", lambda: gen.submit("hi", max_new_tokens=-1), bad,
         "parameter 'max_new_tokens'"),
        ("max_new_tokens zero", lambda: gen.submit("hi", max_new_tokens=0), bad,
         "parameter 'max_new_tokens'"),
        ("max_new_tokens absurd", lambda: gen.submit("hi", max_new_tokens=10**9), bad,
         "less than or equal to 4096"),
        ("max_new_tokens NaN", lambda: gen.submit("hi", max_new_tokens=NAN), bad,
         "parameter 'max_new_tokens'"),
        ("max_new_tokens inf", lambda: gen.submit("hi", max_new_tokens=INF), bad,
         "parameter 'max_new_tokens'"),
        ("max_new_tokens float", lambda: gen.submit("hi", max_new_tokens=5.0), bad,
         "parameter 'max_new_tokens'"),
        ("num_return_sequences zero", lambda: gen.submit("hi", num_return_sequences=0), bad,
         "parameter 'num_return_sequences'"),
        ("num_return_sequences negative", lambda: gen.submit("hi", num_return_sequences=-3),
         bad, "parameter 'num_return_sequences'"),
        ("num_return_sequences absurd", lambda: gen.submit("hi", num_return_sequences=10**6),
         bad, "less than or equal to 16"),
        ("temperature NaN", lambda: gen.submit("hi", temperature=NAN), bad,
         "parameter 'temperature'"),
        ("temperature inf", lambda: gen.submit("hi", temperature=INF), bad,
         "parameter 'temperature'"),
        ("temperature negative", lambda: gen.submit("hi", temperature=-1.0), bad,
         "parameter 'temperature'"),
        ("top_p above 1", lambda: gen.submit("hi", top_p=1.5), bad, "parameter 'top_p'"),
        ("do_sample string", lambda: gen.submit("hi", do_sample="yes"), bad,
         "parameter 'do_sample'"),
        ("zero-shot without candidate_labels", lambda: zero.submit("hi"), bad,
         "parameter 'candidate_labels'"),
        ("zero-shot empty candidate_labels", lambda: zero.submit("hi", candidate_labels=[]),
         bad, "List should have at least 1 item"),
        ("zero-shot empty label", lambda: zero.submit("hi", candidate_labels=[""]), bad,
         "candidate_labels"),
        ("fill-mask top_k zero", lambda: fill.submit("a [MASK]", top_k=0), bad,
         "parameter 'top_k'"),
        ("feature-extraction return_tensors string",
         lambda: feat.submit("hi", return_tensors="yes"), bad, "parameter 'return_tensors'"),
        ("wrong task/model pair", lambda: gen.submit("hi"), NoWorkerError,
         f"no live worker serves route text-generation:{model}"),
        ("removed task", lambda: dep.remote("summarization", model), bad,
         "removed in transformers 5"),
        ("unknown task", lambda: dep.remote("text-clasification", model), bad,
         "text-clasification"),
        ("no model", lambda: pipeline(TASK, settings=dep.settings), bad, "needs model="),
        ("model name too long", lambda: dep.remote(TASK, "m" * 600), bad, "at most 512"),
        ("worker-side option", lambda: dep.remote(TASK, model, device="cuda:0"), bad,
         "chosen by the worker"),
        ("unknown pipeline() option", lambda: dep.remote(TASK, model, colour="red"), bad,
         "unknown pipeline() option"),
    ]


def worker_cases(served: Served) -> list[tuple[str, dict[str, Any], str, str]]:
    """Celery messages that bypass the producer: (name, send_task arguments, error type,
    message fragment) of the FAILURE the worker must record."""
    req = served.request
    malformed = "malformed job message"

    def kwargs_of(body: Any) -> dict[str, Any]:
        return {"kwargs": {"request": body}}

    mismatch = req()
    return [
        ("input not a string", kwargs_of(req(inputs=[5])), "ValidationError", malformed),
        ("inputs empty", kwargs_of(req(inputs=[])), "ValidationError", malformed),
        ("inputs not a list", kwargs_of(req(inputs="hello")), "ValidationError", malformed),
        ("inputs missing", kwargs_of({k: v for k, v in req().items() if k != "inputs"}),
         "ValidationError", "inputs: Field required"),
        ("request not an object", kwargs_of("run everything"), "ValidationError", malformed),
        ("request null", kwargs_of(None), "ValidationError", malformed),
        ("NaN parameter", kwargs_of(req(params={"top_k": NAN})), "ValidationError",
         "parameter 'top_k'"),
        ("inf parameter", kwargs_of(req(params={"top_k": INF})), "ValidationError",
         "parameter 'top_k'"),
        ("unknown parameter", kwargs_of(req(params={"evil": 1})), "ValidationError",
         "unknown parameter 'evil'"),
        ("parameter of another task", kwargs_of(req(params={"max_new_tokens": 10})),
         "ValidationError", "unknown parameter 'max_new_tokens'"),
        ("top_k negative", kwargs_of(req(params={"top_k": -1})), "ValidationError",
         "parameter 'top_k'"),
        ("null parameter", kwargs_of(req(params={"top_k": None})), "ValidationError",
         "null values"),
        ("huge string", kwargs_of(req(inputs=["x" * 100_001])), "ValidationError",
         "over the limit of 100,000"),
        ("lone surrogate", kwargs_of(req(inputs=["bad \ud800"])), "ValidationError",
         "not valid Unicode"),
        ("deep nesting (dict x50)", kwargs_of(req(inputs=[nested_dict(50)])),
         "ValidationError", "'text' must be a string"),
        ("10,001 inputs", kwargs_of(req(inputs=["a"] * 10_001, single=False)),
         "ValidationError", "exceed the limit of 10000"),
        ("wrong task/model pair", kwargs_of(req(route={"task": TASK, "model": "elsewhere"})),
         "ValidationError", "job for route text-classification:elsewhere reached a worker"),
        ("removed task", kwargs_of(req(route={"task": "summarization", "model": "m"})),
         "ValidationError", "removed in transformers 5"),
        ("schema version 7", kwargs_of(req(v=7)), "ValidationError",
         "unsupported message schema version 7"),
        ("extra field", kwargs_of(req(run_as="root")), "ValidationError", "run_as"),
        ("submitted_at not a number", kwargs_of(req(submitted_at="yesterday")),
         "ValidationError", "submitted_at"),
        ("deadline NaN", kwargs_of(req(deadline=NAN)), "ValidationError",
         "deadline: Input should be a finite number"),
        ("deadline inf", kwargs_of(req(deadline=INF)), "ValidationError",
         "deadline: Input should be a finite number"),
        ("job id != task id", {**kwargs_of(mismatch), "task_id": new_job_id()},
         "ValidationError", f"message job_id {mismatch['job_id']} != task id"),
        ("positional argument, not a request", {"args": [["rm", "-rf"]]}, "ValidationError",
         malformed),
        ("unexpected keyword", {"kwargs": {"request": req(), "evil": 1}}, "ValidationError",
         malformed),
        ("eta in 2099", {**kwargs_of(req()), "eta": datetime(2099, 1, 1, tzinfo=UTC)},
         "ValidationError", "do not take an eta or countdown"),
        ("positional argument beside the request",
         {"args": [1], "kwargs": {"request": req()}}, "ValidationError",
         "no positional arguments"),
        ("parameters of 300 KB", kwargs_of(req(params={"x" * 8: "y" * 300_000})),
         "ValidationError", "bytes as JSON, over the limit of 262,144"),
        ("input longer than the model", kwargs_of(req(inputs=["word " * 700])),
         "RuntimeError", "input #0: The size of tensor a"),
    ]


def raw_items(served: Served) -> list[tuple[str, bytes | dict[str, Any], str]]:
    """Raw items for the queue list: (name, item, reason fragment of the dead letter)."""
    task, queue = served.task_name, served.queue

    def envelope(**headers: Any) -> dict[str, Any]:
        job_id = new_job_id()
        return kombu_envelope(task, job_id, [[], {"request": served.request(job_id=job_id)},
                                             {}], queue, **headers)

    no_tag = envelope()
    del no_tag["properties"]["delivery_tag"]
    no_info = envelope()
    del no_info["properties"]["delivery_info"]
    no_task = envelope()
    del no_task["headers"]["task"]
    no_id = envelope()
    del no_id["headers"]["id"]
    job_id = new_job_id()
    return [
        ("raw: empty item", b"", "queue item is not JSON"),
        ("raw: invalid UTF-8", b"\xff\xfe\x00garbage", "queue item is not JSON"),
        ("raw: 1 MB of garbage", b"\x00\x01garbage" * 100_000, "queue item is not JSON"),
        ("raw: JSON list", b"[1, 2, 3]", "not a kombu message"),
        ("raw: JSON string", b'"run this"', "not a kombu message"),
        ("raw: JSON NaN", b"NaN", "not a kombu message"),
        ("raw: no delivery_tag", no_tag, "no properties.delivery_tag"),
        ("raw: no delivery_info", no_info, "no properties.delivery_info"),
        ("raw: body not base64", kombu_envelope(task, new_job_id(), None, queue,
                                                raw_body="!!not base64**"),
         "not a kombu message (Error: Invalid base64"),
        ("raw: headers a list", {**envelope(), "headers": ["task"]}, "not a kombu message"),
        ("raw: no task header", no_task, "not a task message (no task name in its headers)"),
        ("raw: no id header", no_id, "invalid task message: no usable task id"),
        ("raw: body not [args, kwargs, embed]", kombu_envelope(task, job_id, {"x": 1}, queue),
         "invalid task message: malformed job message: not a Celery protocol 2 body"),
        ("raw: body invalid JSON", kombu_envelope(
            task, new_job_id(), None, queue, raw_body=base64.b64encode(b"{nope").decode()),
         "message cannot be decoded (application/json)"),
        ("raw: body nested 100000 deep", kombu_envelope(
            task, new_job_id(), None, queue,
            raw_body=base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode()),
         "message cannot be decoded"),
        ("raw: eta not a date", envelope(eta="not-a-date"), "do not take an eta or countdown"),
        ("raw: expires not a date", envelope(expires="someday"),
         "do not take a Celery expiry"),
        ("raw: timelimit not a pair", envelope(timelimit="x"), "do not take a Celery time limit"),
        ("raw: unknown content type", kombu_envelope(task, new_job_id(), None, queue,
                                                     content_type="application/x-yaml",
                                                     raw_body="e30="),
         "invalid task message"),
    ]
