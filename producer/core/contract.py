"""The wire contract between producers and workers: routes, requests and job states.

Everything that crosses Redis is defined here once (key names in ``pipeq.core.keys``): the
worker implements what this module promises. Messages are pydantic models serialised to
JSON; results use ``pipeq.core.codec``.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from pipeq.core.tasks import canonical_task

JSONScalar = str | int | float | bool | None
#: One input of a pipeline call: a string, or a mapping (e.g. {"text": ..., "text_pair": ...},
#: or an image/audio envelope {"$media": ...}, see pipeq.core.envelopes).
InputItem = str | dict[str, Any]
#: Which lane a job travels in: interactive jobs are served before waiting bulk chunks.
Lane = Literal["interactive", "bulk"]

SCHEMA_VERSION = 1
#: The hub's default revision: a route with it is the route with no revision.
DEFAULT_REVISION = "main"


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

    @field_validator("revision")
    @classmethod
    def _default_branch(cls, value: str | None) -> str | None:
        # One route, however it is named: the hub's default revision is "main", so a
        # worker started with --revision main serves pipeline(task, model=M) too.
        return None if value == DEFAULT_REVISION else value

    @property
    def id(self) -> str:
        """A stable id usable in queue, key and task names: readable slug plus a hash."""
        return route_id(self.task, self.model, self.revision, self.tokenizer)

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


@functools.lru_cache(maxsize=1024)
def route_id(task: str, model: str, revision: str | None, tokenizer: str | None) -> str:
    """``Route.id`` of the route with these fields (see there).

    Cached by the fields, not on the route: every key and queue name of a job derives from
    it, 3-4 times a job on each side, and the hash and slug took ~1.7 us each time; a route
    copied with other fields (``model_copy(update=...)``) still gets its own id.
    """
    identity = "\x1f".join([task, model, revision or "", tokenizer or ""])
    digest = hashlib.sha1(identity.encode()).hexdigest()[:10]
    tail = model.rstrip("/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tail)[:40] or "model"
    return f"{task}.{slug}.{digest}"


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
    #: "bulk" for chunks of a bulk job (``pipeq.bulk``): they travel on the route's bulk
    #: queue and the worker runs waiting interactive jobs first, so a bulk job never starves them.
    lane: Lane = "interactive"
    #: True when the caller streams the generated text (``RemotePipeline.stream``): the
    #: worker appends it to the job's Redis Stream (``pipeq.core.streams``) as it is made.
    #: Left out of messages when False, so that workers that predate it read them.
    stream: bool = False
    # Claim-checked media payloads (Redis key -> raw bytes) that Client.send stores before
    # publishing; producer side only, never serialised (see pipeq.core.envelopes).
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
