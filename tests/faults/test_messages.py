"""Bad messages and bad input, against real Redis and one real worker (no injected faults).

- Poison messages pushed straight into the route's queue list end up in the dead-letter
  list (or as a FAILURE record when they name a job), the worker serving on; ``pipeq dead``
  lists, re-queues (requests only) and drops them.
- A corpus of bad input: calls the producer refuses, messages that bypass the producer and
  reach the worker, and raw queue items. Each gets a clear error at the producer or a clean
  FAILURE (or a dead letter) at the worker; the worker neither crashes nor stalls.
- Idempotency keys: submitting twice runs once.

The worker runs under ``prlimit --as`` (``HOSTILE_CAP_MB``): a bad input that escaped its
bounds would fail the test with a MemoryError instead of exhausting the machine.
"""

from __future__ import annotations

import base64
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import transformers
from compare import assert_same
from conftest import Deployment, wait_until
from corpus import Served, producer_cases, raw_items, worker_cases
from fault_support import (
    HOSTILE_CAP_MB,
    TASK,
    dead_letters,
    kombu_envelope,
    print_table,
    queue_length,
    starts,
    stored_count,
    unacked_count,
)
from tiny_models import build_text_model

from pipeq import Job
from pipeq.core.celery_config import make_celery
from pipeq.core.contract import new_job_id
from pipeq.core.deadletters import MAX_RAW_BYTES, DeadLetters
from pipeq.errors import JobFailed


