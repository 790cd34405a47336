"""The wire contract between producers and workers: routes, requests, job states, key names.

Everything that crosses Redis is defined here, once: the worker implements what this module
promises. Messages are pydantic models serialised to JSON; results use ``producer.codec``.
Every Redis key and queue name is computed by one function of this module.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from .tasks import canonical_task

JSONScalar = str | int | float | bool | None
#: One input of a pipeline call: a string, or a mapping (e.g. {"text": ..., "text_pair": ...},
#: or an image/audio envelope {"$media": ...}, see producer.media).
InputItem = str | dict[str, Any]
#: Which lane a job travels in: interactive jobs are served before waiting bulk chunks.
Lane = Literal["interactive", "bulk"]

SCHEMA_VERSION = 1


class JobState(StrEnum):
    """The states a job goes through; the last four are final."""

    PENDING = "PENDING"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def is_final(self) -> bool:
        """True when the job will not change state any more."""
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCESS, JobState.FAILURE, JobState.CANCELLED, JobState.EXPIRED})


class Route(BaseModel):
    """A (task, model[, revision, tokenizer]) pair: the unit of routing and of loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    model: Annotated[str, Field(min_length=1, max_length=512)]
    revision: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    tokenizer: Annotated[str, Field(min_length=1, max_length=512)] | None = None

    @field_validator("task")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return canonical_task(value)

    @property
    def id(self) -> str:
        """A stable id usable in queue, key and task names: readable slug plus a hash."""
        identity = "\x1f".join([self.task, self.model, self.revision or "", self.tokenizer or ""])
        digest = hashlib.sha1(identity.encode()).hexdigest()[:10]
        tail = self.model.rstrip("/").rsplit("/", 1)[-1]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tail)[:40] or "model"
        return f"{self.task}.{slug}.{digest}"

    def describe(self) -> str:
        """Human-readable form for messages: task, model and revision."""
        extra = f"@{self.revision}" if self.revision else ""
        tok = f" (tokenizer {self.tokenizer})" if self.tokenizer else ""
        return f"{self.task}:{self.model}{extra}{tok}"

    def worker_command(self) -> str:
        """The command that starts a worker for this route (used in error messages)."""
        cmd = f"pipeq worker --task {self.task} --model {self.model}"
        if self.revision:
            cmd += f" --revision {self.revision}"
        if self.tokenizer:
            cmd += f" --tokenizer {self.tokenizer}"
        return cmd


