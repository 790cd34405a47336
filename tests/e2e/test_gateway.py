"""``pipeq gateway`` over the wire: curl (and Node's fetch) against a real uvicorn gateway,
a real Redis, real workers and a real webhook receiver.

Every endpoint and every error status; key isolation (key B gets 404 for key A's job); a
rate limit; a webhook that fails 3 times then succeeds is delivered once with a valid
Standard Webhooks signature; a webhook pending while the gateway and the worker are
SIGKILLed is still delivered after both restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from compare import assert_same
from conftest import ROOT, Deployment, WorkerProcess
from gateway_support import (
    SECRET_A,
    SECRET_B,
    SECRET_NARROW,
    SECRET_SLOW,
    WEBHOOK_SECRET,
    GatewayProcess,
    Receiver,
    curl,
    keys_file,
    node_available,
)
from tiny_models import build_text_model

TASK = "text-classification"
PROBLEM = "application/problem+json"


@dataclass
class Stack:
    """The module's deployment: a worker, a gateway, a webhook receiver."""

    dep: Deployment
    model: str
    worker: WorkerProcess
    gateway: GatewayProcess
    receiver: Receiver
    hooks: str
    env: dict[str, str]

    def job(self, inputs: Any = "I love it", **extra: Any) -> dict[str, Any]:
        return {"task": TASK, "model": self.model, "inputs": inputs, **extra}


@pytest.fixture(scope="module")
def stack(module_deployment: Deployment, models_dir: Path) -> Iterator[Stack]:
    dep = module_deployment
    model = str(build_text_model(TASK, models_dir))
    worker = dep.start_worker(TASK, model)
    receiver = Receiver()
    hooks = receiver.start()
    env = {"PIPEQ_GATEWAY_API_KEYS_FILE": str(keys_file(dep.workdir / "keys.toml", model, hooks)),
           "PIPEQ_WEBHOOK_SECRET": WEBHOOK_SECRET, "PIPEQ_WEBHOOK_ALLOW_PRIVATE": "true",
           "PIPEQ_WEBHOOK_BACKOFF_S": "0.3"}
    gateway = GatewayProcess(dep, env=env).wait_ready()
    stack = Stack(dep, model, worker, gateway, receiver, hooks, env)
    yield stack
    stack.gateway.stop()  # the one running now (a test restarts it)
    receiver.server.shutdown()


def assert_problem(reply: Any, status: int, error: str) -> dict[str, Any]:
    """The reply is an RFC 9457 problem of ``status`` carrying pipeq error ``error``."""
    assert reply.status == status, reply.text
    assert reply.headers["content-type"].startswith(PROBLEM), reply.headers
    body: dict[str, Any] = reply.json()
    assert body["status"] == status and body["pipeq_error"] == error, body
    assert body["type"].endswith("/" + error) and body["title"] and body["detail"]
    return body


# --- jobs --------------------------------------------------------------------------------


def test_submit_with_wait_returns_what_the_python_client_returns(stack: Stack) -> None:
    texts = ["I love it", "this is bad", "so so"]
    reply = curl(stack.gateway.url + "/v1/jobs?wait=30", "POST", stack.job(texts))
    assert reply.status == 200, reply.text
    body = reply.json()
    assert body["status"] == "SUCCESS" and body["error"] is None
    assert reply.headers["location"] == f"/v1/jobs/{body['id']}"
    assert_same(body["result"], stack.dep.remote(TASK, stack.model)(texts))


def test_submit_without_wait_is_accepted_then_read_with_prefer_wait(stack: Stack) -> None:
    reply = curl(stack.gateway.url + "/v1/jobs", "POST", stack.job("I love it"))
    assert reply.status == 202, reply.text
    job = reply.json()
    assert job["status"] == "PENDING" and job["route"]["model"] == stack.model
    got = curl(stack.gateway.url + reply.headers["location"], headers={"Prefer": "wait=30"})
    assert got.status == 200 and got.json()["status"] == "SUCCESS", got.text
    assert_same(got.json()["result"], stack.dep.remote(TASK, stack.model)("I love it"))
    inline = curl(stack.gateway.url + "/v1/jobs", "POST", stack.job("ok"),
                  headers={"Prefer": "respond-async, wait=30"})
    assert inline.status == 200 and inline.headers["preference-applied"] == "wait=30"


