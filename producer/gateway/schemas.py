"""The JSON bodies of the gateway's HTTP API (they make its OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from pipeq.core.contract import JobState
from pipeq.core.store import JobRecord
from pipeq.core.tasks import SUPPORTED_TASKS
from pipeq.gateway.wire import jsonable


class JobIn(BaseModel):
    """``POST /v1/jobs``: what the Python client's ``pipeline(task, model).submit()`` takes."""

    model_config = ConfigDict(extra="forbid")

    #: The schema lists the served tasks; validation stays pipeq's own (its message says
    #: what to use instead of a task transformers 5 removed).
    task: Annotated[str, Field(min_length=1, max_length=128, examples=["text-classification"],
                               json_schema_extra={"enum": sorted(SUPPORTED_TASKS)})]
    model: Annotated[str, Field(min_length=1, max_length=512)]
    revision: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    #: One input (a single call) or a list of inputs (a list call), as pipeline() takes them;
    #: images and audio as the media envelope or base64 data URLs.
    inputs: Any = Field(description="One input, or a list of inputs")
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="Call parameters, e.g. top_k")
    timeout: Annotated[float, Field(gt=0, le=7 * 86400)] | None = Field(
        default=None, description="The job's deadline in seconds (default: the deployment's)")
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    webhook: Annotated[str, Field(min_length=1, max_length=2048)] | None = Field(
        default=None, description="URL to POST the outcome to (Standard Webhooks signed)")
    stream: bool = Field(default=False, description=(
        "text-generation: stream the generated text as it is made; read it as Server-Sent "
        "Events from GET /v1/jobs/{id}/stream"))


class RouteOut(BaseModel):
    """The route a job was submitted to."""

    task: str
    model: str
    revision: str | None = None


class ErrorOut(BaseModel):
    """Why a job did not succeed: the pipeq error type and message."""

    type: str
    message: str
    retryable: bool = False


class JobOut(BaseModel):
    """A job: its state and, once final, its result (SUCCESS) or error (otherwise)."""

    id: str
    status: JobState
    route: RouteOut
    result: Any = None
    error: ErrorOut | None = None
    webhook: str | None = None


class Problem(BaseModel):
    """An RFC 9457 problem document (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    pipeq_error: str = Field(description="The pipeq error class, e.g. JobNotFound")
    instance: str | None = None


class RoutesOut(BaseModel):
    """Every route this key may use: workers, health and queue depth."""

    routes: list[dict[str, Any]]


class Health(BaseModel):
    """``/healthz`` and ``/readyz``."""

    status: str
    detail: str | None = None


def view(job_id: str, route: RouteOut, record: JobRecord | None,
         state: JobState = JobState.PENDING, webhook: str | None = None) -> JobOut:
    """The JSON view of a job from its record (None: not read yet, ``state`` says)."""
    if record is None:
        return JobOut(id=job_id, status=state, route=route, webhook=webhook)
    error = None
    if record.error is not None:
        error = ErrorOut(type=str(record.error.get("type", "Error")),
                         message=str(record.error.get("message", "")),
                         retryable=bool(record.error.get("retryable", False)))
    return JobOut(id=job_id, status=record.state, route=route, webhook=webhook,
                  result=jsonable(record.result) if record.state == JobState.SUCCESS else None,
                  error=error)


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text,
           "content": {"application/problem+json": {"schema": Problem.model_json_schema()}}}
    for code, text in ((401, "No or unknown API key"), (403, "Route not allowed for this key"),
                       (404, "No such job for this key"), (422, "Invalid request"),
                       (429, "Over the key's rate limit (see Retry-After)"),
                       (503, "No worker serves the route, or Redis is away (see Retry-After)"))
}
