"""Flower as an operator sees it: ``pipeq flower`` behind basic auth, in headless Chromium.

A real Redis, a real worker (tiny text-classification model, with pipeq's fault hook armed:
``oom_marker`` fails a job, ``slow_marker`` makes one run past its deadline) and ``pipeq
flower`` with credentials; jobs go through the queue, then Chromium (Debian's ``chromium``)
renders the dashboard with the credentials, and the tests read the rendered DOM: the worker
is online with its stats, jobs of our route (task ``pipeq.run[<route id>]``) read SUCCESS,
FAILURE (failed, expired, timed out: with pipeq's error) or REVOKED (cancelled), and the
Broker page lists each route queue with its depth. Screenshots go to ``.artifacts/``
(``flower.png``: the task list; with ``PIPEQ_UPDATE_DOCS_SCREENSHOT=1`` also
``docs/flower.png``, the README's picture).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import ROOT, Deployment
from tiny_models import build_text_model

from pipeq.core.contract import Route
from pipeq.errors import JobExpired, JobFailed
from pipeq.ops.embedded import free_port
from pipeq.ops.exporter import read_route_stats

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
TASK = "text-classification"
#: Inputs the worker's fault hook acts on (pipeq.worker.ops.faults).
FAIL_MARKER, SLOW_MARKER = "BOOMFAIL", "SLOWPOKE"
FAULTS = f"oom_marker={FAIL_MARKER},slow_marker={SLOW_MARKER},slow_ms=4000"
#: A route no worker serves: its queued jobs must still show on the Broker page.
DOWN_MODEL = "/models/nobody-serves-this"
USER = "operator"
PASSWORD = "s3cret:with:colons"  # a ':' in the password must survive basic auth
ARTIFACTS = ROOT / ".artifacts"

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium missing: `apt-get install -y chromium` (make test does it as root)",
)


@dataclass
class FlowerSite:
    """A running ``pipeq flower`` with its deployment, route and served model."""

    dep: Deployment
    url: str
    route: Route
    model: str
    log: Path
    #: A job cancelled while queued, before the worker started.
    cancelled_id: str = ""
    #: The route's worker (a WorkerProcess).
    worker: Any = None

    def api(self, path: str, *, user: str = USER, password: str = PASSWORD) -> Any:
        """GET a Flower API path with basic auth; the decoded JSON."""
        request = urllib.request.Request(self.url + path)
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def browser_url(self, path: str) -> str:
        """The page's URL with the credentials in it, as an operator's bookmark would have."""
        return self.url.replace("://", f"://{quote(USER)}:{quote(PASSWORD, safe='')}@") + path


@pytest.fixture(scope="module")
def flower(module_deployment: Deployment, models_dir: Path) -> Iterator[FlowerSite]:
    dep = module_deployment
    model = str(build_text_model(TASK, models_dir))
    port = free_port()
    log = dep.workdir / "flower.log"
    env = dep.env(PIPEQ_FLOWER_USER=USER, PIPEQ_FLOWER_PASSWORD=PASSWORD)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipeq", "flower", "--port", str(port),
             "--address", "127.0.0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    site = FlowerSite(dep, f"http://127.0.0.1:{port}", Route(task=TASK, model=model), model, log)
    try:
        _wait_healthy(site, proc)
        queued = dep.remote(TASK, model).submit("cancel me", require_worker=False)
        assert queued.cancel() is True
        site.cancelled_id = queued.id
        site.worker = dep.start_worker(TASK, model, env={"PIPEQ_FAULTS": FAULTS})
        yield site
    finally:
        proc.terminate()
        proc.wait(15)


def _wait_healthy(site: FlowerSite, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pipeq flower exited {proc.returncode}:\n{site.log.read_text()}")
        try:
            with urllib.request.urlopen(site.url + "/healthcheck", timeout=2) as response:
                if response.read() == b"OK":
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"Flower not up after {timeout}s:\n{site.log.read_text()}")


def chromium(*args: str, tmp_path: Path) -> str:
    """Run headless Chromium once; its stdout."""
    profile = tmp_path / f"chromium-{time.monotonic_ns()}"
    result = subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def rendered_text(site: FlowerSite, path: str, tmp_path: Path) -> str:
    """The visible text of a dashboard page after its scripts ran (tables filled by XHR)."""
    dom = chromium("--virtual-time-budget=8000", "--dump-dom", site.browser_url(path),
                   tmp_path=tmp_path)
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def render_until(site: FlowerSite, path: str, tmp_path: Path, done: Callable[[str], bool],
                 tries: int = 8) -> str:
    """Render ``path`` until ``done(text)`` (a busy machine may need another look)."""
    text = ""
    for _ in range(tries):
        text = rendered_text(site, path, tmp_path)
        if done(text):
            break
        time.sleep(1)
    return text


def test_pipeq_flower_refuses_to_start_without_credentials(module_deployment: Deployment
                                                           ) -> None:
    result = module_deployment.cli("flower", "--port", str(free_port()))
    assert result.returncode == 2
    assert "PIPEQ_FLOWER_USER" in result.stderr and "--insecure" in result.stderr


def test_dashboard_and_api_need_the_credentials(flower: FlowerSite) -> None:
    for kwargs in ({"user": "", "password": ""}, {"password": "wrong"}):
        with pytest.raises(urllib.error.HTTPError) as denied:
            flower.api("/api/workers", **kwargs)
        assert denied.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as page:
        urllib.request.urlopen(flower.url + "/tasks", timeout=10)
    assert page.value.code == 401
    assert PASSWORD not in flower.log.read_text()
    # Flower's own /metrics is open (the README says so): it must stay on a private network.
    with urllib.request.urlopen(flower.url + "/metrics", timeout=10) as response:
        assert response.status == 200 and b"flower_" in response.read()


@needs_chromium
def test_dashboard_shows_the_worker_online_and_our_route_s_finished_job(
        flower: FlowerSite, tmp_path: Path) -> None:
    remote = flower.dep.remote(TASK, flower.model)
    job = remote.submit("the river bank was quiet")
    assert job.result(60)[0]["label"]
    task_name = flower.dep.settings.keys.task_name(flower.route)
    assert task_name == f"pipeq.run[{flower.route.id}]"
    hostname = json.loads(flower.dep.cli("status", "--json").stdout)[0]["workers"][0]["hostname"]

    # Flower learns about jobs from the workers' events: wait until it has this one.
    deadline = time.monotonic() + 30
    while True:
        tasks = flower.api("/api/tasks")
        if tasks.get(job.id, {}).get("state") == "SUCCESS" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert tasks[job.id]["name"] == task_name and tasks[job.id]["state"] == "SUCCESS"
    assert tasks[job.id]["worker"] == hostname

    # "Online" once the worker's heartbeat event has arrived; compared without spaces, as
    # the page breaks long worker names.
    online = hostname + "Online"
    workers_page = render_until(flower, "/workers", tmp_path,
                                lambda text: online in text.replace(" ", ""))
    assert online in workers_page.replace(" ", ""), workers_page[:2000]

    tasks_page = render_until(flower, "/tasks", tmp_path, lambda text: job.id in text)
    assert job.id in tasks_page, tasks_page[:2000]
    at = tasks_page.index(job.id)
    row = tasks_page[at - 200: at + 200].replace(" ", "")
    assert "SUCCESS" in row and task_name in row, row

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower.png"
    shot.unlink(missing_ok=True)
    chromium("--virtual-time-budget=8000", "--window-size=1600,560",
             f"--screenshot={shot}", flower.browser_url("/tasks"), tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("PIPEQ_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "flower.png")


@needs_chromium
def test_bulk_job_progress_shows_in_flower(flower: FlowerSite, tmp_path: Path) -> None:
    """Each chunk job of ``pipeq bulk`` carries the bulk id and how far the whole job was
    when it was sent: Flower's task list, searched for the bulk id, follows the job."""
    source = tmp_path / "reviews.txt"
    source.write_text("".join(f"review {i}: the food was great\n" for i in range(12)))
    bulk = flower.dep.cli("bulk", "--task", TASK, "--model", flower.model, "--input",
                          str(source), "--output", str(tmp_path / "out.jsonl"), "--id",
                          "reviews-flower", "--chunk-size", "4", "--max-in-flight", "1",
                          "--quiet")
    assert bulk.returncode == 0, bulk.stderr

    def chunk_jobs() -> dict[str, str]:
        return {str(t.get("kwargs")): job_id for job_id, t in flower.api("/api/tasks").items()
                if "reviews-flower" in str(t.get("kwargs")) and t.get("state") == "SUCCESS"}

    deadline = time.monotonic() + 30
    while len(chunk_jobs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.3)
    jobs = chunk_jobs()
    assert sorted(jobs) == [
        "bulk reviews-flower: 0/12 answered, 0 failed | chunk 0: 4 input(s) from #0",
        "bulk reviews-flower: 4/12 answered, 0 failed | chunk 1: 4 input(s) from #4",
        "bulk reviews-flower: 8/12 answered, 0 failed | chunk 2: 4 input(s) from #8",
    ]
    # The task page an operator opens from the list shows it too.
    last = jobs["bulk reviews-flower: 8/12 answered, 0 failed | chunk 2: 4 input(s) from #8"]
    page = render_until(flower, f"/task/{last}", tmp_path,
                        lambda text: "8/12 answered" in text)
    assert "bulk reviews-flower: 8/12 answered, 0 failed | chunk 2" in page, page[:2000]