def test_parameters_and_idempotency_keys(stack: Stack) -> None:
    url = stack.gateway.url + "/v1/jobs?wait=30"
    first = curl(url, "POST", stack.job("fine", parameters={"top_k": 2}, idempotency_key="k1"))
    assert first.status == 200 and len(first.json()["result"]) == 2, first.text
    again = curl(url, "POST", stack.job("other", idempotency_key="k1"))
    assert again.json()["id"] == first.json()["id"]
    # another key's idempotency key of the same name is its own
    other = curl(url, "POST", stack.job("fine", idempotency_key="k1"), secret=SECRET_B)
    assert other.json()["id"] != first.json()["id"]


def test_a_failed_job_is_a_200_with_its_error(stack: Stack) -> None:
    reply = curl(stack.gateway.url + "/v1/jobs?wait=30", "POST",
                 stack.job("x", parameters={"top_k": -3}))
    if reply.status == 422:  # refused before enqueueing is as good: nothing ran
        assert_problem(reply, 422, "ValidationError")
        return
    assert reply.status == 200 and reply.json()["status"] == "FAILURE", reply.text
    assert reply.json()["error"]["type"] and reply.json()["error"]["message"]


def test_cancel_a_finished_job_says_it_ended(stack: Stack) -> None:
    job = curl(stack.gateway.url + "/v1/jobs?wait=30", "POST", stack.job("a")).json()
    reply = curl(f"{stack.gateway.url}/v1/jobs/{job['id']}", "DELETE")
    assert reply.status == 200 and reply.json()["status"] == "SUCCESS", reply.text


def test_events_stream_states_then_the_result(stack: Stack) -> None:
    job = curl(stack.gateway.url + "/v1/jobs", "POST", stack.job("stream me")).json()
    out = subprocess.run(["curl", "-sN", "--max-time", "30", "-H",
                          f"Authorization: Bearer {SECRET_A}",
                          f"{stack.gateway.url}/v1/jobs/{job['id']}/events"],
                         capture_output=True, text=True, timeout=40, check=True).stdout
    events = [block.split("\n") for block in out.strip().split("\n\n")]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names[0] == "state" and names[-1] == "result", out
    result = json.loads(events[-1][1].removeprefix("data: "))
    assert result["status"] == "SUCCESS" and result["id"] == job["id"]


# --- errors ------------------------------------------------------------------------------


def test_key_b_cannot_see_or_cancel_key_a_s_job(stack: Stack) -> None:
    job = curl(stack.gateway.url + "/v1/jobs", "POST", stack.job("mine")).json()
    url = f"{stack.gateway.url}/v1/jobs/{job['id']}"
    assert_problem(curl(url, secret=SECRET_B), 404, "JobNotFound")
    assert_problem(curl(url, "DELETE", secret=SECRET_B), 404, "JobNotFound")
    assert_problem(curl(url + "/events", secret=SECRET_B), 404, "JobNotFound")
    assert curl(url + "?wait=30").json()["status"] == "SUCCESS"


