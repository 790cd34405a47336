"""Hand-over on lease expiry (pipeq.worker.broker.handover) against a real Redis and kombu.

Two holders, A and B, claim through pipeq's kombu transport as workers do; their leases are
renewed (or not) by the same HolderLease a worker runs. What a user relies on: a silent
holder's messages come back byte for byte, once, and only those it still held; a holder
that keeps renewing keeps its messages; a holder that comes back learns it was declared dead.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import wait_until
from kombu import Connection, Exchange, Producer, Queue

from pipeq.core.keys import Keys, bell_of
from pipeq.worker.broker.handover import HolderLease
from pipeq.worker.broker.transport import HOLDER_OPTION, PREFIX_OPTION, Transport

BEAT_S = 0.1  # lease: 3 beats


@pytest.fixture
def keys(redis_url: str) -> Iterator[Keys]:
    """A deployment prefix of this test's own; its keys are deleted afterwards."""
    keys = Keys(f"handover-{uuid.uuid4().hex[:8]}")
    yield keys
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=keys.prefix + "*"):
        client.delete(key)


def holder_connection(redis_url: str, keys: Keys, holder: str, visibility_s: int = 300
                      ) -> Connection:
    """A kombu connection through pipeq's transport whose claims are held by ``holder``."""
    return Connection(redis_url, transport=Transport, transport_options={
        "global_keyprefix": keys.broker_prefix, "visibility_timeout": visibility_s,
        "priority_steps": [0], PREFIX_OPTION: keys.prefix, HOLDER_OPTION: holder})


def publish(conn: Connection, *bodies: str) -> None:
    queue = Queue("jobs", Exchange("jobs", type="direct"), routing_key="jobs")
    producer = Producer(conn.default_channel, exchange=queue.exchange, routing_key="jobs")
    for body in bodies:
        producer.publish({"text": body}, declare=[queue], serializer="json")


def lease(redis_url: str, keys: Keys, holder: str) -> HolderLease:
    return HolderLease(redis.Redis.from_url(redis_url), keys, holder, BEAT_S, 300)


def test_an_expired_holders_messages_go_back_byte_for_byte_once(redis_url: str,
                                                                keys: Keys) -> None:
    client = redis.Redis.from_url(redis_url)
    queue = keys.broker_prefix + "jobs"
    a_conn = holder_connection(redis_url, keys, "A")
    publish(a_conn, "acked", "held")
    published = list(reversed(client.lrange(queue, 0, -1)))  # oldest first
    a, b = lease(redis_url, keys, "A"), lease(redis_url, keys, "B")
    a.renew()
    channel: Any = a_conn.default_channel
    first, second = channel._get("jobs"), channel._get("jobs")
    tags = [m["properties"]["delivery_tag"] for m in (first, second)]
    assert {client.hget(keys.owners(), t) for t in tags} == {b"A"}
    assert client.hlen(keys.held("A")) == 2
    # Never a key without an expiry (README, "Redis keys"), even before the next renewal.
    assert client.pttl(keys.owners()) > 0 and client.pttl(keys.held("A")) > 0
    channel.acks._remove([tags[0]])  # the first job finished and was acknowledged
    assert client.hlen(keys.held("A")) == 1 and client.hlen(keys.owners()) == 1

    b.renew()
    assert client.llen(queue) == 0  # A's lease runs: nothing is taken from it
    # B renews every beat, as a live worker does, until A's lease has lapsed.
    reaped = wait_until(lambda: b.renew(), 5, "A's lease to lapse", interval=BEAT_S)
    assert reaped == [("A", 1)]
    # Only the message A still held is back, exactly as published, and no longer unacked.
    assert client.lrange(queue, 0, -1) == [published[1]]
    assert client.hlen(keys.unacked()) == 0 and client.zcard(keys.unacked_index()) == 0
    assert not client.exists(keys.owners()) and not client.exists(keys.held("A"))
    assert client.zscore(keys.holders(), "A") is None
    assert client.exists(keys.broker_prefix + bell_of("jobs"))  # waiting workers wake up
    assert b.renew() == []  # once

    # A comes back: it learns that it was declared dead, and holds a lease again.
    assert a.declared_dead == 0
    a.renew()
    assert a.declared_dead == 1 and client.zscore(keys.holders(), "A") is not None
    assert not client.exists(keys.reaped("A"))
    a_conn.release()


