"""``GET /v1/jobs/{id}/stream`` over the wire: a real gateway, a real worker, httpx reading
Server-Sent Events as they come.

The text events, joined, are what the local pipeline generates; they arrive while the job
runs (each decoding step of the worker is slowed to 60 ms), and a ``result`` event ends the
stream with the job as ``GET /v1/jobs/{id}`` shows it. Auth, ownership and jobs that do not
stream answer with problem documents.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import transformers
from conftest import Deployment
from gateway_support import SECRET_A, SECRET_B, GatewayProcess, curl, keys_file
from tiny_models import build_llama_model, build_text_model

TASK = "text-generation"
PARAMS = {"max_new_tokens": 30, "do_sample": False}
PROMPT = "Once upon a time there was"


@dataclass
class Stack:
    """A Llama-style generation worker (slowed per step) and a gateway."""

    dep: Deployment
    model: str
    gateway: GatewayProcess


@pytest.fixture(scope="module")
def stack(module_deployment: Deployment, models_dir: Path) -> Iterator[Stack]:
    dep = module_deployment
    model = str(build_llama_model(models_dir))
    worker = dep.start_worker(TASK, model, ready=False, env={"PIPEQ_FAULTS": "step_ms=60"})
    classifier = build_text_model("text-classification", models_dir)
    env = {"PIPEQ_GATEWAY_API_KEYS_FILE": str(keys_file(dep.workdir / "keys.toml",
                                                        str(classifier)))}
    gateway = GatewayProcess(dep, env=env).wait_ready()
    worker.wait_ready()
    yield Stack(dep, model, gateway)
    gateway.stop()


def submit(stack: Stack, secret: str = SECRET_A, **extra: Any) -> dict[str, Any]:
    body = {"task": TASK, "model": stack.model, "inputs": PROMPT, "parameters": PARAMS,
            "stream": True, **extra}
    reply = curl(stack.gateway.url + "/v1/jobs", "POST", body, secret=secret)
    assert reply.status == 202, reply.text
    job: dict[str, Any] = reply.json()
    return job


def read_events(url: str, secret: str = SECRET_A) -> list[tuple[float, str, Any]]:
    """Every event of an SSE response as (arrival time, event name, data), read with httpx."""
    events: list[tuple[float, str, Any]] = []
    name = None
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {secret}"},
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((time.monotonic(), str(name), json.loads(line[6:])))
    return events


def test_text_events_as_generated_then_the_result(stack: Stack) -> None:
    job = submit(stack)
    events = read_events(f"{stack.gateway.url}/v1/jobs/{job['id']}/stream")
    names = [name for _, name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"text"}, names
    pieces = [data for _, name, data in events if name == "text"]
    assert {(p["index"], p["seq"]) for p in pieces} == {(0, 0)}
    local = transformers.pipeline(TASK, model=stack.model)
    expected = local(PROMPT, return_full_text=False, **PARAMS)[0]["generated_text"]
    assert "".join(p["text"] for p in pieces) == expected
    result = events[-1][2]
    assert result["id"] == job["id"] and result["status"] == "SUCCESS"
    assert result["result"] == local(PROMPT, **PARAMS)
    # Streamed, not buffered: the first piece came long before the end (30 steps x 60 ms).
    assert events[-1][0] - events[0][0] > 0.5, [(round(t, 2), n) for t, n, _ in events]
    # The same text again for a second reader; the same job through GET.
    again = read_events(f"{stack.gateway.url}/v1/jobs/{job['id']}/stream")
    assert [d for _, n, d in again if n == "text"] == pieces
    assert curl(f"{stack.gateway.url}/v1/jobs/{job['id']}").json() == result


def test_a_list_with_sequences(stack: Stack) -> None:
    params = {"max_new_tokens": 8, "do_sample": True, "top_k": 1, "num_return_sequences": 2}
    job = submit(stack, inputs=[PROMPT, "hello world"], parameters=params)
    events = read_events(f"{stack.gateway.url}/v1/jobs/{job['id']}/stream")
    texts: dict[tuple[int, int], str] = {}
    for _, name, data in events:
        if name == "text":
            key = (data["index"], data["seq"])
            texts[key] = texts.get(key, "") + data["text"]
    result = events[-1][2]["result"]
    assert texts == {(i, s): seq["generated_text"].removeprefix([PROMPT, "hello world"][i])
                     for i, seqs in enumerate(result) for s, seq in enumerate(seqs)}


def test_a_reader_that_hangs_up_mid_stream_harms_nothing(stack: Stack) -> None:
    job = submit(stack, parameters={"max_new_tokens": 40, "do_sample": False})
    url = f"{stack.gateway.url}/v1/jobs/{job['id']}/stream"
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {SECRET_A}"},
                      timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: text"):
                break  # hang up after the first piece
    events = read_events(url)  # a second reader gets everything, from the start
    assert events[-1][1] == "result" and events[-1][2]["status"] == "SUCCESS"
    assert curl(stack.gateway.url + "/healthz", secret=None).status == 200
    assert "Traceback" not in stack.gateway.log()


def test_auth_ownership_and_jobs_that_do_not_stream(stack: Stack) -> None:
    job = submit(stack)
    url = f"{stack.gateway.url}/v1/jobs/{job['id']}/stream"
    assert curl(url, secret=None).status == 401
    other = curl(url, secret=SECRET_B)
    assert other.status == 404 and other.json()["pipeq_error"] == "JobNotFound"
    plain = submit(stack, stream=False)
    refused = curl(f"{stack.gateway.url}/v1/jobs/{plain['id']}/stream")
    assert refused.status == 409 and refused.json()["pipeq_error"] == "StreamNotSupported"
    wrong = curl(stack.gateway.url + "/v1/jobs", "POST",
                 {"task": "text-classification", "model": stack.model, "inputs": "x",
                  "stream": True})
    assert wrong.status == 422 and wrong.json()["pipeq_error"] == "StreamNotSupported"
    assert "text-generation" in wrong.json()["detail"]
    beams = curl(stack.gateway.url + "/v1/jobs", "POST",
                 {"task": TASK, "model": stack.model, "inputs": "x", "stream": True,
                  "parameters": {"num_beams": 2}})
    assert beams.status == 422 and "beam search" in beams.json()["detail"]
