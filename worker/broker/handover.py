"""Handing a silent worker's messages to live workers when its lease expires.

Redis has no acks: kombu restores a dead worker's messages only after the visibility timeout
(minutes, since it must exceed the longest job), counted from delivery. A worker host whose
link is cut, or that froze, would keep its jobs that long. pipeq hands them over on
*heartbeat expiry* instead:

- every claim records, in the same atomic step, which worker holds the message and where it
  came from (``lua/claim.lua``: the ``owners`` hash and the holder's ``held`` hash);
- every worker renews its *holder lease* every ``heartbeat_s`` (``lua/lease.lua``, on
  Redis's clock: the hosts' clocks never matter) and, in the same script, puts back the
  messages of every holder whose lease expired ``MISSED_BEATS`` beats after its last
  renewal: byte for byte, at the head of their queue, ringing the doorbell. Only messages
  the dead holder still owns go back (not one acknowledged since, nor one another worker
  claimed after kombu's own restore);
- a worker that was only cut off learns it at its next renewal (the reaper left a marker):
  it logs it and serves on as a new holder. The jobs it still finishes change nothing (a
  job's first final record wins, ``job_finish.lua``), and acknowledging them removes
  nothing another worker needs: a message is acknowledged only after its job's record is
  final, so whichever copy of it is still held elsewhere would find the job finished.

A worker that is slow but alive keeps its lease: the renewal runs on its own thread,
whatever the model call does. The bound: a cut host's messages are back in their queue at
most ``(MISSED_BEATS + 1) x heartbeat_s`` after its last renewal (lease plus one renewal
period of the peers), plus the time a peer needs for a free batch slot to run them.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import redis

from pipeq.core.keys import Keys
from pipeq.core.redis_io import as_text, load_lua
from pipeq.core.registry import MISSED_BEATS

log = logging.getLogger("pipeq.handover")

#: Renews this holder's lease and hands over the messages of expired holders (lua/lease.lua).
LEASE_SCRIPT = load_lua("lease.lua", "pipeq.worker.broker")
#: Holders reaped by one renewal at most (the rest at the next one).
MAX_REAPED = 16
#: How long a reaped holder's marker waits for it to come back (s).
MARKER_TTL_S = 24 * 3600


class HolderLease:
    """This worker's holder lease: renewed every ``heartbeat_s``, reaping expired peers."""

    def __init__(self, client: redis.Redis, keys: Keys, holder: str, heartbeat_s: float,
                 visibility_timeout_s: float):
        self.client = client
        self.keys = keys
        self.holder = holder
        self.interval_s = heartbeat_s
        self.lease_ms = int(heartbeat_s * MISSED_BEATS * 1000)
        # The hand-over keys outlive the last renewal by the visibility timeout: were every
        # worker gone for longer, kombu's own restore has put their messages back by then.
        self.keep_ms = int(max(visibility_timeout_s, heartbeat_s * MISSED_BEATS * 2) * 1000)
        #: How often this worker learnt that it had been declared dead (a metric, tests).
        self.declared_dead = 0
        #: Messages this worker handed over from expired holders.
        self.restored = 0
        self._script = client.register_script(LEASE_SCRIPT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeq-handover", daemon=True)

    def start(self) -> None:
        """Take the lease now, before this worker claims anything (claims are recorded under
        it), putting back what a dead process of the same name still held; then keep
        renewing it. (Should Redis be away now, a dead namesake's messages wait for kombu's
        visibility timeout: a later renewal cannot tell them from this process's own.)"""
        try:
            self.renew(fresh=True)
        except redis.RedisError as exc:
            log.warning("could not take the holder lease yet (%s); retrying every %gs", exc,
                        self.interval_s)
        self._thread.start()

    def stop(self, withdraw: bool) -> None:
        """Stop renewing. ``withdraw``: this worker holds nothing any more (it drained), so
        its lease goes at once; otherwise it lapses and live workers hand over what is left."""
        self._stop.set()
        if not withdraw:
            return
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys.holders(), self.holder)
                pipe.delete(self.keys.held(self.holder))
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not withdraw the holder lease of %s: %s", self.holder, exc)

    def renew(self, fresh: bool = False) -> list[tuple[str, int]]:
        """Renew the lease and reap expired holders; returns (holder, messages restored).

        ``fresh``: the first renewal of this process, before it claimed anything.
        """
        keys = self.keys
        reply: list[Any] = self._script(
            keys=[keys.holders(), keys.unacked(), keys.unacked_index(), keys.owners()],
            args=[self.holder, self.lease_ms, keys.held(""), keys.reaped(""), MAX_REAPED,
                  MARKER_TTL_S, self.keep_ms, "1" if fresh else "0"])
        marker = as_text(reply[0])
        if marker:
            self._declared_dead(marker)
        reaped = [(as_text(reply[i]), int(reply[i + 1])) for i in range(1, len(reply), 2)]
        for holder, count in reaped:
            self.restored += count
            if holder == self.holder:
                log.warning("a dead worker of the same name (%s) held %d message(s): back in "
                            "their queue", holder, count)
            else:
                log.warning("worker %s stopped renewing its lease (cut off, frozen or dead): "
                            "its %d held message(s) are back in their queue", holder, count)
        return reaped

    def _declared_dead(self, marker: str) -> None:
        self.declared_dead += 1
        try:
            found = json.loads(marker)
            silent_s, by, count = found["silent_ms"] / 1000, found["by"], found["restored"]
        except (ValueError, KeyError, TypeError):
            silent_s, by, count = float("nan"), "?", "?"
        log.warning(
            "this worker was declared dead by %s after %.1fs without renewing its lease "
            "(cut off from Redis, frozen or overloaded): its %s held message(s) went back to "
            "the queue for other workers. Jobs it still finishes change nothing (a job's first "
            "result wins); it serves on as a new holder.", by, silent_s, count)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except redis.RedisError as exc:
                log.warning("could not renew the holder lease: %s", exc)
