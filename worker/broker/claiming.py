"""Taking a message off a queue without a moment in which a killed worker loses it.

kombu's Redis transport pops a message with ``BRPOP`` and records it as unacknowledged in a
second command. A worker killed (or a connection cut) between the two loses the message: it
is in neither the queue nor the unacked hash, and no visibility timeout brings it back.

pipeq's channel never pops with a blocking command. It waits on the route's doorbell (a
list that exists while one of the route's queues may hold a message, rung by every publish:
pipeq.core.publish) with ``BLMOVE bell bell RIGHT RIGHT``, which blocks until it exists
and takes nothing, then *claims* the oldest items (as many as the prefetch limit allows)
with one Lua script that pops them and records them in kombu's unacked hash and index in the
same atomic step, in exactly the format kombu's own ``QoS.append`` writes, and says whether
the queues hold more (claim again at once) or not (wait on the doorbell). From that instant
a dead worker's message is restored after the visibility timeout like any other
unacknowledged message; the same step records which worker holds it, so that live workers
hand it over as soon as that worker's lease lapses (``pipeq.worker.broker.handover``).
A worker that holds no message also marks the one job it claims STARTED in that step (see
:class:`ClaimStart`): under light load each job's start then costs no round trip of its own.
Requires Redis >= 6.2 (BLMOVE).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from queue import Empty
from typing import TYPE_CHECKING, Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ResponseError

from pipeq.core.keys import Keys, bell_of
from pipeq.core.redis_io import is_redis_full, load_lua

log = logging.getLogger("pipeq.consumer")

#: Takes the oldest message of a route's queues and records it as unacknowledged, in one
#: atomic step (lua/claim.lua says how).
CLAIM_SCRIPT = load_lua("claim.lua", "pipeq.worker.broker")

#: The most messages one claim takes (bounded further by the prefetch limit's room).
MAX_CLAIM = 64
#: The oldest Redis with BLMOVE.
MIN_REDIS = (6, 2)
#: The message property that tells the route's strategy how the claim started the job
#: ('<state before>:<starts>'; absent when it did not). The channel sets or removes it on
#: every message it delivers, so that a message cannot bring its own.
CLAIM_START_PROPERTY = "pipeq_claim_start"


@dataclass(frozen=True, slots=True)
class ClaimStart:
    """What an idle worker's claim needs to mark the one job it takes STARTED (claim.lua).

    A worker holding no message runs the job it claims at once, so the claim records the
    start (as ``JobStore.start`` would, atomically with taking the message), and the batcher
    skips its own round trip for it. A busy worker leaves the start to the batcher, which
    marks jobs as their batch begins: a job counted as begun while it waits in a worker that
    then dies would count towards the poison limit without ever having run.
    """

    #: The job records' key prefix (``Keys.result("")``).
    record_prefix: str
    #: The route's Celery task name: only its messages are started.
    task_name: str
    #: The records' TTL (s), as JobStore's.
    ttl_s: int
    #: The worker the start is recorded for (its hostname).
    worker: str

    def args(self) -> list[Any]:
        """The claim script's arguments ARGV[5..8]."""
        return [self.record_prefix, self.task_name, self.ttl_s, self.worker]


def unsupported_redis(client: Any) -> str | None:
    """Why the Redis behind ``client`` cannot serve pipeq workers, or None if it can (or
    cannot be asked now: Celery then keeps retrying the connection)."""
    try:
        server = client.info("server")
        version = str(server.get("redis_version", ""))
    except Exception:  # unreachable now, or INFO refused (some managed services)
        return None
    mode = server.get("redis_mode")
    if mode == "sentinel":
        return ("PIPEQ_REDIS_URL names a Redis Sentinel, not a Redis server: give the sentinels "
                "and the master's name, sentinel://host1:26379,host2:26379,host3:26379/0"
                "?master=NAME")
    if mode == "cluster":
        return ("Redis Cluster is not supported: pipeq's and kombu's scripts and transactions "
                "touch several keys of one route at once (see the README, \"Redis high "
                "availability\"); use Sentinel, or one Redis per group of routes")
    try:
        found = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    if found >= MIN_REDIS:
        return None
    return (f"Redis {version} is too old for pipeq workers: they need Redis >= 6.2 (BLMOVE, to "
            "take messages off the queue without a moment in which a killed worker loses "
            "them); upgrade the broker")