def test_every_error_status_is_a_problem_document(stack: Stack) -> None:
    base = stack.gateway.url
    assert_problem(curl(base + "/v1/jobs", "POST", stack.job(), secret=None), 401,
                   "Unauthorized")
    assert_problem(curl(base + "/v1/jobs", "POST", stack.job(), secret="wrong" * 5), 401,
                   "Unauthorized")
    assert_problem(curl(base + "/v1/jobs/nope"), 404, "JobNotFound")
    assert_problem(curl(base + "/v1/nothing-here"), 404, "NotFound")
    assert_problem(curl(base + "/v1/jobs", "POST", "{not json"), 422, "ValidationError")
    assert_problem(curl(base + "/v1/jobs", "POST", {"task": TASK}), 422, "ValidationError")
    unsupported = assert_problem(curl(base + "/v1/jobs", "POST", {**stack.job(),
                                      "task": "summarization"}), 422, "ValidationError")
    assert "summarization" in unsupported["detail"]
    assert_problem(curl(base + "/v1/jobs", "POST", stack.job(extra_field=1)), 422,
                   "ValidationError")
    assert_problem(curl(base + "/v1/jobs", "POST", stack.job(parameters={"timeout": 3})),
                   422, "ValidationError")
    assert_problem(curl(base + "/v1/jobs", "POST", stack.job(12345)), 422, "ValidationError")
    no_worker = curl(base + "/v1/jobs", "POST", {**stack.job(), "model": "/no/such/model"})
    assert_problem(no_worker, 503, "NoWorkerError")
    assert int(no_worker.headers["retry-after"]) >= 1
    assert_problem(curl(base + "/v1/jobs", "POST", stack.job(), secret=SECRET_NARROW), 403,
                   "RouteNotAllowed")
    assert_problem(curl(base + "/v1/jobs", "POST", stack.job(webhook="ftp://x/y")), 422,
                   "ValidationError")


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(stack: Stack) -> None:
    statuses = [curl(stack.gateway.url + "/v1/routes", secret=SECRET_SLOW) for _ in range(7)]
    limited = [r for r in statuses if r.status == 429]
    assert limited, [r.status for r in statuses]
    assert_problem(limited[0], 429, "RateLimited")
    assert 1 <= int(limited[0].headers["retry-after"]) <= 60
    assert curl(stack.gateway.url + "/v1/routes").status == 200  # other keys unaffected


# --- routes, health, metrics, OpenAPI ----------------------------------------------------


