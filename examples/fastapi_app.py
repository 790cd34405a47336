"""A web app that submits jobs through pipeq's Python API, asyncio all the way.

    pip install 'pipeq[gateway]'          # FastAPI and uvicorn (the app needs no torch)
    pipeq worker --task text-classification --model M &
    PIPEQ_EXAMPLE_MODEL=M uvicorn examples.fastapi_app:app --port 8000
    curl -s localhost:8000/classify -H 'Content-Type: application/json' -d '{"text": "great"}'

``/classify`` waits for the result (the event loop is never blocked: the Redis calls run on
pipeq's own threads); ``/jobs`` answers with a job id at once, ``/jobs/{id}`` reads it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from pipeq import get_job, pipeline
from pipeq.client import Client
from pipeq.errors import JobNotFound, JobTimeout, NoWorkerError, ValidationError

MODEL = os.environ.get("PIPEQ_EXAMPLE_MODEL", "distilbert-base-uncased-finetuned-sst-2-english")
classifier = pipeline("text-classification", model=MODEL)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    Client.discard(classifier.client.settings)  # close pipeq's connections and threads


app = FastAPI(lifespan=lifespan)


class Text(BaseModel):
    """A text to classify."""

    text: str


@app.post("/classify")
async def classify(body: Text) -> Any:
    """The labels of one text (waits up to 10 s)."""
    try:
        return await classifier.acall(body.text, timeout=10)
    except ValidationError as exc:
        raise HTTPException(422, str(exc)) from None
    except (NoWorkerError, JobTimeout) as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from None


@app.post("/jobs", status_code=202)
async def submit(body: Text) -> dict[str, str]:
    """Submit and answer at once with the job id."""
    job = await classifier.asubmit(body.text)
    return {"id": job.id}


@app.get("/jobs/{job_id}")
async def read(job_id: str) -> dict[str, Any]:
    """A job's status, and its result once it has one."""
    job = get_job(job_id, Client.for_settings().settings)
    try:
        status = await job.astatus()
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None
    result = await job.aresult(timeout=0.1) if status == "SUCCESS" else None
    return {"id": job_id, "status": status, "result": result}
