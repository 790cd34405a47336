"""Celery's own tools on a pipeq deployment, and what they leave behind in Redis.

``celery -A pipeq`` (``pipeq/celery.py``) must find the deployment's app: every ``celery
inspect`` command answers, ``celery events`` sees pipeq jobs, stock ``celery flower`` sees
the workers. And no tool or job leaves keys
behind: after 50 inspects and 500 jobs the keys under the prefix are back to the documented
permanent set (``Keys.permanent``).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Deployment, WorkerProcess
from tiny_models import build_text_model

from pipeq.core.celery_config import make_celery
from pipeq.core.contract import Route
from pipeq.ops.embedded import free_port
from pipeq.worker.broker.transport import REPLY_TTL_MS

TASK = "text-classification"
INSPECTS = ("ping", "stats", "active", "reserved", "active_queues", "registered", "conf",
            "revoked", "scheduled", "report", "clock")
#: Job records of this module's deployment expire after this long (the leak check waits).
RESULT_TTL_S = 3


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
           ) -> Iterator[tuple[Deployment, WorkerProcess, str]]:
    dep = Deployment(redis_url, tmp_path_factory.mktemp("celery-tools"),
                     result_ttl_s=RESULT_TTL_S)
    model = str(build_text_model(TASK, models_dir))
    worker = dep.start_worker(TASK, model, "--hostname", hostname(dep))
    yield dep, worker, model
    dep.close()


def hostname(dep: Deployment) -> str:
    """The Celery hostname of the module's worker."""
    return f"tools.{dep.prefix}@localhost"


def celery(dep: Deployment, *args: str, cwd: Path, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    """``celery -A pipeq ARGS`` on this deployment, run outside the source tree."""
    return subprocess.run([sys.executable, "-m", "celery", "-A", "pipeq", *args],
                          env=dep.env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", INSPECTS)
def test_every_celery_inspect_command_answers(served: tuple[Deployment, WorkerProcess, str],
                                              command: str, tmp_path: Path) -> None:
    dep, _worker, _model = served
    # --destination: the command returns as soon as that worker answered.
    done = celery(dep, "inspect", command, "--timeout", "20", "--json", "--destination",
                  hostname(dep), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (answers,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    reply = answers[hostname(dep)]
    assert not (isinstance(reply, dict) and "error" in reply), reply
    if command == "stats":
        assert reply["broker"]["transport"] == "pipeq" and reply["pool"]
    if command == "active_queues":
        route = dep.settings.keys.queue_for
        served_route = Route(task=TASK, model=_model)
        assert {q["name"] for q in reply} == {route(served_route, "interactive"),
                                             route(served_route, "bulk")}
    assert "EncodeError" not in done.stderr + _worker.log()


def test_celery_events_sees_pipeq_jobs(served: tuple[Deployment, WorkerProcess, str],
                                       tmp_path: Path) -> None:
    dep, _worker, model = served
    out = tmp_path / "events.txt"
    with open(out, "wb") as sink:
        events = subprocess.Popen([sys.executable, "-m", "celery", "-A", "pipeq", "events",
                                   "--dump"], env=dep.env(), cwd=tmp_path, stdout=sink,
                                  stderr=subprocess.STDOUT)
    try:
        time.sleep(3)  # until the event receiver listens
        job = dep.remote(TASK, model).submit("an event to see")
        assert job.result(60)
        deadline = time.monotonic() + 20
        while job.id not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        events.terminate()
        events.wait(10)
    # pipeq sends one event per job, as it ends (evdump names the task from its fields).
    (line,) = [ln for ln in out.read_text().splitlines() if f"root_id={job.id}" in ln]
    assert "task succeeded:" in line and "pipeq_state=SUCCESS" in line, line
    assert f"name=pipeq.run[{Route(task=TASK, model=model).id}]" in line, line


def test_stock_celery_flower_finds_the_deployment(served: tuple[Deployment, WorkerProcess, str],
                                                  tmp_path: Path) -> None:
    dep, _worker, _model = served
    port = free_port()
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "pipeq", "flower", f"--port={port}",
             "--address=127.0.0.1", "--basic-auth=ops:pw"],
            env=dep.env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    request = urllib.request.Request(url + "/api/workers?refresh=1")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"ops:pw").decode())
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=20) as response:
                    workers = json.loads(response.read())
                if hostname(dep) in workers or time.monotonic() > deadline:
                    break
            except OSError:
                if flower.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(log.read_text()) from None
            time.sleep(0.5)
    finally:
        flower.terminate()
        flower.wait(15)
    assert hostname(dep) in workers, log.read_text()[-3000:]
    assert workers[hostname(dep)]["stats"]["broker"]["transport"] == "pipeq"


# Last in the module: it stops the module's worker.
def test_keys_go_back_to_the_permanent_set_after_50_inspects_and_500_jobs(
        served: tuple[Deployment, WorkerProcess, str], tmp_path: Path) -> None:
    dep, worker, model = served
    keys = dep.settings.keys
    route = Route(task=TASK, model=model)
    # A client that stops listening before the worker answers (killed, or timed out): its
    # reply queue's key expires.
    app = make_celery(dep.settings)
    with app.connection_for_write() as connection:
        mailbox = app.control.mailbox(connection)
        channel = connection.default_channel
        mailbox.get_reply_queue()(channel).declare()
        mailbox._publish("stats", {}, destination=[hostname(dep)], reply_ticket="late",
                         channel=channel)
        reply_key = f"{keys.broker_prefix}{mailbox.oid}.reply.celery.pidbox"
        deadline = time.monotonic() + 20
        while not dep.redis.exists(reply_key) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 0 < dep.redis.pttl(reply_key) <= REPLY_TTL_MS, dep.keys()
    app.close()
    # 45 inspects from one client (as Flower makes them), 5 from `celery inspect` processes.
    control = make_celery(dep.settings).control
    for i in range(45):
        inspect = control.inspect(timeout=20, destination=[hostname(dep)])
        assert getattr(inspect, INSPECTS[i % len(INSPECTS)])(), INSPECTS[i % len(INSPECTS)]
    control.app.close()
    for command in INSPECTS[:5]:
        assert celery(dep, "inspect", command, "--timeout", "20", "--destination",
                      hostname(dep), cwd=tmp_path).returncode == 0
    remote = dep.remote(TASK, model)
    jobs = [remote.submit(f"job number {i}") for i in range(500)]
    assert all(job.result(120) for job in jobs)

    permanent = keys.permanent([route])
    # While the worker lives, every key outside the permanent set expires. Acknowledgements
    # follow the stored records (kombu's unacked hash empties a moment after the last
    # result is read): give them a few seconds.
    def lasting() -> list[str]:
        return sorted(k for k in set(dep.keys()) - permanent
                      if dep.redis.ttl(k) <= 0 and dep.redis.exists(k))

    deadline = time.monotonic() + 10
    while (lingering := lasting()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lingering, lingering
    worker.stop()
    deadline = time.monotonic() + max(RESULT_TTL_S, REPLY_TTL_MS / 1000) + 5
    while not (left := set(dep.keys())) <= permanent and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left <= permanent, sorted(left - permanent)
    assert {keys.routes(), keys.route_stats(route)} <= left
