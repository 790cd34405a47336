"""The gateway's ASGI app: the HTTP routes over :class:`~pipeq.gateway.service.GatewayService`.

``create_app(settings, keyring)`` builds it; ``keyring=None`` is ``--no-auth`` (every caller
is the anonymous key). Errors are RFC 9457 problem documents (:mod:`pipeq.gateway.problems`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipeq import __version__
from pipeq.core.config import Settings
from pipeq.gateway.auth import ANONYMOUS, ApiKey, KeyRing
from pipeq.gateway.delivery import Deliverer
from pipeq.gateway.metrics import Metrics
from pipeq.gateway.problems import HANDLERS, Problem
from pipeq.gateway.schemas import (
    PROBLEM_RESPONSES,
    Health,
    JobIn,
    JobOut,
    RouteOut,
    RoutesOut,
    view,
)
from pipeq.gateway.service import GatewayService
from pipeq.gateway.textstream import text_events

PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
#: Seconds between two SSE state polls, and between keep-alive comments.
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 15.0

router = APIRouter()


@dataclass
class Gateway:
    """What the endpoints share: settings, keys, the service and its metrics."""

    settings: Settings
    keyring: KeyRing | None
    service: GatewayService
    metrics: Metrics


def create_app(settings: Settings, keyring: KeyRing | None) -> FastAPI:
    """The gateway app for ``settings``; ``keyring=None`` means no authentication."""
    service = GatewayService(settings, keyring)
    deliverer = Deliverer(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(deliverer.run()) if settings.webhook_secret else None
        yield
        deliverer.stop()
        if task is not None:
            await asyncio.wait([task], timeout=5)

    app = FastAPI(title="pipeq gateway", version=__version__, lifespan=lifespan,
                  exception_handlers=HANDLERS, responses=PROBLEM_RESPONSES,
                  description="transformers.pipeline() as a job service: submit jobs, read "
                              "their results, cancel them; completion webhooks signed per "
                              "Standard Webhooks. Errors are RFC 9457 problem documents.")
    app.state.gateway = Gateway(settings, keyring, service, Metrics(service))
    app.include_router(router)
    return app


def gateway_of(request: Request) -> Gateway:
    """The app's shared state."""
    gateway: Gateway = request.app.state.gateway
    return gateway


#: ``Authorization: Bearer <secret>`` (in the OpenAPI document as the security scheme).
BEARER = HTTPBearer(auto_error=False, description="An API key of the gateway")