class JobRequest(BaseModel):
    """One inference job as it travels in a Celery message (JSON, never pickle)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = SCHEMA_VERSION
    job_id: Annotated[str, Field(min_length=1, max_length=128)]
    route: Route
    inputs: Annotated[list[InputItem], Field(min_length=1)]
    #: True when the caller passed one input rather than a list: the result is not a list.
    single: bool
    params: dict[str, Any] = Field(default_factory=dict)
    submitted_at: Annotated[float, Field(allow_inf_nan=False)]
    #: Absolute UNIX time after which the job is not worth running (EXPIRED). Finite: a NaN
    #: deadline would compare false with every time, and the job would never expire.
    deadline: Annotated[float, Field(allow_inf_nan=False)] | None = None
    #: Redis list the worker pushes the finished job id onto, to wake the waiting producer.
    reply_to: str | None = None
    #: "bulk" for chunks of a bulk job (``producer.bulk``): they travel on the route's bulk
    #: queue and the worker runs waiting interactive jobs first, so a bulk job never starves them.
    lane: Lane = "interactive"
    # Claim-checked media payloads (Redis key -> raw bytes) that Client.send stores before
    # publishing; producer side only, never serialised (see producer.media).
    _claims: dict[str, bytes] = PrivateAttr(default_factory=dict)

    @property
    def claims(self) -> dict[str, bytes]:
        """Media payloads the sender stores in Redis before publishing (claim check)."""
        return self._claims

    @field_validator("v")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(
                f"unsupported message schema version {value} (this is {SCHEMA_VERSION})"
            )
        return value


def new_job_id() -> str:
    """A fresh, unguessable job id."""
    return uuid.uuid4().hex


def now() -> float:
    """Wall-clock time as stored in job records (UNIX seconds)."""
    return time.time()


#: Suffix of a route's bulk-lane queue after its interactive queue's name.
BULK_SUFFIX = ".bulk"


def bell_of(queue: str) -> str:
    """The doorbell list shared by a route's queues (both lanes), under the broker prefix:
    non-empty while one of them may hold a message (producer/transport.py)."""
    return queue.removesuffix(BULK_SUFFIX) + ".bell"


class Keys:
    """Names of every Redis key and queue pipeq uses, derived from one prefix."""

    def __init__(self, prefix: str = "pipeq"):
        self.prefix = prefix
        #: kombu's ``global_keyprefix``: prepended to every key Celery itself writes.
        self.broker_prefix = f"{prefix}:celery:"

    def queue(self, route: Route) -> str:
        """The Celery queue (a Redis list) of a route."""
        return f"{self.prefix}.q.{route.id}"

    def queue_key(self, route: Route) -> str:
        """The Redis list holding a route's queued messages (under the broker prefix)."""
        return self.broker_prefix + self.queue(route)

    def bulk_queue(self, route: Route) -> str:
        """The Celery queue of a route's bulk chunks (the worker polls it after ``queue``)."""
        return self.queue(route) + BULK_SUFFIX

    def bulk_queue_key(self, route: Route) -> str:
        """The Redis list holding a route's queued bulk chunks (under the broker prefix)."""
        return self.broker_prefix + self.bulk_queue(route)

    def queue_for(self, route: Route, lane: Lane) -> str:
        """The queue a job of ``lane`` ("interactive" or "bulk") is published to."""
        return self.bulk_queue(route) if lane == "bulk" else self.queue(route)

    def bulk(self, bulk_id: str) -> str:
        """A bulk job's progress hash: totals, cancel flag, job ids of chunks in flight."""
        return f"{self.prefix}:bulk:{bulk_id}"

    def unacked_index(self) -> str:
        """kombu's sorted set of delivered, not yet acknowledged messages (by delivery time)."""
        return self.broker_prefix + "unacked_index"

    def unacked(self) -> str:
        """kombu's hash of delivered, not yet acknowledged messages (delivery tag -> message)."""
        return self.broker_prefix + "unacked"

    def task_name(self, route: Route) -> str:
        """The Celery task name of a route; carries the route so Flower can group by it."""
        return f"pipeq.run[{route.id}]"

    def result(self, job_id: str) -> str:
        """The job record (state, result or error), stored with the result TTL."""
        return f"{self.prefix}:job:{job_id}"

    def cancel(self, job_id: str) -> str:
        """Marker that a job was cancelled; workers skip jobs that carry it."""
        return f"{self.prefix}:cancel:{job_id}"

    def reply(self, client_id: str) -> str:
        """A producer's wake-up list: workers push finished job ids onto it."""
        return f"{self.prefix}:reply:{client_id}"

    def route_workers(self, route: Route) -> str:
        """Sorted set of live workers of a route, scored by heartbeat expiry time."""
        return f"{self.prefix}:route:{route.id}:workers"

    def routes(self) -> str:
        """Hash of every route a worker ever announced: route id -> route JSON."""
        return f"{self.prefix}:routes"

    def route_stats(self, route: Route) -> str:
        """Hash of a route's running totals (jobs by final state, inputs, batches, seconds)."""
        return f"{self.prefix}:route:{route.id}:stats"

    def worker_info(self, hostname: str) -> str:
        """A worker's self-description (JSON), expiring with its heartbeat."""
        return f"{self.prefix}:worker:{hostname}"

    def dead_letters(self) -> str:
        """The dead-letter list: poison messages with their reasons."""
        return f"{self.prefix}:dead"

    def idempotency(self, key: str) -> str:
        """Maps a caller's idempotency key to the job id it created."""
        return f"{self.prefix}:idem:{key}"

    def cache(self, digest: str) -> str:
        """A bulk result-cache entry: the answer to one input of a route (producer.cache)."""
        return f"{self.prefix}:cache:{digest}"

    def payload(self, job_id: str, part: int) -> str:
        """A job's claim-checked media payload (raw bytes); deleted when the job ends."""
        return f"{self.prefix}:payload:{job_id}:{part}"
