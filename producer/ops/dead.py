"""``pipeq dead``: look at, re-queue or drop the messages pipeq could not run."""

from __future__ import annotations

import json
import time

from pipeq.core.config import Settings
from pipeq.core.contract import JobRequest, new_job_id
from pipeq.core.deadletters import DeadLetters
from pipeq.core.redis_io import connect


def run_dead(settings: Settings, action: str, entry_id: str | None) -> int:
    """Run a ``pipeq dead`` action; returns the exit code."""
    client = connect(settings, socket_timeout_s=10)
    dead = DeadLetters(client, settings.keys)
    if action == "list":
        entries = dead.list()
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
            kind = "request" if e.request else "raw message"
            print(f"{e.id}  {when}  job={e.job_id or '-'}  queue={e.queue or '-'}  ({kind})\n"
                  f"    {e.reason}")
        print(f"{len(entries)} dead letter(s)")
        return 0
    if action == "purge":
        print(f"dropped {dead.purge()} dead letter(s)")
        return 0
    if not entry_id:
        print(f"pipeq dead {action} needs the dead letter's id (see `pipeq dead list`)")
        return 2
    entry = dead.get(entry_id)
    if entry is None:
        print(f"no dead letter {entry_id}")
        return 1
    if action == "drop":
        dead.drop(entry_id)
        print(f"dropped dead letter {entry_id}")
        return 0
    if entry.request is None:
        print(f"dead letter {entry_id} is not a pipeq request ({entry.reason}); it can only "
              "be dropped")
        return 1
    # A re-queued request is a new job (new id): the old job's record stays as it ended.
    body = dict(entry.request, job_id=new_job_id(), submitted_at=time.time(), deadline=None)
    request = JobRequest.model_validate(body)
    from pipeq.client import Client

    Client.for_settings(settings).send(request)
    dead.drop(entry_id)
    print(json.dumps({"requeued": entry_id, "job_id": request.job_id}))
    return 0
