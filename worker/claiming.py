"""Taking a message off a queue without a moment in which a killed worker loses it.

kombu's Redis transport pops a message with ``BRPOP`` and records it as unacknowledged in a
second command. A worker killed (or a connection cut) between the two loses the message: it
is in neither the queue nor the unacked hash, and no visibility timeout brings it back.

pipeq's channel never pops with a blocking command. It waits on the route's doorbell (a
list that exists while one of the route's queues may hold a message, rung by every publish:
producer/transport.py) with ``BLMOVE bell bell RIGHT RIGHT``, which blocks until it exists
and takes nothing, then *claims* the oldest item with one Lua script that pops it and records it
in kombu's unacked hash and index in the same atomic step, in exactly the format kombu's
own ``QoS.append`` writes. From that instant a dead worker's message is restored after the
visibility timeout like any other unacknowledged message. Requires Redis >= 6.2 (BLMOVE).
"""

from __future__ import annotations

import time
from queue import Empty
from typing import TYPE_CHECKING, Any, Protocol

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ResponseError

from producer.contract import bell_of

# KEYS[1] unacked hash, KEYS[2] unacked index, KEYS[3] the queues' doorbell
# (producer/transport.py), KEYS[4..] queue lists in the order to serve.
# ARGV[1] the claim time (the client's clock, as kombu's restore compares with it).
# Leaving every queue empty, the claim silences the doorbell: waiting workers then block.
# The unacked entry is built from the item's own bytes ('[' item ',' EX ',' RK ']'), so it
# is byte-for-byte the message kombu would restore. An item that is not a kombu message is
# returned unrecorded: the transport dead-letters it and nothing would ever restore it.
CLAIM_SCRIPT = """
local taken = false
for i = 4, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    if ok and type(msg) == 'table' and type(msg.properties) == 'table' then
      local tag = msg.properties.delivery_tag
      local info = msg.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table'
          and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        redis.call('HSET', KEYS[1], tag,
          '[' .. item .. ',' .. cjson.encode(info.exchange) .. ','
          .. cjson.encode(info.routing_key) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
      end
    end
    taken = {KEYS[i], item}
    break
  end
end
for i = 4, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then return taken end
end
redis.call('DEL', KEYS[3])
return taken
"""

#: The oldest Redis with BLMOVE.
MIN_REDIS = (6, 2)


def unsupported_redis(client: Any) -> str | None:
    """Why the Redis behind ``client`` cannot serve pipeq workers, or None if it can (or
    cannot be asked now: Celery then keeps retrying the connection)."""
    try:
        version = str(client.info("server").get("redis_version", ""))
    except Exception:  # unreachable now, or INFO refused (some managed services)
        return None
    try:
        found = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    if found >= MIN_REDIS:
        return None
    return (f"Redis {version} is too old for pipeq workers: they need Redis >= 6.2 (BLMOVE, to "
            "take messages off the queue without a moment in which a killed worker loses "
            "them); upgrade the broker")


class ClaimHook(Protocol):
    """Called with each claimed item before it is delivered (fault injection)."""

    def __call__(self, item: bytes) -> None: ...


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
    _queue_cycle: Any
    _in_poll: Any
    _brpop_sent_at: Any
    connection_errors: tuple[type[BaseException], ...]

    #: Fault injection: called with every claimed item before delivery.
    on_claimed: ClaimHook | None = None
    #: The next command: claim (True) or wait (False).
    _claim_next = True
    _pending: str = ""

    if TYPE_CHECKING:  # kombu's Channel has these; a stub here would shadow them
        def _q_for_pri(self, queue: str, pri: int) -> str: ...
        def _flush_brpop_reauth(self) -> None: ...
        def _create_client(self, asynchronous: bool = False) -> Any: ...

    def _serving_keys(self, queues: list[str]) -> list[str]:
        return [self.global_keyprefix + self._q_for_pri(queue, pri)
                for pri in self.priority_steps for queue in queues]

    def _claim_args(self, queues: list[str]) -> list[Any]:
        prefix = self.global_keyprefix
        keys = self._serving_keys(queues)
        return ["EVAL", CLAIM_SCRIPT, 3 + len(keys), prefix + self.unacked_key,
                prefix + self.unacked_index_key, prefix + bell_of(queues[0]), *keys,
                repr(time.time())]

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        if self._claim_next:
            command = self._claim_args(queues)
        else:
            # Until the doorbell rings, or one poll interval: a message queued without
            # ringing it (by a plain Celery client) is still served.
            wait = timeout if timeout is not None else self.brpop_timeout
            bell = self.global_keyprefix + bell_of(queues[0])
            command = ["BLMOVE", bell, bell, "RIGHT", "RIGHT", wait or 1]
        self._pending = command[0]
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
                raise
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if self._pending == "BLMOVE":  # rung, or a poll interval passed: look
                self._claim_next = True
                raise Empty()
            if not reply:
                self._claim_next = False
                raise Empty()
            return self._deliver_claimed(reply[0], reply[1])
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_claimed(self, key: bytes, item: bytes) -> bool:
        queue = bytes_to_str(key)[len(self.global_keyprefix):].rsplit(self.sep, 1)[0]
        self._queue_cycle.rotate(queue)
        if self.on_claimed is not None:
            self.on_claimed(item)
        self.connection._deliver(loads(bytes_to_str(item)), queue)
        return True

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """One message of ``queue`` without blocking (kombu's polling path), claimed."""
        client = self._create_client()
        reply = client.execute_command(*self._claim_args([queue]))
        if not reply:
            raise Empty()
        return loads(bytes_to_str(reply[1]))
