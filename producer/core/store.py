"""Job records in Redis: state, result or error, written a whole batch per round trip.

A record is a hash ``<prefix>:job:<id>`` with a ``state`` field and a ``data`` field (the
msgpack-encoded result or error, see ``pipeq.core.codec``), expiring after the result TTL.
State changes run as Lua scripts so that they are atomic and idempotent: a final state is
never overwritten (a re-delivered job cannot replace a stored result, a cancelled job stays
cancelled), and finishing a job also wakes the producer waiting for it (its reply list).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from pipeq.core import codec
from pipeq.core.contract import JobState
from pipeq.core.keys import Keys
from pipeq.core.redis_io import as_text, load_lua

#: Lua scripts: the state changes that must be atomic (a final state is never overwritten).
START_SCRIPT = load_lua("job_start.lua")
FINISH_SCRIPT = load_lua("job_finish.lua")
DROP_SCRIPT = load_lua("job_drop.lua")
UNSTART_SCRIPT = load_lua("job_unstart.lua")
#: The record data of a job whose result was dropped once read (JobStore.drop).
DROPPED = {"dropped": True}

#: Record data up to this size travels on the producer's reply list with the job id (one
#: read fewer per job); larger results are read from the record.
REPLY_INLINE_BYTES = 64 * 1024
#: Separates the job id, state and data of a reply list item.
REPLY_SEPARATOR = b"\x1f"

#: Prefix of the fields of a route's stats hash (``Keys.route_stats``) that count the jobs
#: which ended in each final state: ``jobs:SUCCESS``, ``jobs:FAILURE``, ... (job_finish.lua)
JOBS_IN_STATE = "jobs:"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A job's final record as the worker stores it."""

    job_id: str
    state: JobState
    #: The result (on SUCCESS) or {"type", "message", "retryable"} (otherwise).
    payload: Any
    reply_to: str | None = None


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job's record as read back: its state and, once final, its result or error."""

    job_id: str
    state: JobState
    result: Any = None
    error: dict[str, Any] | None = None
    worker: str | None = None
    #: Its result (or error) was dropped once read (``JobStore.drop``); the state stays.
    dropped: bool = False


class JobStore:
    """Reads and writes job records; shared by producers and workers."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int):
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._start = client.register_script(START_SCRIPT)
        self._finish = client.register_script(FINISH_SCRIPT)
        self._drop = client.register_script(DROP_SCRIPT)
        self._unstart = client.register_script(UNSTART_SCRIPT)

    def start(self, job_ids: list[str], worker: str) -> dict[str, tuple[JobState, int]]:
        """Mark jobs STARTED unless already final; each job's state before and how many times it
        has now been started.

        A count above one means the job was re-delivered (its earlier worker died or lost
        Redis); a count that keeps growing marks a poison message.
        """
        if not job_ids:
            return {}
        keys = [self.keys.result(j) for j in job_ids]
        rows = self._start(keys=keys, args=[self.ttl_s, worker, f"{time.time():.6f}"])
        return {job_id: start_row(row) for job_id, row in zip(job_ids, rows, strict=True)}

    def unstart(self, before: dict[str, JobState], worker: str) -> None:
        """Undo the starts ``worker`` recorded for jobs it hands back unrun (by job id: each
        one's state before its start): the start count goes down by one and a job that was
        PENDING is PENDING again. A record that moved on since (final, or started by
        another worker) is left as it is."""
        if not before:
            return
        keys = [self.keys.result(j) for j in before]
        self._unstart(keys=keys, args=[worker, *(s.value for s in before.values())])

    def finish(self, outcomes: list[Outcome], stats_key: str | None = None) -> list[bool]:
        """Store final records (skipping jobs already final); True where one was stored.

        With ``stats_key`` (a route's ``Keys.route_stats``), each stored final state is also
        counted there, in the same atomic step: a re-delivered job is never counted twice.
        """
        if not outcomes:
            return []
        keys = [self.keys.result(o.job_id) for o in outcomes]
        keys += [o.reply_to or "" for o in outcomes]
        if stats_key:
            keys.append(stats_key)
        args: list[Any] = [self.ttl_s, REPLY_INLINE_BYTES]
        for o in outcomes:
            data = {"result": o.payload} if o.state == JobState.SUCCESS else {"error": o.payload}
            args += [o.state.value, codec.encode(data), o.job_id]
        stored = self._finish(keys=keys, args=args)
        return [bool(s) for s in stored]

    def drop(self, job_ids: list[str]) -> list[bool]:
        """Drop the result (or error) of final records, keeping their state until they expire:
        memory a read result no longer needs. True per job whose data was dropped."""
        keys = [self.keys.result(j) for j in job_ids]
        return [bool(s) for s in self._drop(keys=keys, args=[codec.encode(DROPPED)])]

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record, or None when no worker has touched it (PENDING or unknown)."""
        state, data, worker = self.client.hmget(self.keys.result(job_id), "state", "data", "worker")
        return _record(job_id, state, data, worker)

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """Records of several jobs in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.result(job_id), "state", "data", "worker")
        rows = pipe.execute()
        return [_record(j, *row) for j, row in zip(job_ids, rows, strict=True)]

    def states(self, job_ids: list[str]) -> list[JobState | None]:
        """States only (cheap: no result payload is transferred)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.result(job_id), "state")
        return [JobState(as_text(s)) if s else None for s in pipe.execute()]

    def cancel(self, job_id: str) -> JobState | None:
        """Mark a job CANCELLED unless already final (atomic); return its state before, or
        None when no job has this id (nothing is written then).

        A worker skips a job it finds CANCELLED; one already running finishes, but its
        result does not replace the cancellation.
        """
        error = {"type": "JobCancelled", "message": "the job was cancelled", "retryable": False}
        key = self.keys.result(job_id)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, "state")
                    if raw is None:
                        pipe.unwatch()
                        return None
                    state = JobState(as_text(raw))
                    if state.is_final:
                        pipe.unwatch()
                        return state
                    pipe.multi()
                    pipe.hset(
                        key, mapping={"state": JobState.CANCELLED.value,
                                      "data": codec.encode({"error": error})}
                    )
                    pipe.expire(key, self.ttl_s)
                    pipe.execute()
                    return state
                except redis.WatchError:
                    continue


def start_row(row: Any) -> tuple[JobState, int]:
    """A start script's answer for one job, '<state before>:<starts>', as (state, starts)."""
    state, _, starts = as_text(row).rpartition(":")
    return JobState(state), int(starts)


def reply_item(item: bytes) -> tuple[str, JobRecord | None]:
    """A reply list item: the job id, and its final record when the item carries it."""
    job_id, sep, rest = item.partition(REPLY_SEPARATOR)
    if not sep:
        return as_text(job_id), None
    state, _, data = rest.partition(REPLY_SEPARATOR)
    return as_text(job_id), _record(as_text(job_id), state, data, None)


def _record(job_id: str, state: Any, data: Any, worker: Any) -> JobRecord | None:
    if state is None:
        return None
    parsed = JobState(as_text(state))
    body: dict[str, Any] = codec.decode(data) if data else {}
    return JobRecord(
        job_id=job_id,
        state=parsed,
        result=body.get("result"),
        error=body.get("error"),
        worker=as_text(worker) if worker else None,
        dropped=bool(body.get("dropped")),
    )
