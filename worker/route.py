"""Assembling one route's job path: service, batcher, runners and middleware.

``serve`` (a real worker) and ``pipeq.worker.testing`` (the in-process harness of the tests)
build the route's parts with the same function, so the harness runs exactly the job path a
worker runs, minus Celery and the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis

from pipeq.core.config import RouteSpec, Settings
from pipeq.core.store import JobStore
from pipeq.worker.batching.batcher import GATHER_CALLS, BatchPolicy, MicroBatcher
from pipeq.worker.hooks import Hooks, Middleware
from pipeq.worker.model.fetch import parse_networks
from pipeq.worker.model.instances import core_share
from pipeq.worker.model.media import MediaPolicy
from pipeq.worker.model.runner import PipelineRunner
from pipeq.worker.redis_guard import RedisGuard
from pipeq.worker.service import RouteService

if TYPE_CHECKING:
    from pipeq.worker.batching.textstreams import Streams
    from pipeq.worker.model.generation import ContinuousEngine


def assemble(spec: RouteSpec, settings: Settings, client: redis.Redis, hostname: str,
             runners: Sequence[PipelineRunner], *, call_overhead: float | None = None,
             middleware: Sequence[Middleware] = (), engine: ContinuousEngine | None = None,
             streams: Streams | None = None) -> RouteService:
    """The route's service, with its batcher attached (not yet started).

    ``engine``: a started continuous batching engine (``batching = "continuous"`` routes that
    it serves); the static batcher then runs only the jobs it cannot honour. ``streams``:
    where continuous jobs' text goes as it grows (``batching.textstreams``; default: the
    jobs' Redis streams).
    """
    hooks = Hooks(middleware)
    store = JobStore(client, settings.keys, settings.result_ttl_s)
    media = media_policy(spec, settings)
    service = RouteService(spec.route, settings, store, hostname, media=media, hooks=hooks,
                           run_timeout_s=spec.timeout_s, guard=RedisGuard())
    policy = BatchPolicy(spec.max_batch_size, spec.max_wait_ms, spec.max_batch_tokens,
                         call_overhead, settings.max_retries, settings.retry_backoff_s)
    if engine is None:
        service.attach(MicroBatcher(runners, policy, service, hooks, cores=core_share(runners)))
    else:
        from pipeq.worker.batching.continuous import ContinuousBatcher, ExclusiveRunner
        from pipeq.worker.batching.textstreams import JobTextStreams

        # The static path's calls and the loop's steps take turns on the model.
        exclusive = [ExclusiveRunner(runner, engine) for runner in runners]
        static = MicroBatcher(exclusive, policy, service, hooks)
        streams = streams or JobTextStreams(engine.tokenizer)
        service.attach(ContinuousBatcher(engine, static, service, hooks, streams))
    return service


def media_policy(spec: RouteSpec, settings: Settings) -> MediaPolicy:
    """What the route's media inputs may cost (payload, pixels, audio, URL fetches)."""
    return MediaPolicy(spec.allow_urls, spec.max_payload_bytes or settings.max_payload_bytes,
                       max_image_pixels=settings.max_image_pixels,
                       max_decoded_pixels=settings.max_decoded_pixels,
                       max_audio_seconds=settings.max_audio_seconds,
                       url_deadline_s=settings.url_fetch_timeout_s,
                       url_allow_networks=parse_networks(settings.url_allow_networks))


def prefetch_limit(spec: RouteSpec, instances: int) -> int:
    """How many messages a worker of ``spec`` holds at once: enough for a gather per model
    instance (the batcher's unit of sorting and planning), no more, so that several workers
    of a route share a queue instead of one hoarding it."""
    return GATHER_CALLS * spec.max_batch_size * max(1, instances)
