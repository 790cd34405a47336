"""Flower as an operator sees it: ``pipeq flower`` behind basic auth, in headless Chromium.

A real Redis, a real worker (tiny text-classification model) and ``pipeq flower`` with
credentials; a job goes through the queue, then Chromium (Debian's ``chromium``) renders
the dashboard with the credentials, and the test reads the rendered DOM: the worker is
online and the job of our route (task ``pipeq.run[<route id>]``) succeeded. A screenshot
of the task list is saved as ``.artifacts/flower.png`` (with
``PIPEQ_UPDATE_DOCS_SCREENSHOT=1`` also as ``docs/flower.png``, the README's picture).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
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
from pipeq.ops.embedded import free_port

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
TASK = "text-classification"
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
        dep.start_worker(TASK, model)
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
