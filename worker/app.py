"""The worker's Celery app: the shared configuration plus this route's task."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from celery import Celery, Task, signals

from producer.celery_app import make_celery
from producer.config import Settings

from .claiming import ClaimHook
from .service import RouteService
from .transport import dead_lettering_transport


def build_app(settings: Settings, redis_url: str, service: RouteService,
              on_claimed: ClaimHook | None = None) -> Celery:
    """A Celery app whose one task runs jobs of ``service``'s route.

    ``on_claimed``: called with each message taken off the queue (fault injection).
    """
    app = make_celery(settings, redis_url)
    # A queue item that is not a kombu message must not stop the worker (worker/transport.py).
    scheme = urlsplit(redis_url).scheme or "redis"
    app.conf.broker_transport = dead_lettering_transport(service.dead_letters, scheme,
                                                          on_claimed)
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