@pytest.fixture(scope="module")
def served(redis_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    """The route's worker; before it starts, one idempotency key is submitted twice."""
    dep = Deployment(redis_url, tmp_path_factory.mktemp("messages"))
    model = str(build_text_model(TASK, models_dir))
    remote = dep.remote(TASK, model)
    first = remote.submit("submitted twice", require_worker=False, idempotency_key="order-1")
    again = remote.submit("submitted twice", require_worker=False, idempotency_key="order-1")
    length = queue_length(dep, remote.route)
    worker = dep.start_worker(TASK, model, address_space_mb=HOSTILE_CAP_MB)
    yield Served(dep, model, remote, worker, transformers.pipeline(TASK, model=model),
                 (first.id, again.id), length)
    dep.close()


def newest_dead_reason(served: Served, count_before: int) -> str:
    """Wait for one more dead letter; its reason."""
    wait_until(lambda: len(dead_letters(served.dep)) > count_before, 10, "a dead letter")
    return dead_letters(served.dep)[-1].reason


# --- poison messages ----------------------------------------------------------------------


def test_poison_messages_go_to_the_dead_letter_list(served: Served) -> None:
    DeadLetters(served.dep.redis, served.dep.settings.keys).purge()  # this test counts them
    other_id, pickle_id = new_job_id(), new_job_id()
    poison: list[tuple[str, bytes | dict[str, Any], str]] = [
        ("not JSON", b"this is not JSON {", "queue item is not JSON"),
        ("JSON, not a kombu message", {"job": "run this", "inputs": ["hi"]},
         "queue item is not a kombu message (no properties.delivery_tag)"),
        ("pickle content type", kombu_envelope(
            served.task_name, pickle_id, None, served.queue,
            content_type="application/x-python-serialize",
            raw_body=base64.b64encode(pickle.dumps({"request": "rm -rf /"})).decode()),
         "Refusing to deserialize untrusted content of type pickle"),
    ]
    for name, item, reason in poison:
        before = len(dead_letters(served.dep))
        served.push(item)
        assert reason in newest_dead_reason(served, before), name
        served.good_job(f"good job after: {name}")
    (pickled,) = [e for e in dead_letters(served.dep) if e.job_id == pickle_id]
    assert pickled.raw is not None and pickled.request is None

    # A task of another route: Celery would drop it; pipeq records a FAILURE for its job.
    body = served.request(job_id=served.known(other_id))
    served.push(kombu_envelope("pipeq.run[some-other-route]", other_id,
                               [[], {"request": body}, {}], served.queue))
    with pytest.raises(JobFailed) as info:
        Job(served.remote.client, other_id).result(timeout=30)
    assert info.value.error_type == "ValidationError"
    assert "no route 'pipeq.run[some-other-route]' on this queue" in info.value.remote_message
    served.good_job("good job after: a task of another route")
    assert served.worker.proc.poll() is None

    entries = dead_letters(served.dep)
    assert len(entries) == 3
    listing = served.dep.cli("dead", "list")
    assert listing.returncode == 0, listing.stderr
    for entry in entries:
        assert entry.id in listing.stdout and entry.reason.splitlines()[0] in listing.stdout
    assert f"job={pickle_id}" in listing.stdout
    assert "3 dead letter(s)" in listing.stdout

    raw_only = served.dep.cli("dead", "requeue", entries[0].id)
    assert raw_only.returncode == 1
    assert "is not a pipeq request" in raw_only.stdout and "can only be dropped" in raw_only.stdout
    assert served.dep.cli("dead", "requeue", "no-such-id").returncode == 1
    dropped = served.dep.cli("dead", "drop", entries[0].id)
    assert dropped.returncode == 0 and f"dropped dead letter {entries[0].id}" in dropped.stdout
    assert [e.id for e in dead_letters(served.dep)] == [e.id for e in entries[1:]]
    purged = served.dep.cli("dead", "purge")
    assert purged.returncode == 0 and "dropped 2 dead letter(s)" in purged.stdout
    assert "0 dead letter(s)" in served.dep.cli("dead", "list").stdout


def test_bad_input_corpus(served: Served) -> None:
    table: list[tuple[str, str]] = []
    client = served.remote.client
    # The fixture's early job (queued before the worker started) must not land mid-count.
    served.remote.job(served.early_ids[0]).result(timeout=60)
    jobs_before = served.dep.keys(":job:*")
    length_before = queue_length(served.dep, served.remote.route)

    wrong = []
    for name, call, error, shown in producer_cases(served):
        try:
            call()
            outcome: BaseException | None = None
        except Exception as exc:
            outcome = exc
        if not isinstance(outcome, error) or shown not in str(outcome):
            wrong.append(f"{name}: expected {error.__name__} with {shown!r}, got {outcome!r}")
        table.append((f"producer: {name}", f"{type(outcome).__name__}: {str(outcome)[:90]}"))
    assert not wrong, "\n".join(wrong)
    producer_count = len(table)
    # Nothing the producer refused reached Redis.
    assert served.dep.keys(":job:*") == jobs_before
    assert queue_length(served.dep, served.remote.route) == length_before

    celery = make_celery(served.dep.settings)  # a plain Celery client: no producer checks
    sent = []
    for name, message, error_type, shown in worker_cases(served):
        body = message.get("kwargs", {}).get("request")
        task_id = message.pop("task_id", None) or (
            body["job_id"] if isinstance(body, dict) and "job_id" in body else new_job_id())
        served.known(task_id)
        celery.send_task(served.task_name, task_id=task_id, queue=served.queue, **message)
        sent.append((name, Job(client, task_id), error_type, shown))
    for name, job, error_type, shown in sent:
        try:
            job.result(timeout=30)
            failed: BaseException | None = None
        except Exception as exc:
            failed = exc
        if not (isinstance(failed, JobFailed) and failed.error_type == error_type
                and shown in failed.remote_message and job.status() == "FAILURE"):
            wrong.append(f"{name}: expected FAILURE {error_type} with {shown!r}, "
                         f"got {failed!r}")
        shown_as = (f"FAILURE {failed.error_type}: {failed.remote_message[:90]}"
                    if isinstance(failed, JobFailed) else repr(failed))
        table.append((f"worker: {name}", shown_as))
    assert not wrong, "\n".join(wrong)

    for name, item, reason in raw_items(served):
        before = len(dead_letters(served.dep))
        served.push(item)
        got = newest_dead_reason(served, before)
        if reason not in got:
            wrong.append(f"{name}: expected a dead letter with {reason!r}, got {got!r}")
        table.append((name, f"dead letter: {got[:90]}"))
    assert not wrong, "\n".join(wrong)
    assert queue_length(served.dep, served.remote.route) == 0
    # The 1 MB of garbage is kept in part only: a flood of it cannot fill Redis.
    kept = [len(base64.b64decode(e.raw)) for e in dead_letters(served.dep) if e.raw]
    assert max(kept) == MAX_RAW_BYTES

    print_table(f"bad-input corpus: {len(table)} cases ({producer_count} refused by the "
                f"producer, {len(table) - producer_count} reached the worker)", table)
    assert len(table) >= 40
    assert served.worker.proc.poll() is None
    served.good_job("a good job after the whole corpus")
    assert "Unrecoverable error" not in served.worker.log()
    assert "MemoryError" not in served.worker.log()
    # No message is left recorded as held: a dead letter's record would be restored (and
    # dead-lettered again) after every visibility timeout.
    wait_until(lambda: unacked_count(served.dep) == 0, 10, "the unacked records to clear")


# --- idempotency ---------------------------------------------------------------------------


def test_same_idempotency_key_runs_once(served: Served) -> None:
    first, again = served.early_ids
    assert first == again
    assert served.early_queue_length == 1  # the second submission enqueued nothing
    job = served.remote.job(first)
    assert_same(job.result(timeout=30), served.local("submitted twice"))
    assert starts(served.dep, [first]) == [1]

    # Once done, the key still names the same job: its result, nothing enqueued.
    stored = stored_count(served.dep, served.remote.route)
    later = served.remote.submit("submitted twice", idempotency_key="order-1")
    assert later.id == first and later.status() == "SUCCESS"
    assert queue_length(served.dep, served.remote.route) == 0

    # Sixteen threads racing with one new key: one job, run once.
    with ThreadPoolExecutor(16) as pool:
        ids = set(pool.map(lambda _: served.remote.submit(
            "raced", idempotency_key="order-2").id, range(16)))
    assert len(ids) == 1
    (raced,) = ids
    assert_same(served.remote.job(raced).result(timeout=30), served.local("raced"))
    wait_until(lambda: stored_count(served.dep, served.remote.route) == stored + 1, 10,
               "the raced job's record")
    time.sleep(0.5)  # a second execution, if any, would be stored (and counted) by now
    assert stored_count(served.dep, served.remote.route) == stored + 1
    assert starts(served.dep, [raced]) == [1]


def test_celery_builtin_tasks_are_dead_lettered_not_run(served: Served) -> None:
    """Every Celery app registers tasks such as celery.accumulate; a forged message naming
    one must not run code pipeq never meant to run."""
    before = len(dead_letters(served.dep))
    job_id = new_job_id()
    make_celery(served.dep.settings).send_task("celery.accumulate", args=(1, 2),
                                               task_id=job_id, queue=served.queue)
    reason = newest_dead_reason(served, before)
    assert "task 'celery.accumulate' is not served by pipeq workers" in reason
    wait_until(lambda: queue_length(served.dep, served.remote.route) == 0, 10,
               "the forged message to leave the queue")
    assert unacked_count(served.dep) == 0
    served.good_job("a good job after a forged built-in task")


def test_a_forged_reply_to_never_touches_other_jobs(served: Served) -> None:
    """Issue #19: a forged message whose reply_to named a key of another type made the
    finishing script fail with WRONGTYPE, and the records of its whole batch were skipped."""
    keys = served.dep.settings.keys
    hash_like_reply = keys.reply("0" * 32)  # the form of a reply list, but a hash
    served.dep.redis.hset(hash_like_reply, "mine", "yes")
    other_record = keys.result(new_job_id())
    served.dep.redis.hset(other_record, "state", "SUCCESS")
    celery = make_celery(served.dep.settings)
    forged = []
    for target in (hash_like_reply, other_record, "elsewhere:list", keys.unacked()):
        body = served.request(reply_to=target)
        served.known(body["job_id"])
        celery.send_task(served.task_name, task_id=body["job_id"], queue=served.queue,
                         kwargs={"request": body})
        forged.append(Job(served.remote.client, body["job_id"]))
    legit = [served.remote.submit(f"legit {i}") for i in range(24)]
    for i, job in enumerate(legit):
        assert_same(job.result(timeout=60), served.local(f"legit {i}"))
    for job in forged:  # each ran as a job of its own; its bad field touched nothing
        job.result(timeout=60)
    assert served.dep.redis.type(hash_like_reply) == b"hash"
    assert served.dep.redis.hgetall(other_record) == {b"state": b"SUCCESS"}
    assert served.dep.redis.type("elsewhere:list") == b"none"
    assert served.worker.proc.poll() is None