def test_a_live_holder_keeps_its_messages_and_a_reclaimed_one_stays_with_its_new_holder(
        redis_url: str, keys: Keys) -> None:
    client = redis.Redis.from_url(redis_url)
    a_conn = holder_connection(redis_url, keys, "A", visibility_s=0)
    b_conn = holder_connection(redis_url, keys, "B")
    publish(a_conn, "one", "two")
    a, b = lease(redis_url, keys, "A"), lease(redis_url, keys, "B")
    a.start()  # renewed on its own thread, as in a worker
    try:
        a_channel: Any = a_conn.default_channel
        taken = a_channel._get("jobs")
        tag = taken["properties"]["delivery_tag"]
        for _ in range(10):  # ten beats: three times the lease
            assert b.renew() == []
            time.sleep(BEAT_S)
        assert client.hget(keys.owners(), tag) == b"A"
        # Visibility timeout 0: kombu's own restore takes it back, and B claims it.
        a_channel.qos.restore_visible(num=10)
        b_channel: Any = b_conn.default_channel
        again = b_channel._get("jobs")
        assert again["properties"]["delivery_tag"] == tag
        assert client.hget(keys.owners(), tag) == b"B"
    finally:
        a.stop(withdraw=False)
    # A falls silent: its hand-over gives back nothing of B's.
    reaped = wait_until(lambda: b.renew(), 5, "A's lease to expire")
    assert reaped == [("A", 0)]
    assert client.hget(keys.owners(), tag) == b"B"
    assert client.hexists(keys.unacked(), tag)
    entry = json.loads(client.hget(keys.unacked(), tag) or b"[]")
    assert entry[0]["properties"]["delivery_tag"] == tag
    a_conn.release()
    b_conn.release()


def test_a_drained_holder_withdraws_its_lease(redis_url: str, keys: Keys) -> None:
    client = redis.Redis.from_url(redis_url)
    a = lease(redis_url, keys, "A")
    a.start()
    assert client.zscore(keys.holders(), "A") is not None
    assert 0 < client.pttl(keys.holders()) <= a.keep_ms
    a.stop(withdraw=True)
    assert not client.exists(keys.holders())


def test_after_a_pause_of_redis_longer_than_a_lease_nobody_is_declared_dead(
        redis_url: str, keys: Keys) -> None:
    client = redis.Redis.from_url(redis_url)
    a, b = lease(redis_url, keys, "A"), lease(redis_url, keys, "B")
    a.renew()
    b.renew()
    time.sleep(a.lease_ms / 1000 + 0.05)  # as if Redis stalled (or failed over) that long
    # The first to renew was silent itself: it renews and hands nothing over ...
    assert b.renew() == []
    assert a.renew() == []
    # ... and a round later both are alive again.
    assert b.renew() == [] and a.renew() == []
    assert a.declared_dead == b.declared_dead == 0
    # A holder that really fell silent is still handed over.
    reaped = wait_until(lambda: b.renew(), 5, "A's lease to lapse", interval=BEAT_S)
    assert reaped == [("A", 0)]
    assert client.zscore(keys.holders(), "A") is None


def test_a_new_process_of_the_same_name_puts_back_what_the_dead_one_held(
        redis_url: str, keys: Keys) -> None:
    client = redis.Redis.from_url(redis_url)
    queue = keys.broker_prefix + "jobs"
    conn = holder_connection(redis_url, keys, "A")
    publish(conn, "held by the first life")
    published = client.lrange(queue, 0, -1)
    lease(redis_url, keys, "A").renew(fresh=True)
    channel: Any = conn.default_channel
    channel._get("jobs")
    # The process dies; one with the same hostname starts within the lease (nobody reaped).
    again = lease(redis_url, keys, "A")
    assert again.renew(fresh=True) == [("A", 1)]
    assert client.lrange(queue, 0, -1) == published
    assert client.hlen(keys.unacked()) == 0
    assert again.declared_dead == 0
    conn.release()
