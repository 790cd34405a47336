"""Putting a job message on its route's queue: a Celery task message, written directly.

A job message is an ordinary Celery (protocol 2) task message in kombu's Redis format, so a
stock Celery worker, ``celery inspect`` and Flower understand it. pipeq writes it itself
rather than through ``Celery.send_task``: one pipelined round trip stores the claim-checked
media, pushes the message and rings the route's *doorbell*, where ``send_task`` cost ~1 ms of
Python per job and needed a kombu override to ring the bell.

The doorbell: a worker serves two queues of its route (interactive and bulk lanes) and must
wait for either without taking a message off before it can record it (see
``pipeq.worker.broker.claiming``). Redis has no command that blocks on several lists without
popping, so every queue write also rings the route's bell, a list of at most one item that
exists while one of its queues may hold a message. Workers wait on it with ``BLMOVE bell
bell`` (nothing is taken); a claim that leaves the queues empty deletes it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

import redis

from pipeq.core.contract import JobRequest
from pipeq.core.keys import Keys
from pipeq.core.redis_io import load_lua
from pipeq.errors import NotReplicated

#: The script that rings a doorbell (KEYS[1]) unless it rings already.
RING_SCRIPT = load_lua("ring.lua")
#: The script that stores a job's PENDING record, queues its message and rings the bell.
PUBLISH_SCRIPT = load_lua("publish.lua")

#: Celery's "embed" part of a protocol 2 body: no callbacks, chains or chords.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
#: Who sent a message, as Celery's own producers say it (``anon_nodename``).
_ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"


def task_message(request: JobRequest, task_name: str, queue: str, summary: str) -> str:
    """The JSON kombu stores for a Celery task message of ``request`` on ``queue``.

    ``summary`` is what Flower shows as the task's arguments (never the inputs themselves:
    they may be private, and large).
    """
    # ``stream`` only when set: a message of an ordinary job is what it always was.
    wire = request.model_dump(mode="json", exclude=None if request.stream else {"stream"})
    body = json.dumps([[], {"request": wire}, _EMBED])
    job_id = request.job_id
    headers: dict[str, Any] = {
        "lang": "py", "task": task_name, "id": job_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": job_id, "parent_id": None, "argsrepr": "()",
        "kwargsrepr": summary, "origin": _ORIGIN, "ignore_result": True,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        # The job's deadline where the worker's claim script can read it: an idle worker
        # starts a lone job in the claim itself, and never one whose deadline has passed.
        "pipeq_deadline": request.deadline,
    }
    properties = {
        "correlation_id": job_id, "reply_to": None, "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
        "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
    }
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode("ascii"),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": headers, "properties": properties,
    })


def default_summary(request: JobRequest) -> str:
    """Flower's view of a job's arguments: input count and parameter names."""
    return f"<{len(request.inputs)} input(s), params {sorted(request.params)}>"


class Publisher:
    """Writes job messages (and their claim-checked payloads) to Redis, one round trip each."""

    def __init__(self, client: redis.Redis, keys: Keys, *, wait_replicas: int = 0,
                 wait_timeout_ms: int = 1000):
        self.client = client
        self.keys = keys
        #: Replicas that must confirm each published job (Redis WAIT; 0: none).
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._publish = client.register_script(PUBLISH_SCRIPT)

    def publish(self, request: JobRequest, *, record_ttl_s: int, summary: str | None = None,
                claim_ttl_s: int | None = None) -> None:
        """Store ``request.claims`` (expiring after ``claim_ttl_s``), the job's PENDING record
        (so that its id is known, and a record that vanishes means a lost job), queue the
        message on its route's lane and ring the route's bell, in one pipelined round trip.

        With ``wait_replicas``, the same round trip ends with ``WAIT`` (it must run on the
        connection that wrote); NotReplicated when too few replicas confirm in time."""
        route, lane = request.route, request.lane
        message = task_message(request, self.keys.task_name(route),
                               self.keys.queue_for(route, lane), summary or
                               default_summary(request))
        keys = [self.keys.result(request.job_id), self.keys.lane_queue_key(route, lane),
                self.keys.bell(route)]
        if not request.claims and not self.wait_replicas:  # the common case: one command
            self._publish(keys=keys, args=[record_ttl_s, message])
            return
        with self.client.pipeline(transaction=False) as pipe:
            for key, data in request.claims.items():
                pipe.set(key, data, ex=claim_ttl_s)
            # EVAL, not the registered script: a pipeline would ask SCRIPT EXISTS each time.
            pipe.eval(PUBLISH_SCRIPT, len(keys), *keys, record_ttl_s, message)
            if self.wait_replicas:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            replies = pipe.execute()
        if self.wait_replicas and int(replies[-1]) < self.wait_replicas:
            raise NotReplicated(
                f"job {request.job_id} is queued on the Redis primary, but {replies[-1]} of "
                f"PIPEQ_REDIS_WAIT_REPLICAS={self.wait_replicas} replica(s) confirmed it within "
                f"{self.wait_timeout_ms} ms: a failover now could lose it. Check the replicas "
                "(INFO replication); pipeq.get_job(id).status() says later whether it "
                "survived", job_id=request.job_id)

    def message_ids(self, messages: list[Any]) -> set[str]:
        """Job ids of raw queued messages (those that parse), e.g. from an ``LRANGE``."""
        ids = set()
        for raw in messages:
            try:
                ids.add(str(json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue
        return ids


def queued_request(raw: Any) -> dict[str, Any] | None:
    """The job request inside a raw queued message, or None when it is not a pipeq job."""
    try:
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        request = body[1]["request"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return request if isinstance(request, dict) else None
