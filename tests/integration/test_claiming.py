"""The worker's atomic claim (pipeq.worker.broker.claiming) against a real Redis and kombu."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from pipeq.core.contract import JobRequest, JobState, Route
from pipeq.core.publish import task_message
from pipeq.worker.broker.claiming import (
    CLAIM_SCRIPT,
    CLAIM_START_PROPERTY,
    ClaimStart,
    unsupported_redis,
)
from pipeq.worker.broker.strategy import claim_start
from pipeq.worker.broker.transport import PREFIX_OPTION, Transport


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"pipeq-claim-test-{uuid.uuid4().hex[:8]}:"
    yield name
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=name + "*"):
        client.delete(key)


@pytest.fixture
def connection(redis_url: str, prefix: str) -> Iterator[Connection]:
    """A kombu connection through pipeq's worker transport, visibility timeout 0."""
    conn = Connection(redis_url, transport=Transport, transport_options={
        "global_keyprefix": prefix, "visibility_timeout": 0, "priority_steps": [0],
        PREFIX_OPTION: prefix.removesuffix(":")})
    yield conn
    conn.release()


def publish(conn: Connection, *bodies: str) -> None:
    queue = Queue("jobs", Exchange("jobs", type="direct"), routing_key="jobs")
    producer = Producer(conn.default_channel, exchange=queue.exchange, routing_key="jobs")
    for body in bodies:
        producer.publish({"text": body}, declare=[queue], serializer="json")


