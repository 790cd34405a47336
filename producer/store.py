"""Job records in Redis: state, result or error, written a whole batch per round trip.

A record is a hash ``<prefix>:job:<id>`` with a ``state`` field and a ``data`` field (the
msgpack-encoded result or error, see ``producer.codec``), expiring after the result TTL.
State changes run as Lua scripts so that they are atomic and idempotent: a final state is
never overwritten (a re-delivered job cannot replace a stored result, a cancelled job stays
cancelled), and finishing a job also wakes the producer waiting for it (its reply list).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from . import codec
from .contract import FINAL_STATES, JobState, Keys

_FINAL = ",".join(sorted(s.value for s in FINAL_STATES))

# KEYS: job keys; ARGV: ttl, worker, time. Returns per job "<state before>:<starts>", where
# starts counts how often a worker began the job (a re-delivery after a crash adds one).
_START = f"""
local final = {{}}
for s in string.gmatch('{_FINAL}', '[^,]+') do final[s] = true end
local out = {{}}
for i, key in ipairs(KEYS) do
  local state = redis.call('HGET', key, 'state')
  if state and final[state] then
    out[i] = state .. ':0'
  else
    redis.call('HSET', key, 'state', 'STARTED', 'worker', ARGV[2], 'started_at', ARGV[3])
    local starts = redis.call('HINCRBY', key, 'starts', 1)
    redis.call('EXPIRE', key, ARGV[1])
    out[i] = (state or 'PENDING') .. ':' .. starts
  end
end
return out
"""

#: Prefix of the fields of a route's stats hash (``Keys.route_stats``) that count the jobs
#: which ended in each final state: ``jobs:SUCCESS``, ``jobs:FAILURE``, ...
JOBS_IN_STATE = "jobs:"

# KEYS: job keys then reply lists (one per job, '' for none), then optionally the route's
# stats hash, where each stored final state is counted (once: skipped jobs are not).
# ARGV: ttl, then per job: state, data, job id. Returns 1 per job stored, 0 per job skipped.
_FINISH = f"""
local final = {{}}
for s in string.gmatch('{_FINAL}', '[^,]+') do final[s] = true end
local n = math.floor(#KEYS / 2)
local stats = (#KEYS % 2 == 1) and KEYS[#KEYS] or nil
local ttl = ARGV[1]
local out = {{}}
for i = 1, n do
  local key = KEYS[i]
  local state = redis.call('HGET', key, 'state')
  if state and final[state] then
    out[i] = 0
  else
    local base = 2 + (i - 1) * 3
    redis.call('HSET', key, 'state', ARGV[base], 'data', ARGV[base + 1])
    redis.call('EXPIRE', key, ttl)
    local reply = KEYS[n + i]
    if reply ~= '' then
      redis.call('RPUSH', reply, ARGV[base + 2])
      redis.call('EXPIRE', reply, ttl)
    end
    if stats then
      redis.call('HINCRBY', stats, '{JOBS_IN_STATE}' .. ARGV[base], 1)
    end
    out[i] = 1
  end
end
return out
"""


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


class JobStore:
    """Reads and writes job records; shared by producers and workers."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int):
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)

    def start(self, job_ids: list[str], worker: str) -> dict[str, JobState]:
        """Mark jobs STARTED unless already final; return each job's state before."""
        return {j: state for j, (state, _) in self.start_counted(job_ids, worker).items()}

    def start_counted(self, job_ids: list[str], worker: str) -> dict[str, tuple[JobState, int]]:
        """Like :meth:`start`, also returning how many times each job has now been started.

        A count above one means the job was re-delivered (its earlier worker died or lost
        Redis); a count that keeps growing marks a poison message.
        """
        if not job_ids:
            return {}
        keys = [self.keys.result(j) for j in job_ids]
        rows = self._start(keys=keys, args=[self.ttl_s, worker, f"{time.time():.6f}"])
        out = {}
        for job_id, row in zip(job_ids, rows, strict=True):
            state, _, starts = _text(row).rpartition(":")
            out[job_id] = (JobState(state), int(starts))
        return out

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
        args: list[Any] = [self.ttl_s]
        for o in outcomes:
            data = {"result": o.payload} if o.state == JobState.SUCCESS else {"error": o.payload}
            args += [o.state.value, codec.encode(data), o.job_id]
        stored = self._finish(keys=keys, args=args)
        return [bool(s) for s in stored]

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
        return [JobState(_text(s)) if s else None for s in pipe.execute()]

    def cancel(self, job_id: str) -> JobState:
        """Mark a job CANCELLED unless already final (atomic); return its state before.

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
                    state = JobState(_text(raw)) if raw else JobState.PENDING
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _record(job_id: str, state: Any, data: Any, worker: Any) -> JobRecord | None:
    if state is None:
        return None
    parsed = JobState(_text(state))
    body: dict[str, Any] = codec.decode(data) if data else {}
    return JobRecord(
        job_id=job_id,
        state=parsed,
        result=body.get("result"),
        error=body.get("error"),
        worker=_text(worker) if worker else None,
    )
