"""The dead-letter list: messages pipeq could not run, kept with the reason.

Redis has no dead-letter queue (``reject(requeue=False)`` deletes), so pipeq keeps one:
messages that are not valid JSON, not a pipeq request, or kept killing workers are
appended here with their reason instead of vanishing. ``pipeq dead`` lists them, re-queues
them (after the cause is fixed) or drops them.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import redis

from pipeq.core.keys import Keys
from pipeq.core.redis_io import as_text

#: Most entries kept; older ones are trimmed so a flood of garbage cannot fill Redis.
MAX_ENTRIES = 10_000
#: Most bytes of an undecodable message kept (enough to look at; 10,000 one-megabyte
#: garbage items would otherwise take 13 GB).
MAX_RAW_BYTES = 64 * 1024


@dataclass(frozen=True)
class DeadLetter:
    """One dead message: why, when, from which queue, and its content."""

    id: str
    reason: str
    at: float
    queue: str | None = None
    job_id: str | None = None
    #: The pipeq request (when the message was one), to re-queue it as a fresh job.
    request: dict[str, Any] | None = None
    #: The raw kombu message (base64), when it could not be decoded.
    raw: str | None = None


class DeadLetters:
    """Append, list, re-queue and drop dead letters of one deployment."""

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client = client
        self.keys = keys

    def add(self, reason: str, *, queue: str | None = None, job_id: str | None = None,
            request: dict[str, Any] | None = None, raw: bytes | None = None) -> DeadLetter:
        """Keep a dead message with its reason; returns the entry."""
        entry = DeadLetter(
            id=uuid.uuid4().hex[:12], reason=reason, at=time.time(), queue=queue, job_id=job_id,
            request=request,
            raw=base64.b64encode(raw[:MAX_RAW_BYTES]).decode() if raw is not None else None,
        )
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(self.keys.dead_letters(), json.dumps(asdict(entry)))
        pipe.ltrim(self.keys.dead_letters(), -MAX_ENTRIES, -1)
        pipe.execute()
        return entry

    def list(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        return [DeadLetter(**json.loads(e)) for e in self.client.lrange(self.keys.dead_letters(),
                                                                        0, -1)]

    def get(self, entry_id: str) -> DeadLetter | None:
        """The entry with this id (or None)."""
        return next((e for e in self.list() if e.id == entry_id), None)

    def drop(self, entry_id: str) -> bool:
        """Remove one entry; True if it existed."""
        for raw in self.client.lrange(self.keys.dead_letters(), 0, -1):
            if json.loads(raw)["id"] == entry_id:
                return bool(self.client.lrem(self.keys.dead_letters(), 1, as_text(raw)))
        return False

    def purge(self) -> int:
        """Remove every entry; returns how many there were."""
        count = int(self.client.llen(self.keys.dead_letters()))
        self.client.delete(self.keys.dead_letters())
        return count
