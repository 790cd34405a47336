"""``GET /v1/jobs/{id}/stream``: a streaming job's generated text as Server-Sent Events.

The same text ``job.stream()`` yields (``pipeq.streaming``): one ``text`` event per piece
(``{"index", "seq", "text"}``: the input, its returned sequence, the new text), then one
``result`` event with the job as ``GET /v1/jobs/{id}`` shows it once ended (its result, or
its error). A stream that cannot be read coherently (trimmed, or a retry that generated
different text) sends an ``error`` event instead, and the ``result`` event still follows.
Comments keep idle connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator

from pipeq.errors import JobFailed, JobNotFound, PipeqError, StreamError
from pipeq.gateway.schemas import RouteOut, view
from pipeq.gateway.service import GatewayService
from pipeq.job import Job
from pipeq.streaming import aiterate

#: Seconds without a piece after which a keep-alive comment is sent.
KEEPALIVE_S = 15.0


def sse(event: str, data: object) -> str:
    """One Server-Sent Event (compact JSON data)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def text_events(service: GatewayService, job_id: str, route: RouteOut,
                      webhook: str | None) -> AsyncIterator[str]:
    """The text events of one job, then its result."""
    job = Job(service.client, job_id)
    pieces = aiterate(job, None)  # no limit: the reading ends with the job, or the client
    # One read in flight at a time; a quiet job gets a keep-alive comment meanwhile.
    pending = asyncio.ensure_future(anext(pieces))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_S)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                piece = pending.result()
            except StopAsyncIteration:
                break
            yield sse("text", {"index": piece.index, "seq": piece.seq, "text": piece.text})
            pending = asyncio.ensure_future(anext(pieces))
    except JobNotFound:
        yield sse("error", {"id": job_id, "pipeq_error": "JobNotFound",
                            "detail": f"job {job_id} is gone (its record expired)"})
        return
    except StreamError as exc:
        yield sse("error", {"id": job_id, "pipeq_error": "StreamError", "detail": str(exc)})
        await _wait_for_end(job)
    except JobFailed:
        pass  # its error is in the result event
    finally:
        if not pending.done():  # the client went away mid-read
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending
        await pieces.aclose()
    record = await service.state(job_id)
    yield sse("result", view(job_id, route, record, webhook=webhook).model_dump(mode="json"))


async def _wait_for_end(job: Job) -> None:
    """After an unreadable stream: wait for the job to end, so the result event has it."""
    with contextlib.suppress(PipeqError):  # its error is in the result event
        await job.aresult(math.inf, drop=False)