def test_routes_health_metrics_and_openapi(stack: Stack) -> None:
    base = stack.gateway.url
    routes = curl(base + "/v1/routes").json()["routes"]
    ours = [r for r in routes if r["route"].startswith(f"{TASK}:{stack.model}")]
    assert ours and ours[0]["healthy"] and ours[0]["workers"], routes
    assert curl(base + "/v1/routes", secret=SECRET_NARROW).json()["routes"] == []
    assert curl(base + "/healthz", secret=None).json() == {"status": "ok", "detail": None}
    assert curl(base + "/readyz", secret=None).json()["status"] == "ready"
    metrics = curl(base + "/metrics", secret=None).text
    assert 'pipeq_gateway_requests_total{key="key-a"}' in metrics
    assert "pipeq_webhooks_pending" in metrics and "pipeq_webhooks_dead 0" in metrics
    spec = curl(base + "/openapi.json", secret=None).json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/routes"} <= set(
        spec["paths"])
    assert PROBLEM in json.dumps(spec["paths"]["/v1/jobs"]["post"]["responses"]["422"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_node_fetch_client(stack: Stack) -> None:
    if not node_available():
        pytest.skip("node (18+, with fetch) is not installed")
    script = ROOT / "examples" / "gateway_client.mjs"
    out = subprocess.run(["node", str(script), stack.gateway.url, SECRET_A, TASK, stack.model,
                          "I love it"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert_same(json.loads(out.stdout), stack.dep.remote(TASK, stack.model)("I love it"))


# --- webhooks ----------------------------------------------------------------------------


def test_a_webhook_failing_three_times_is_delivered_once_signed(stack: Stack) -> None:
    from standardwebhooks import Webhook

    stack.receiver.fail_first["/flaky"] = 3
    job = curl(stack.gateway.url + "/v1/jobs", "POST",
               stack.job("hook me", webhook=stack.hooks + "/flaky")).json()
    got = stack.receiver.wait_for("/flaky", 1)
    time.sleep(1.5)  # nothing more may arrive after the success
    got = stack.receiver.deliveries["/flaky"]
    assert [d.answered for d in got] == [500, 500, 500, 204]
    assert len({d.headers["webhook-id"] for d in got}) == 1
    event = Webhook(WEBHOOK_SECRET).verify(got[-1].body, got[-1].headers)
    assert event["type"] == "job.success" and event["data"]["id"] == job["id"]
    assert_same(event["data"]["result"], stack.dep.remote(TASK, stack.model)("hook me"))
    metrics = curl(stack.gateway.url + "/metrics", secret=None).text
    assert "pipeq_webhooks_failed_attempts_total 3" in metrics


def test_a_key_s_default_webhook(stack: Stack) -> None:
    from gateway_support import SECRET_HOOKED
    from standardwebhooks import Webhook

    job = curl(stack.gateway.url + "/v1/jobs", "POST",
               stack.job("default", idempotency_key="once"), secret=SECRET_HOOKED).json()
    assert job["webhook"] == stack.hooks + "/default"
    stack.receiver.wait_for("/default", 1)
    again = curl(stack.gateway.url + "/v1/jobs?wait=10", "POST",
                 stack.job("default", idempotency_key="once"), secret=SECRET_HOOKED).json()
    assert again["id"] == job["id"] and again["status"] == "SUCCESS"
    time.sleep(1.5)  # a second webhook for the repeated key would come by now
    (delivery,) = stack.receiver.deliveries["/default"]
    assert Webhook(WEBHOOK_SECRET).verify(delivery.body, delivery.headers)["data"]["id"] == \
        job["id"]


def test_a_webhook_pending_through_sigkill_of_gateway_and_worker_is_delivered(
        stack: Stack, tmp_path: Path) -> None:
    dep = stack.dep
    # A route of its own (a copy of the model), whose worker is frozen: the job stays queued.
    model = str(tmp_path / "copy")
    shutil.copytree(stack.model, model)
    worker = dep.start_worker(TASK, model)
    worker.proc.send_signal(signal.SIGSTOP)
    reply = curl(stack.gateway.url + "/v1/jobs", "POST",
                 {**stack.job("survive"), "model": model, "webhook": stack.hooks + "/kill"})
    assert reply.status == 202, reply.text
    job = reply.json()
    cancelled = curl(stack.gateway.url + "/v1/jobs", "POST", {**stack.job("x"), "model": model})
    gone = curl(f"{stack.gateway.url}/v1/jobs/{cancelled.json()['id']}", "DELETE")
    assert gone.json()["status"] == "CANCELLED", gone.text
    stack.gateway.stop(signal.SIGKILL)
    worker.proc.kill()
    worker.stop()
    assert stack.receiver.deliveries.get("/kill") is None
    dep.start_worker(TASK, model)
    stack.gateway = GatewayProcess(dep, port=stack.gateway.port, env=stack.env).wait_ready()
    (delivery,) = stack.receiver.wait_for("/kill", 1, timeout=120)
    from standardwebhooks import Webhook

    event = Webhook(WEBHOOK_SECRET).verify(delivery.body, delivery.headers)
    assert event["data"]["id"] == job["id"] and event["data"]["status"] == "SUCCESS"


def test_redis_away_is_503_with_retry_after(stack: Stack) -> None:
    from pipeq.ops.embedded import free_port

    away = GatewayProcess(stack.dep, env={
        **stack.env, "PIPEQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "PIPEQ_CONNECT_TIMEOUT_S": "1"}).wait_ready()
    try:
        reply = curl(away.url + "/v1/jobs", "POST", stack.job())
        assert_problem(reply, 503, "BrokerUnavailable")
        assert int(reply.headers["retry-after"]) >= 1
        ready = curl(away.url + "/readyz", secret=None)
        assert ready.status == 503 and ready.json()["status"] == "unavailable"
        assert curl(away.url + "/healthz", secret=None).status == 200
    finally:
        away.stop()


def test_a_webhook_never_accepted_is_dead_lettered_and_shown(stack: Stack) -> None:
    stack.receiver.fail_first["/dead"] = 10**6
    # Every gateway replica delivers from the one outbox; the module's gateway (a retry window
    # of hours) would claim this webhook about half the time and keep retrying it, so only
    # the impatient replica runs here.
    stack.gateway.stop()
    impatient = GatewayProcess(stack.dep, env={**stack.env, "PIPEQ_WEBHOOK_RETRY_FOR_S": "1"}
                               ).wait_ready()
    try:
        curl(impatient.url + "/v1/jobs", "POST", stack.job("x", webhook=stack.hooks + "/dead"))
        deadline = time.monotonic() + 60
        while "pipeq_webhooks_dead 1" not in curl(impatient.url + "/metrics", secret=None).text:
            assert time.monotonic() < deadline, "the webhook was never dead-lettered"
            time.sleep(0.3)
    finally:
        impatient.stop()
        stack.gateway = GatewayProcess(stack.dep, port=stack.gateway.port, env=stack.env
                                       ).wait_ready()
    status = stack.dep.cli("status")
    assert "0 pending, 1 dead-lettered" in status.stdout, status.stdout + status.stderr
    (entry,) = stack.dep.redis.lrange(stack.dep.settings.keys.webhook_dead(), 0, -1)
    assert json.loads(entry)["error"] == "HTTP 500"


def test_node_webhook_receiver_verifies_the_signature(stack: Stack) -> None:
    if not node_available():
        pytest.skip("node (18+, with fetch) is not installed")
    from pipeq.ops.embedded import free_port

    port = free_port()
    receiver = subprocess.Popen(
        ["node", str(ROOT / "examples" / "webhook_receiver.mjs"), str(port)],
        env={**os.environ, "PIPEQ_WEBHOOK_SECRET": WEBHOOK_SECRET},
        stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # node starts listening
        job = curl(stack.gateway.url + "/v1/jobs", "POST",
                   stack.job("node hook", webhook=f"http://127.0.0.1:{port}/hook")).json()
        assert receiver.stdout is not None
        line = receiver.stdout.readline()
        assert json.loads(line) == {"type": "job.success", "id": job["id"],
                                    "result": stack.dep.remote(TASK, stack.model)("node hook")}
    finally:
        receiver.kill()
        receiver.wait(10)


def test_schemathesis_finds_no_5xx_and_no_response_off_the_schema(stack: Stack) -> None:
    """Fuzz the live OpenAPI document (a gateway of its own: no webhooks, no private URLs).

    ``positive_data_acceptance`` is left out: the schema cannot say which models are served
    or which inputs a task takes, so a schema-valid body may rightly get 422 or 403.
    """
    pytest.importorskip("schemathesis")
    from gateway_support import SECRET_FUZZ

    env = {k: v for k, v in stack.env.items() if not k.startswith("PIPEQ_WEBHOOK")}
    fuzzed = GatewayProcess(stack.dep, env=env).wait_ready()
    try:
        out = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run",
             fuzzed.url + "/openapi.json", "-H", f"Authorization: Bearer {SECRET_FUZZ}",
             "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--max-time", "60", "--workers", "1", "--request-timeout", "30",
             "--seed", "20261202"],
            capture_output=True, text=True, timeout=240, cwd=stack.dep.workdir)
    finally:
        fuzzed.stop()
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " 500" not in fuzzed.log() and "Traceback" not in fuzzed.log(), fuzzed.log()[-4000:]


def test_no_auth_on_loopback_serves_without_keys(stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if not k.startswith("PIPEQ_GATEWAY")}
    open_gateway = GatewayProcess(stack.dep, "--no-auth", env=env).wait_ready()
    try:
        reply = curl(open_gateway.url + "/v1/jobs?wait=30", "POST", stack.job("ok"), secret=None)
        assert reply.status == 200 and reply.json()["status"] == "SUCCESS", reply.text
        assert curl(open_gateway.url + reply.headers["location"], secret=None).status == 200
    finally:
        open_gateway.stop()