async def caller(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> ApiKey:
    """The API key of the request (401 without a known one), counted against its limit."""
    gw = gateway_of(request)
    if gw.keyring is None:
        key = ApiKey(ANONYMOUS, "", rate_limit_per_minute=10**9)
    else:
        found = gw.keyring.find(credentials.credentials) if credentials else None
        if found is None:
            raise Problem(401, "Unauthorized", "send a known API key as "
                          "'Authorization: Bearer <secret>'", "Unauthorized")
        key = found
    gw.metrics.count_request(key.name)
    if gw.keyring is not None:  # --no-auth (loopback only) has no limit to count
        await gw.service.rate_limit(key)
    return key


Caller = Annotated[ApiKey, Depends(caller)]
Wait = Annotated[float | None, Query(ge=0, le=3600, description=(
    "Seconds to wait for the job to end (also 'Prefer: wait=S'; capped by "
    "PIPEQ_GATEWAY_MAX_WAIT_S)"))]
Prefer = Annotated[str | None, Header(description="RFC 7240, e.g. 'wait=10'")]


def wait_of(gw: Gateway, wait: float | None, prefer: str | None) -> float:
    """The wait asked for by ``?wait=`` or ``Prefer: wait=``, capped by the setting."""
    if wait is None and prefer:
        match = PREFER_WAIT.search(prefer)
        wait = float(match.group(1)) if match else None
    return min(wait or 0.0, gw.settings.gateway_max_wait_s)


@router.post("/v1/jobs", status_code=202, response_model=JobOut,
             responses={200: {"model": JobOut, "description": "Ended within the wait"}})
async def submit_job(request: Request, body: JobIn, key: Caller, wait: Wait = None,
                     prefer: Prefer = None) -> Any:
    """Submit a job: 202 with its id (and Location); 200 with the result when it ends
    within ``?wait=S`` / ``Prefer: wait=S``."""
    gw = gateway_of(request)
    seconds = wait_of(gw, wait, prefer)
    job, final = await gw.service.submit(key, body, seconds)
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if seconds:
        headers["Preference-Applied"] = f"wait={seconds:g}"
    gw.metrics.count_submit(final)
    return JSONResponse(job.model_dump(mode="json"), status_code=200 if final else 202,
                        headers=headers)


@router.get("/v1/jobs/{job_id}", response_model=JobOut)
async def get_job(request: Request, job_id: str, key: Caller, wait: Wait = None,
                  prefer: Prefer = None) -> Any:
    """A job's state, and its result or error once it has ended."""
    gw = gateway_of(request)
    job, _ = await gw.service.get(key, job_id, wait_of(gw, wait, prefer))
    return job


@router.delete("/v1/jobs/{job_id}", response_model=JobOut)
async def cancel_job(request: Request, job_id: str, key: Caller) -> Any:
    """Cancel a job: a queued job never runs; a running one's result is discarded."""
    job, _ = await gateway_of(request).service.cancel(key, job_id)
    return job


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "Server-Sent Events: state changes, then result"}})
async def job_events(request: Request, job_id: str, key: Caller) -> StreamingResponse:
    """Server-Sent Events: a ``state`` event at each change, then ``result`` (the job)."""
    service = gateway_of(request).service
    route, webhook = await service.owned(key, job_id)
    return StreamingResponse(events(service, job_id, route, webhook),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


async def events(service: GatewayService, job_id: str, route: RouteOut,
                 webhook: str | None) -> AsyncIterator[str]:
    """The event stream of one job."""
    last, quiet = None, 0.0
    while True:
        record = await service.state(job_id)
        if record is None:
            yield sse("error", {"id": job_id, "pipeq_error": "JobNotFound"})
            return
        if record.state != last:
            last, quiet = record.state, 0.0
            yield sse("state", {"id": job_id, "status": record.state.value})
        if record.state.is_final:
            yield sse("result", view(job_id, route, record, webhook=webhook)
                      .model_dump(mode="json"))
            return
        await asyncio.sleep(SSE_POLL_S)
        quiet += SSE_POLL_S
        if quiet >= SSE_KEEPALIVE_S:
            quiet = 0.0
            yield ": keep-alive\n\n"


@router.get("/v1/jobs/{job_id}/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "Server-Sent Events: text pieces, then result"},
                       409: {"description": "The job was submitted without stream"}})
async def job_text(request: Request, job_id: str, key: Caller) -> StreamingResponse:
    """Server-Sent Events of a job submitted with ``"stream": true``: a ``text`` event per
    piece of generated text (``index``, ``seq``, ``text``), then ``result`` (the job)."""
    service = gateway_of(request).service
    route, webhook = await service.streaming(key, job_id)
    return StreamingResponse(text_events(service, job_id, route, webhook),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.get("/v1/routes", response_model=RoutesOut)
async def routes(request: Request, key: Caller) -> Any:
    """The routes this key may use: live workers, health, queue depth."""
    return RoutesOut(routes=await gateway_of(request).service.routes(key))


@router.get("/healthz", response_model=Health)
async def healthz() -> Any:
    """The gateway process is up (no Redis call)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health,
            responses={503: {"model": Health, "description": "Redis does not answer"}})
async def readyz(request: Request) -> Any:
    """Ready to serve: Redis answers (503 otherwise)."""
    problem = await gateway_of(request).service.ready()
    if problem is None:
        return Health(status="ready")
    return JSONResponse(Health(status="unavailable", detail=problem).model_dump(),
                        status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_text(request: Request) -> PlainTextResponse:
    """Prometheus metrics: requests, jobs, webhook outbox, deliveries, dead letters."""
    return PlainTextResponse(await gateway_of(request).metrics.render(),
                             media_type="text/plain; version=0.0.4")


def sse(event: str, data: Any) -> str:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