def tasks_in_state(site: FlowerSite, wanted: dict[str, str], timeout: float = 30
                   ) -> dict[str, Any]:
    """Flower's tasks once each job id of ``wanted`` reads its state there."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = site.api("/api/tasks")
        if all(tasks.get(j, {}).get("state") == s for j, s in wanted.items()):
            return dict(tasks)
        if time.monotonic() > deadline:
            return dict(tasks)
        time.sleep(0.3)


@needs_chromium
def test_failed_expired_timed_out_and_cancelled_jobs_read_as_flower_states(
        flower: FlowerSite, tmp_path: Path) -> None:
    remote = flower.dep.remote(TASK, flower.model)
    ok = remote.submit("a fine sentence")
    assert ok.result(60)
    failed = remote.submit(f"{FAIL_MARKER} breaks the model")
    with pytest.raises(JobFailed) as failure:
        failed.result(60)
    # Frozen, the worker cannot start the job before its deadline (a deadline of 1 ms alone
    # was sometimes met: the job started within it and succeeded).
    flower.worker.proc.send_signal(signal.SIGSTOP)
    try:
        expired = remote.submit("too late", timeout=0.2)
        time.sleep(0.5)
    finally:
        flower.worker.proc.send_signal(signal.SIGCONT)
    with pytest.raises(JobExpired):
        expired.result(30)
    slow = remote.submit(f"{SLOW_MARKER} runs past its deadline", timeout=1.0)
    with pytest.raises(JobFailed) as timed_out:
        slow.result(30)
    assert timed_out.value.error_type == "JobTimeout"
    wanted = {ok.id: "SUCCESS", failed.id: "FAILURE", expired.id: "FAILURE",
              slow.id: "FAILURE", flower.cancelled_id: "REVOKED"}
    tasks = tasks_in_state(flower, wanted)
    assert {j: tasks.get(j, {}).get("state") for j in wanted} == wanted
    task_name = flower.dep.settings.keys.task_name(flower.route)
    assert all(tasks[j]["name"] == task_name for j in wanted)
    # The exception Flower shows is pipeq's error: its type and message.
    error = failure.value
    assert tasks[failed.id]["exception"] == f"{error.error_type}({error.remote_message!r})"
    assert tasks[expired.id]["exception"].startswith("JobExpired(")
    assert tasks[slow.id]["exception"].startswith("JobTimeout(")

    page = render_until(flower, "/tasks", tmp_path,
                        lambda text: all(j in text for j in wanted))
    for job_id, state in wanted.items():
        at = page.index(job_id)
        assert state in page[at - 200: at + 300], (state, page[at - 200: at + 300])
    # Each failure's own page shows pipeq's error.
    for job_id, kind in ((failed.id, error.error_type), (expired.id, "JobExpired"),
                         (slow.id, "JobTimeout")):
        task_page = render_until(flower, f"/task/{job_id}", tmp_path,
                                 lambda text, kind=kind: kind in text)
        assert kind in task_page and "FAILURE" in task_page, task_page[:2000]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "flower-states.png"
    chromium("--virtual-time-budget=8000", "--window-size=1600,700",
             f"--screenshot={shot}", flower.browser_url("/tasks"), tmp_path=tmp_path)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Flower's Failed count is pipeq's failed + expired + timed-out count (FAILURE and
    # EXPIRED records), and its Succeeded count pipeq's successes, for the same jobs.
    stats = read_route_stats(flower.dep.redis, flower.dep.settings.keys, flower.route)
    states = [t["state"] for t in flower.api("/api/tasks").values()
              if t.get("name") == task_name]
    pipeq_failed = stats.get("jobs:FAILURE", 0) + stats.get("jobs:EXPIRED", 0)
    assert states.count("FAILURE") == pipeq_failed >= 3
    (worker,) = flower.api("/workers?json=1")["data"]
    assert worker.get("task-failed") == pipeq_failed, worker
    assert states.count("SUCCESS") == stats.get("jobs:SUCCESS")


@needs_chromium
def test_worker_page_shows_the_worker_s_stats(flower: FlowerSite, tmp_path: Path) -> None:
    hostname = json.loads(flower.dep.cli("status", "--json").stdout)[0]["workers"][0]["hostname"]
    page = render_until(flower, f"/worker/{quote(hostname)}", tmp_path,
                        lambda text: "Prefetch Count" in text)
    assert "Unable to get stats" not in page
    assert "Prefetch Count" in page and "Worker pool options" in page, page[:2000]
    assert flower.dep.keys().count(flower.dep.settings.keys.routes()) == 1


@needs_chromium
def test_broker_page_lists_every_route_queue_with_its_depth(flower: FlowerSite,
                                                            tmp_path: Path) -> None:
    keys = flower.dep.settings.keys
    down = Route(task=TASK, model=DOWN_MODEL)
    waiting = flower.dep.remote(TASK, DOWN_MODEL)
    for text in ("nobody", "serves", "these"):
        waiting.submit(text, require_worker=False)
    expected = {keys.queue_for(down, "interactive"): 3, keys.queue_for(down, "bulk"): 0,
                keys.queue_for(flower.route, "interactive"): 0,
                keys.queue_for(flower.route, "bulk"): 0}
    page = render_until(flower, "/broker", tmp_path,
                        lambda text: all(q in text for q in expected))
    words = page.split()
    for queue, depth in expected.items():
        assert queue in words, page[:3000]
        # Columns: Queue, Messages, Unacked, Ready, Consumers, Idle since.
        assert words[words.index(queue) + 1] == str(depth), page[:3000]
    ARTIFACTS.mkdir(exist_ok=True)
    chromium("--virtual-time-budget=8000", "--window-size=1600,560",
             f"--screenshot={ARTIFACTS / 'flower-broker.png'}", flower.browser_url("/broker"),
             tmp_path=tmp_path)