class AckFlusher:
    """Removes acknowledged messages from kombu's unacked hash and index, many per round trip.

    kombu sends one MULTI(ZREM, HDEL) per acknowledged message. Here acks of a batch's
    jobs, which end together, share one. Deferring the
    removal is safe: until it happens a dead worker's acknowledged message could only be
    restored and delivered again, and a job whose record is final is not run again.
    """

    def __init__(self, channel: Any):
        self.channel = channel
        self._tags: list[str] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, delivery_tag: str) -> None:
        """Remove ``delivery_tag``'s unacked record soon."""
        with self._ready:
            self._tags.append(delivery_tag)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pipeq-acks",
                                                daemon=True)
                self._thread.start()
            self._ready.notify()

    def flush(self) -> None:
        """Remove every pending record now (at close)."""
        with self._ready:
            tags, self._tags = self._tags, []
        if tags:
            self._remove(tags)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._tags:
                    self._ready.wait()
                tags, self._tags = self._tags, []
            try:
                self._remove(tags)
            except Exception as exc:  # Redis away: keep them for the next round
                log.warning("could not acknowledge %d message(s) yet: %s", len(tags), exc)
                with self._ready:
                    self._tags[:0] = tags
                time.sleep(0.5)

    def _remove(self, tags: list[str]) -> None:
        channel = self.channel
        prefix = channel.global_keyprefix
        # Unconditionally, also where another worker claimed the message again after this
        # one's lease expired: an ack follows the job's final record, so the other copy
        # would find the job finished anyway (pipeq.worker.broker.handover).
        with channel.plain_client.pipeline() as pipe:
            pipe.zrem(prefix + channel.unacked_index_key, *tags)
            pipe.hdel(prefix + channel.unacked_key, *tags)
            if channel.holder:
                pipe.hdel(channel.keys.owners(), *tags)
                pipe.hdel(channel.keys.held(channel.holder), *tags)
            pipe.execute()


