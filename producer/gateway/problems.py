"""Errors as RFC 9457 ``application/problem+json``, carrying the pipeq error type.

Every error a request can meet becomes a problem document with ``type``, ``title``,
``status``, ``detail`` and ``pipeq_error`` (the class name of the error in
``pipeq.errors``, so clients of any language can branch on it). Nothing a caller sends
turns into a 500: unexpected failures are logged with their traceback and answered 503.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from pipeq.errors import (
    BrokerUnavailable,
    JobNotFound,
    NoWorkerError,
    PipeqError,
    ValidationError,
)

log = logging.getLogger("pipeq.gateway")

PROBLEM_JSON = "application/problem+json"
#: ``type`` URIs of the problems (documented in the README's gateway section).
TYPE_BASE = "https://pipeq.dev/problems/"


class Problem(Exception):
    """Raised inside the gateway to answer with a problem document."""

    def __init__(self, status: int, title: str, detail: str, error: str,
                 retry_after: float | None = None, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(detail)
        self.headers = dict(headers or {})
        self.status = status
        self.title = title
        self.detail = detail
        self.error = error
        self.retry_after = retry_after
        self.extra = extra

    def response(self, instance: str | None = None) -> JSONResponse:
        """The problem+json response."""
        body: dict[str, Any] = {
            "type": TYPE_BASE + self.error, "title": self.title, "status": self.status,
            "detail": self.detail, "pipeq_error": self.error, **self.extra}
        if instance:
            body["instance"] = instance
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(self.retry_after + 0.999)))
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="pipeq"'
        return JSONResponse(body, status_code=self.status, headers=headers,
                            media_type=PROBLEM_JSON)


def from_error(error: PipeqError) -> Problem:
    """The problem answering a pipeq error."""
    name = type(error).__name__
    if isinstance(error, ValidationError):
        return Problem(422, "Invalid request", str(error), name)
    if isinstance(error, JobNotFound):
        return Problem(404, "No such job", str(error), name)
    if isinstance(error, NoWorkerError):
        return Problem(503, "No worker serves the route", str(error), name, retry_after=5)
    if isinstance(error, BrokerUnavailable):
        return Problem(503, "Redis unavailable", str(error), name, retry_after=5)
    return Problem(503, "pipeq error", str(error), name, retry_after=5)


def not_found(job_id: str) -> Problem:
    """404 for a job that does not exist or belongs to another API key (indistinguishable)."""
    return Problem(404, "No such job", f"no job {job_id} for this API key: never submitted "
                   "with it, or its record expired", "JobNotFound")


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


async def on_problem(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: a raised Problem."""
    assert isinstance(exc, Problem)
    return exc.response(request.url.path)


async def on_pipeq_error(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: a pipeq error escaping an endpoint."""
    assert isinstance(exc, PipeqError)
    problem = from_error(exc)
    log.info("%s %s: %s", request.method, request.url.path, exc)
    return problem.response(request.url.path)


async def on_validation(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: a request FastAPI could not parse (body, query, headers)."""
    assert isinstance(exc, RequestValidationError)
    return Problem(422, "Invalid request", _validation_detail(exc), "ValidationError"
                   ).response(request.url.path)


async def on_http(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: Starlette's own HTTP errors (404 path, 405 method, ...)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:  # a body that is not even text (not UTF-8): bad input
        return Problem(422, "Invalid request", f"the request body cannot be read: "
                       f"{exc.detail}; send UTF-8 JSON", "ValidationError"
                       ).response(request.url.path)
    error = "NotFound" if exc.status_code == 404 else "HTTPError"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # every method of the path, not only its first route's
        headers["Allow"] = ", ".join(allowed_methods(request))
    return Problem(exc.status_code, str(exc.detail), f"{request.method} {request.url.path}: "
                   f"{exc.detail}", error, headers=headers).response(request.url.path)


def allowed_methods(request: Request) -> list[str]:
    """The methods the app serves on the request's path (GET and DELETE are two routes)."""
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: anything else. Logged with its traceback; 503, never a 500."""
    log.exception("%s %s failed unexpectedly", request.method, request.url.path)
    return Problem(503, "Gateway error", f"the gateway failed unexpectedly "
                   f"({type(exc).__name__}); it was logged. Retry later", "GatewayError",
                   retry_after=5).response(request.url.path)


HANDLERS: dict[Any, Any] = {
    Problem: on_problem,
    PipeqError: on_pipeq_error,
    RequestValidationError: on_validation,
    HTTPException: on_http,
    Exception: on_unexpected,
}
