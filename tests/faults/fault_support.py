"""Helpers of the fault-injection tests: reading job records as Redis holds them, waiting,
crafting raw queue items, and the local truth.

Everything here reads what a user or an operator could see: job records
(``<prefix>:job:<id>``: state, starts, worker), the route's stats hash, queue lists, the
dead-letter list.
"""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import transformers
from conftest import Deployment, WorkerProcess
from tiny_models import CORPUS, build_text_model

from pipeq import RemotePipeline
from pipeq.core.contract import Route
from pipeq.core.deadletters import DeadLetter, DeadLetters
from pipeq.core.store import JOBS_IN_STATE

TASK = "text-classification"
#: Address space (prlimit --as) of the workers that take hostile input: ~2x what a tiny-model
#: worker maps at its peak in those tests (2.8 GB with six 36 Mpx images in hand), far below
#: what one unbounded probe of issue #19 took (8.5-24 GB): a miss fails the test with a
#: MemoryError instead of taking the machine.
HOSTILE_CAP_MB = 5120


# Module fixtures of the fault modules that serve TASK on a ``dep`` deployment of their own
# (imported by name: a tests/faults/conftest.py would shadow the shared conftest module).
@pytest.fixture(scope="module")
def model(models_dir: Path) -> str:
    """The tiny text-classification model."""
    return str(build_text_model(TASK, models_dir))


@pytest.fixture(scope="module")
def local(model: str) -> Any:
    """The local truth: transformers.pipeline() on the same model."""
    return transformers.pipeline(TASK, model=model)


@pytest.fixture(scope="module")
def remote(dep: Deployment, model: str) -> RemotePipeline:
    """The route's remote pipeline on the module's ``dep`` (one producer for the module)."""
    return dep.remote(TASK, model)


def texts(count: int, tag: str = "") -> list[str]:
    """``count`` different inputs (different scores), built from the tiny models' corpus."""
    return [f"{CORPUS[i % len(CORPUS)]} {tag}{i}" for i in range(count)]


def copy_model(path: Path, root: Path, name: str) -> str:
    """A copy of a model directory: the same model under another route (own queue, worker)."""
    target = root / name
    if not target.exists():
        shutil.copytree(path, target)
    return str(target)


def fields(dep: Deployment, job_ids: Sequence[str], *names: str) -> list[list[str | None]]:
    """The given fields of each job's record, in one round trip (None where unset)."""
    pipe = dep.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(dep.settings.keys.result(job_id), *names)
    return [[v.decode() if v is not None else None for v in row] for row in pipe.execute()]


def states(dep: Deployment, job_ids: Sequence[str]) -> list[str]:
    """Each job's state as stored; PENDING where no worker has touched it yet."""
    return [row[0] or "PENDING" for row in fields(dep, job_ids, "state")]


def starts(dep: Deployment, job_ids: Sequence[str]) -> list[int]:
    """How many times each job was started by a worker (``HGET <prefix>:job:<id> starts``)."""
    return [int(row[0] or 0) for row in fields(dep, job_ids, "starts")]


def ran_on(dep: Deployment, job_ids: Sequence[str]) -> list[str | None]:
    """The hostname of the worker that last started each job."""
    return [row[0] for row in fields(dep, job_ids, "worker")]


def stored_count(dep: Deployment, route: Route, state: str = "SUCCESS") -> int:
    """How many final records of ``state`` the route's workers stored (the Lua script counts a
    record only when it writes it, so a result stored twice would count twice)."""
    raw = dep.redis.hget(dep.settings.keys.route_stats(route), JOBS_IN_STATE + state)
    return int(raw or 0)


def queue_length(dep: Deployment, route: Route) -> int:
    """Messages waiting in the route's queue list."""
    return int(dep.redis.llen(dep.settings.keys.lane_queue_key(route, "interactive")))


def unacked_count(dep: Deployment) -> int:
    """Messages delivered to a worker and not acknowledged (kombu's unacked hash)."""
    return int(dep.redis.hlen(dep.settings.keys.unacked()))


def whereabouts(dep: Deployment, route: Route, job_ids: Sequence[str]) -> dict[str, str]:
    """Where each unfinished job is: queued, held by a worker (unacked), or nowhere."""
    def job_id(raw: bytes) -> str:
        try:
            return str(json.loads(raw)["headers"]["id"])
        except (ValueError, KeyError, TypeError):
            return ""

    key = dep.settings.keys.lane_queue_key(route, "interactive")
    queued = {job_id(m) for m in dep.redis.lrange(key, 0, -1)}
    held = {job_id(json.dumps(json.loads(v)[0]).encode())
            for v in dep.redis.hvals(dep.settings.keys.unacked())}
    out = {}
    for job, state, count in zip(job_ids, states(dep, job_ids), starts(dep, job_ids),
                                 strict=True):
        place = "queued" if job in queued else "held (unacked)" if job in held else "nowhere"
        out[job] = f"{state}, started {count}x, message {place}"
    return out


def dead_letters(dep: Deployment) -> list[DeadLetter]:
    """The deployment's dead-letter list, oldest first."""
    return DeadLetters(dep.redis, dep.settings.keys).list()


def hostname_pid(worker: WorkerProcess) -> str:
    """The part of a worker's Celery hostname that names its process."""
    return f".{worker.pid}@"


def tally(values: Sequence[Any]) -> dict[Any, int]:
    """Counts of each value, for messages."""
    return dict(Counter(values))


def kombu_envelope(task_name: str, job_id: str, body: Any, queue: str, *,
                   content_type: str = "application/json", raw_body: str | None = None,
                   **headers: Any) -> dict[str, Any]:
    """A kombu message envelope as Celery's producer writes it into a Redis queue list.

    ``body`` is JSON-encoded and base64'd (Celery's ``[args, kwargs, embed]``), unless
    ``raw_body`` gives the base64 text itself; ``headers`` override Celery's task headers.
    """
    encoded = raw_body if raw_body is not None else base64.b64encode(
        json.dumps(body).encode()).decode()
    task_headers: dict[str, Any] = {
        "lang": "py", "task": task_name, "id": job_id, "root_id": job_id, "parent_id": None,
        "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
    }
    task_headers.update(headers)
    return {
        "body": encoded, "content-encoding": "utf-8", "content-type": content_type,
        "headers": task_headers,
        "properties": {
            "correlation_id": job_id, "reply_to": "", "delivery_mode": 2, "priority": 0,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """Print a two-column table (shown with ``pytest -s`` or ``-rP``)."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}")
    for case, outcome in rows:
        print(f"  {case:<{width}}  {outcome}")
