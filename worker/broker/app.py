"""The worker's Celery app: the deployment's configuration, pipeq's transport and this
route's task."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, signals

from pipeq.core.celery_config import make_celery
from pipeq.core.config import Settings
from pipeq.worker.broker.transport import FAULTS_OPTION, PREFIX_OPTION, TRANSPORT_NAME
from pipeq.worker.service import RouteService


def build_app(settings: Settings, redis_url: str, service: RouteService) -> Celery:
    """A Celery app whose one task runs jobs of ``service``'s route."""
    app = make_celery(settings, redis_url)
    app.conf.broker_transport = TRANSPORT_NAME  # pipeq.worker.broker.transport
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options, PREFIX_OPTION: settings.queue_prefix,
        FAULTS_OPTION: settings.faults or ""}
    name = settings.keys.task_name(service.route)

    @app.task(name=name, bind=True, ignore_result=True, acks_late=True)
    def run_job(self: Task, request: Any = None, **unexpected: Any) -> dict[str, Any]:
        body = request if not unexpected else {"request": request, **unexpected}
        return service.handle(body, self.request.id)

    def on_unknown_task(name: str = "", id: str = "", message: Any = None, **_: Any) -> None:
        try:  # protocol 2 body: [args, kwargs, embed]
            body = message.payload[1].get("request")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            body = None
        if isinstance(id, str) and id:
            service.reject_unknown_task(id, name, body)

    signals.task_unknown.connect(on_unknown_task, weak=False)
    return app