class ClaimedQoS(kombu_redis.QoS):
    """kombu's QoS, not writing the unacked record a claim wrote already, and removing
    acknowledged ones in batches (AckFlusher): two round trips and Redis clients a job."""

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag == self.channel.recorded_claim:
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self.channel.acks.add(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        """kombu's sweep for messages of dead workers; a full Redis (which refuses its
        mutex) skips a sweep instead of stopping the consumer."""
        try:
            return super().restore_visible(*args, **kwargs)
        except ResponseError as exc:
            if not is_redis_full(exc):
                raise
            log.warning("Redis is full: skipping the sweep for unacknowledged messages (%s)",
                        exc)
            return None


class ClaimingChannel:
    """Mixin for kombu's Redis ``Channel``: wait with BLMOVE, take with the claim script.

    It replaces the channel's ``BRPOP`` step in kombu's event loop with two alternating
    commands on the same connection: a claim (non-blocking; repeated while it finds work)
    and, once the queues are empty, a wait on their doorbell.
    """

    # Set by kombu's Channel; declared for the type checker.
    client: Any
    connection: Any
    global_keyprefix: str
    priority_steps: list[int]
    brpop_timeout: float
    sep: str
    unacked_key: str
    unacked_index_key: str
    active_queues: list[str]
    qos: Any
    _queue_cycle: Any
    _in_poll: Any
    _brpop_sent_at: Any
    connection_errors: tuple[type[BaseException], ...]

    #: pipeq's keys (the deployment's prefix) and an unprefixed client for them.
    keys: Keys
    plain_client: Any
    #: The holder claims are recorded under (the worker's hostname), "" for none: its lease
    #: lets live workers hand its messages over (pipeq.worker.broker.handover).
    holder: str = ""
    #: The delivery tag being delivered, when the claim wrote its unacked record (ClaimedQoS).
    recorded_claim: str | None = None
    #: Lets an idle worker's claim start the job it takes (None: the batcher starts jobs).
    claim_start: ClaimStart | None = None
    #: Removes the unacked records of acknowledged messages in batches.
    acks: AckFlusher
    #: The next command: claim (True) or wait (False).
    _claim_next = True
    #: Redis refused the last claim because it is full: wait a second before the next.
    _pause_next = False
    _pending: str = ""

    QoS = ClaimedQoS

    def __init__(self, *args: Any, **kwargs: Any):
        self.acks = AckFlusher(self)
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        """Remove the records of acknowledged messages, then close as kombu does."""
        try:
            self.acks.flush()
        except Exception:  # Redis away: they are restored later and not run again
            log.warning("could not remove the records of acknowledged messages at close",
                        exc_info=True)
        super().close()  # type: ignore[misc]

    if TYPE_CHECKING:  # kombu's Channel has these; a stub here would shadow them
        def _q_for_pri(self, queue: str, pri: int) -> str: ...
        def _flush_brpop_reauth(self) -> None: ...
        def _create_client(self, asynchronous: bool = False) -> Any: ...

    def on_claimed(self, item: bytes) -> None:
        """Called with every claimed item before it is delivered (fault injection)."""

    def _serving_keys(self, queues: list[str]) -> list[str]:
        return [self.global_keyprefix + self._q_for_pri(queue, pri)
                for pri in self.priority_steps for queue in queues]

    def _claim_args(self, queues: list[str], count: int = 1, start: bool = False
                    ) -> list[Any]:
        prefix = self.global_keyprefix
        keys = self._serving_keys(queues)
        starting = self.claim_start.args() if start and self.claim_start else []
        return ["EVAL", CLAIM_SCRIPT, 5 + len(keys), prefix + self.unacked_key,
                prefix + self.unacked_index_key, prefix + bell_of(queues[0]),
                self.keys.owners(), self.keys.held(self.holder), *keys,
                repr(time.time()), count, self.holder,
                int(max(float(getattr(self, "visibility_timeout", 3600)), 1.0) * 1000),
                *starting]

    def holds_nothing(self) -> bool:
        """True while no message delivered on this channel waits for its acknowledgement:
        a job this worker claims now runs at once (ClaimStart)."""
        qos = self.qos
        return len(qos._delivered) == len(qos._dirty)

    def _redis_full(self, exc: Exception) -> None:
        """A claim refused by a full Redis took nothing (the script records before it pops):
        pause, then claim again."""
        now = time.monotonic()
        if now - getattr(self, "_full_warned_at", 0.0) > 30:
            self._full_warned_at = now
            log.warning("Redis is full (maxmemory): no message can be claimed until it has "
                        "room (%s)", exc)
        self._pause_next = True

    def _claim_count(self) -> int:
        """How many messages one claim may take: what the prefetch limit leaves room for."""
        room = self.qos.can_consume_max_estimate()
        return max(1, min(MAX_CLAIM, room if room is not None else MAX_CLAIM))

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if self._pause_next:
            # A blocking read of a key that never exists: a pause that does not block the
            # event loop (BLMOVE, a write, would be refused by a full Redis too).
            command: list[Any] = ["BLPOP", self.global_keyprefix + "pipeq.pause", 1]
        elif self._claim_next:
            command = self._claim_args(queues, self._claim_count(), self.holds_nothing())
        else:
            # Until the doorbell rings, or one poll interval: a message queued without
            # ringing it (by a plain Celery client) is still served. The claim is not sent
            # along (Redis would run it as BLMOVE returns, a round trip less): a worker
            # frozen while it waits would then take a message it cannot run.
            wait = timeout if timeout is not None else self.brpop_timeout
            bell = self.global_keyprefix + bell_of(queues[0])
            command = ["BLMOVE", bell, bell, "RIGHT", "RIGHT", wait or 1]
        self._pending = str(command[0])
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                reply = self.client.parse_response(self.client.connection, self._pending,
                                                   **options)
            except ResponseError as exc:
                if "unknown command" in str(exc).lower() and self._pending == "BLMOVE":
                    raise RuntimeError("pipeq workers need Redis >= 6.2 (BLMOVE): "
                                       f"the broker says: {exc}") from exc
                if not is_redis_full(exc):
                    raise
                self._redis_full(exc)
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        if self._pending in ("BLMOVE", "BLPOP"):  # rung, paused, or a poll interval: look
            self._claim_next, self._pause_next = True, False
            if self._pending == "BLMOVE" and self.qos.can_consume():
                # The claim goes out now, not on the event loop's next turn: a turn less
                # for each lone request. Still sent by a worker that is running (it just
                # read the ring), so it never claims what a frozen worker would hold.
                self._brpop_start()
            raise Empty()
        # Claim again at once only while the queues hold more: else wait on the doorbell.
        self._claim_next = bool(reply and reply[0])
        claimed = [reply[i:i + 4] for i in range(1, len(reply or []), 4)]
        if not claimed:
            raise Empty()
        for key, item, recorded, started in claimed:
            self._deliver_claimed(key, item, bool(recorded), bytes_to_str(started))
        return True

    def _deliver_claimed(self, key: bytes, item: bytes, recorded: bool, started: str) -> None:
        """Hand one claimed item to kombu (and Celery); a bad item is the transport's to
        dead-letter (``deliver_failed``), and never stops the others of the claim."""
        queue = bytes_to_str(key)[len(self.global_keyprefix):].rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        self.on_claimed(item)
        try:
            payload = _with_claim_start(loads(bytes_to_str(item)), started)
            if recorded:  # QoS.append need not write the unacked record again
                self.recorded_claim = payload["properties"]["delivery_tag"]
            self.connection._deliver(payload, queue)
        except Exception as exc:
            self.deliver_failed(item, exc)
        finally:
            self.recorded_claim = None

    def deliver_failed(self, item: bytes, exc: Exception) -> None:
        """A claimed item could not be delivered (the transport keeps it as a dead letter)."""
        raise exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """One message of ``queue`` without blocking (kombu's polling path), claimed."""
        client = self._create_client()
        reply = client.execute_command(*self._claim_args([queue]))
        if not reply or len(reply) < 4:
            raise Empty()
        return _with_claim_start(loads(bytes_to_str(reply[2])), "")


def _with_claim_start(payload: Any, started: str) -> Any:
    """``payload`` with its claim start property ``started`` ('' : none), whatever the
    message brought along."""
    properties = payload.get("properties") if isinstance(payload, dict) else None
    if isinstance(properties, dict):
        if started:
            properties[CLAIM_START_PROPERTY] = started
        else:
            properties.pop(CLAIM_START_PROPERTY, None)
    return payload