def test_claim_records_the_message_as_kombu_would_and_kombu_restores_it(
        connection: Connection, prefix: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    publish(connection, "first", "second")
    client.lpush(prefix + "jobs.bell", "1")  # (pipeq's publisher rings it: test_publish.py)
    channel: Any = connection.default_channel

    claimed = channel._get("jobs")  # the oldest, taken and recorded in one step
    channel._get("jobs")
    assert not client.exists(prefix + "jobs.bell")  # the queue is empty: silenced
    assert client.llen(prefix + "jobs") == 0
    tag = claimed["properties"]["delivery_tag"]
    entry = json.loads(client.hget(prefix + "unacked", tag))
    assert entry == [claimed, "jobs", "jobs"]  # kombu's QoS.append format: [raw, EX, RK]
    claimed_at = client.zscore(prefix + "unacked_index", tag)
    assert claimed_at is not None and abs(claimed_at - time.time()) < 5

    # The worker "died" without acking: kombu's own restore puts the message back.
    channel.qos.restore_visible()
    assert client.hget(prefix + "unacked", tag) is None
    assert client.llen(prefix + "jobs") == 2
    restored = json.loads(client.lindex(prefix + "jobs", -1) or b"{}")
    assert restored["properties"]["delivery_tag"] == tag
    assert restored["headers"]["redelivered"] is True
    assert client.exists(prefix + "jobs.bell")  # the restore rang the doorbell


def test_claim_takes_queues_in_order_and_returns_non_messages_unrecorded(
        redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    a, b = prefix + "a", prefix + "b"
    bell = prefix + "bell"
    client.lpush(b, "not json", "second-oldest of b")
    client.lpush(bell, "1")
    keys = [prefix + "unacked", prefix + "unacked_index", bell, prefix + "owners",
            prefix + "held", a, b]

    got = client.eval(CLAIM_SCRIPT, 7, *keys, repr(time.time()), "1")
    # a is empty; b's oldest (right end) first; more=1 while b still holds a message
    assert got == [1, b.encode(), b"not json", 0, b""]
    assert client.hlen(prefix + "unacked") == 0  # nothing a restore could bring back
    assert client.exists(bell)  # b still holds a message: waiting workers must not block
    assert client.eval(CLAIM_SCRIPT, 7, *keys, "0", "1") == [0, b.encode(),
                                                             b"second-oldest of b", 0, b""]
    assert not client.exists(bell)  # the queues are empty: silenced
    assert client.eval(CLAIM_SCRIPT, 7, *keys, "0", "1") == [0]


def test_one_claim_takes_up_to_its_limit_across_queues(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    a, b = prefix + "a", prefix + "b"
    client.lpush(a, "a1", "a2")
    client.lpush(b, "b1")
    keys = [prefix + "unacked", prefix + "unacked_index", prefix + "bell", prefix + "owners",
            prefix + "held", a, b]
    got = client.eval(CLAIM_SCRIPT, 7, *keys, "0", "64")
    assert got == [0, a.encode(), b"a1", 0, b"", a.encode(), b"a2", 0, b"", b.encode(), b"b1", 0,
                   b""]
    client.lpush(a, "a3", "a4")
    assert client.eval(CLAIM_SCRIPT, 7, *keys, "0", "1") == [1, a.encode(), b"a3", 0, b""]


class FakeInfo:
    def __init__(self, version: str):
        self.version = version

    def info(self, section: str) -> dict[str, str]:
        return {"redis_version": self.version}


def test_old_redis_is_refused_with_the_reason(redis_url: str) -> None:
    assert unsupported_redis(redis.Redis.from_url(redis_url)) is None
    assert unsupported_redis(FakeInfo("7.2.4")) is None
    problem = unsupported_redis(FakeInfo("6.0.16"))
    assert problem is not None and "Redis 6.0.16 is too old" in problem and ">= 6.2" in problem


def test_a_rung_doorbell_sends_the_claim_before_the_loop_turns(
        connection: Connection, prefix: str, redis_url: str) -> None:
    """Reading the ring sends the claim at once; the loop's next turn must not send another
    (two commands in flight would desynchronise the replies: wrong or lost messages)."""
    client = redis.Redis.from_url(redis_url)
    queue = Queue("jobs", Exchange("jobs", type="direct"), routing_key="jobs")
    got: list[str] = []
    after_ring: list[str] = []
    channel: Any = connection.default_channel
    read = channel.handlers["BRPOP"]

    def traced_read(**options: Any) -> Any:
        rung = channel._pending == "BLMOVE"
        try:
            return read(**options)
        finally:
            if rung:
                after_ring.append(channel._pending)

    channel.handlers["BRPOP"] = traced_read
    with connection.Consumer(queue, accept=["json"],
                             callbacks=[lambda body, msg: (got.append(body["text"]),
                                                           msg.ack())]):
        for n in range(3):
            with pytest.raises(TimeoutError):  # nothing queued: the claim finds nothing,
                connection.drain_events(timeout=0.3)  # then the channel waits on the bell
            assert channel._pending == "BLMOVE"
            publish(connection, f"m{n}")
            client.lpush(prefix + "jobs.bell", "1")
            connection.drain_events(timeout=5)
            assert got == [f"m{i}" for i in range(n + 1)]
    assert after_ring == ["EVAL"] * 3
    assert client.llen(prefix + "jobs") == 0


def job_message(job_id: str, task: str, deadline: float | str | None = None) -> str:
    """A pipeq job message as the publisher writes it (only what the claim reads differs);
    ``deadline="absent"`` leaves out the pipeq_deadline header."""
    request = JobRequest(job_id=job_id, route=Route(task="text-classification", model="m"),
                         inputs=["hi"], single=True, submitted_at=time.time())
    message = json.loads(task_message(request, task, "q", "summary"))
    if deadline == "absent":
        del message["headers"]["pipeq_deadline"]
    else:
        message["headers"]["pipeq_deadline"] = deadline
    return json.dumps(message)


def test_an_idle_workers_claim_of_one_job_starts_it_unless_it_is_final_or_expired(
        redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    queue, task, records = prefix + "q", "pipeq.run[r]", prefix + "job:"
    keys = [prefix + "unacked", prefix + "unacked_index", prefix + "bell", prefix + "owners",
            prefix + "held", queue]
    now = time.time()
    start = [records, task, 60, "worker-a"]

    def claim(*items: str, wanted: int = 1, starting: list[Any] = start) -> list[Any]:
        client.lpush(queue, *items)
        return client.eval(CLAIM_SCRIPT, 6, *keys, repr(now), wanted, "", 1000, *starting)

    fresh, cancelled, expired = (uuid.uuid4().hex for _ in range(3))
    client.hset(records + fresh, "state", "PENDING")
    got = claim(job_message(fresh, task, now + 30))
    assert got[4] == b"PENDING:1"  # its started field: state before, starts
    record = client.hgetall(records + fresh)
    assert record[b"state"] == b"STARTED" and record[b"starts"] == b"1"
    assert record[b"worker"] == b"worker-a" and 0 < client.ttl(records + fresh) <= 60
    assert claim(job_message(fresh, task))[4] == b"STARTED:2"  # re-delivered: counted again

    client.hset(records + cancelled, "state", "CANCELLED")
    assert claim(job_message(cancelled, task))[4] == b"CANCELLED:0"
    assert client.hgetall(records + cancelled) == {b"state": b"CANCELLED"}  # untouched

    # Left to the batcher: an expired job (its record is never touched), a message without
    # the deadline header, another route's task, two messages at once, no start arguments.
    client.hset(records + expired, "state", "PENDING")
    assert claim(job_message(expired, task, now - 1))[4] == b""
    assert claim(job_message(expired, task, "absent"))[4] == b""
    assert claim(job_message(expired, "pipeq.run[other]"))[4] == b""
    both = claim(job_message(expired, task), job_message(expired, task), wanted=2)
    assert both[4] == b"" and both[8] == b""
    assert claim(job_message(expired, task), starting=[])[4] == b""
    assert client.hgetall(records + expired) == {b"state": b"PENDING"}


def test_a_claim_start_reaches_the_strategy_and_a_forged_one_does_not(
        connection: Connection, prefix: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    channel: Any = connection.default_channel
    task = "pipeq.run[r]"
    channel.claim_start = ClaimStart(prefix + "job:", task, 60, "worker-a")
    delivered: list[Any] = []
    channel.connection._deliver = lambda payload, queue: delivered.append(payload)
    job_id = uuid.uuid4().hex
    forged = json.loads(job_message(job_id, task, time.time() + 30))
    forged["properties"][CLAIM_START_PROPERTY] = "PENDING:1"
    client.lpush(prefix + "jobs", json.dumps(forged))

    reply = client.execute_command(*channel._claim_args(["jobs"], 1, start=False))
    channel._deliver_claimed(reply[1], reply[2], bool(reply[3]), reply[4].decode())
    assert CLAIM_START_PROPERTY not in delivered[-1]["properties"]  # the forged one is gone
    assert not client.exists(prefix + "job:" + job_id)

    client.lpush(prefix + "jobs", json.dumps(forged))
    assert channel.holds_nothing()
    reply = client.execute_command(*channel._claim_args(["jobs"], 1, start=True))
    channel._deliver_claimed(reply[1], reply[2], bool(reply[3]), reply[4].decode())

    class Message:
        properties = delivered[-1]["properties"]

    assert claim_start(Message()) == (JobState.PENDING, 1)
    assert client.hget(prefix + "job:" + job_id, "starts") == b"1"
