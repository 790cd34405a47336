"""The worker's Celery app: the deployment's configuration, pipeq's transport, and this
route's task, whose messages go straight to the route service (``broker.strategy``)."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from pipeq.core.celery_config import make_celery
from pipeq.core.config import Settings
from pipeq.core.sentinel import is_sentinel_url
from pipeq.worker.broker.events import CeleryBridge
from pipeq.worker.broker.strategy import LoopSettler, job_strategy
from pipeq.worker.broker.transport import (
    CLAIM_START_OPTION,
    FAULTS_OPTION,
    HOLDER_OPTION,
    PREFIX_OPTION,
    SENTINEL_TRANSPORT_NAME,
    TRANSPORT_NAME,
)
from pipeq.worker.service import RouteService


def build_app(settings: Settings, redis_url: str, service: RouteService, settler: LoopSettler,
              bridge: CeleryBridge) -> Celery:
    """A Celery app whose one task is the route's; its messages reach ``service``."""
    app = make_celery(settings, redis_url)
    app.conf.broker_transport = TRANSPORT_NAME  # pipeq.worker.broker.transport
    if is_sentinel_url(redis_url):
        # One URL, not kombu's ";"-joined list: on a connection error kombu switches to the
        # next URL of the list and takes its scheme for the transport, which would swap
        # pipeq's transport for kombu's own. The sentinels travel in a transport option.
        app.conf.broker_transport = SENTINEL_TRANSPORT_NAME
        app.conf.broker_url = app.conf.broker_url.split(";")[0]
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options, PREFIX_OPTION: settings.queue_prefix,
        FAULTS_OPTION: settings.faults or "", HOLDER_OPTION: service.hostname,
        CLAIM_START_OPTION: {"task": settings.keys.task_name(service.route),
                             "ttl_s": settings.result_ttl_s}}

    def never_runs(**_: Any) -> None:
        """Jobs run in pipeq's batcher, never as a Celery task body (see broker.strategy)."""
        raise RuntimeError("pipeq jobs are not run by Celery's pool")

    app.task(name=settings.keys.task_name(service.route), ignore_result=True,
             Strategy=staticmethod(job_strategy(service, settler, bridge)))(never_runs)

    def on_unknown_task(name: str = "", id: str = "", message: Any = None, **_: Any) -> None:
        try:  # protocol 2 body: [args, kwargs, embed]
            body = message.payload[1].get("request")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            body = None
        if isinstance(id, str) and id:
            served = settings.keys.task_name(service.route)
            service.reject(id, f"no route {name!r} on this queue: its worker serves "
                           f"{service.route.describe()} as {served!r}", body, None)

    signals.task_unknown.connect(on_unknown_task, weak=False)
    return app
