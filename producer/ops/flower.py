"""``pipeq flower``: Flower on this deployment's Celery app, behind basic auth.

Flower must use the same Celery configuration as the workers: kombu's ``global_keyprefix``
(set in ``pipeq.core.celery_config``) puts every broker key, event and control message under the
deployment's prefix, and a Flower started with a bare ``--broker`` URL would listen on the
unprefixed names and see nothing. So Flower is built here from ``make_celery(settings)``
rather than from the ``celery flower`` command line.

Flower's Broker page lists the queues its workers consume, with their depth. pipeq's page
lists every route's queues, both lanes, including routes no live worker serves (found as
``pipeq status`` finds them): jobs waiting for a route nobody serves are the ones to see.
Flower has no queue-depth metric; alert on ``pipeq metrics``' ``pipeq_queue_depth``.

Flower (the ``monitor`` extra) is imported only when the command runs: producers stay light.
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any

from pipeq.core.config import Settings
from pipeq.core.secrets import mask_url
from pipeq.core.sentinel import is_sentinel_url
from pipeq.errors import ConfigError

log = logging.getLogger("pipeq.flower")

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True, slots=True)
class FlowerOptions:
    """Where Flower listens and whether it may run without credentials."""

    port: int = 5555
    address: str = "0.0.0.0"
    insecure: bool = False


def basic_auth(settings: Settings, insecure: bool) -> list[str]:
    """Flower's ``basic_auth`` entries ("user:password"); [] only when ``insecure``.

    Raises ConfigError when credentials are missing and ``insecure`` was not asked for:
    Flower shows task arguments and can shut workers down, so it never runs open by accident.
    """
    user = settings.flower_user or ""
    password = settings.flower_password.get_secret_value() if settings.flower_password else ""
    if user and password:
        if ":" in user:
            raise ConfigError("PIPEQ_FLOWER_USER must not contain ':' (basic auth separator)")
        return [f"{user}:{password}"]
    if insecure:
        return []
    raise ConfigError(
        "Flower needs credentials: set PIPEQ_FLOWER_USER and PIPEQ_FLOWER_PASSWORD "
        "(or pass --insecure to run it without authentication)"
    )


def build_flower(settings: Settings, opts: FlowerOptions) -> Any:
    """A Flower application on this deployment's Celery app (not yet listening)."""
    auth = basic_auth(settings, opts.insecure)
    try:
        from flower.app import Flower
        from flower.options import options as flower_options
        from flower.urls import settings as flower_settings
    except ImportError:
        raise ConfigError(
            "pipeq flower needs the monitor extra: pip install 'pipeq[monitor]'"
        ) from None
    from pipeq.core.celery_config import make_celery

    app = make_celery(settings)
    # Flower reads its options from tornado's global option set; set only what we manage.
    flower_options.port = opts.port
    flower_options.address = opts.address
    flower_options.basic_auth = auth
    # One access line per request (the dashboard polls) drowns the log; errors still show.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    flower_app = Flower(capp=app, options=flower_options, **flower_settings)
    _show_route_queues(flower_app, settings)
    return flower_app


def route_queue_names(settings: Settings) -> list[str]:
    """The queues (both lanes) of every route ``pipeq status`` knows of, by name."""
    from pipeq.core.keys import LANES
    from pipeq.core.redis_io import connect
    from pipeq.ops.status import deployment_status

    client = connect(settings, connect_timeout_s=2, socket_timeout_s=2)
    try:
        return [settings.keys.queue_for(status.route, lane)
                for status in deployment_status(settings, client) for lane in LANES]
    finally:
        client.close()


def async_sentinel_client(settings: Settings) -> Any:
    """An asyncio client (Flower's kind) of the master the deployment's sentinels name,
    asking each sentinel in turn, with the sentinels' password and TLS settings."""
    from pipeq.core.redis_io import async_connect

    return async_connect(settings, connect_timeout_s=2, socket_timeout_s=2)


def _show_route_queues(flower_app: Any, settings: Settings) -> None:
    """Serve Flower's Broker page with every route's queues added to its workers' ones."""
    from flower.views.broker import BrokerView
    from tornado.routing import PathMatches, Rule

    sentinel = is_sentinel_url(settings.redis_url_value())

    class RouteQueuesBrokerView(BrokerView):
        """Flower's Broker page, listing every route queue of the deployment too."""

        def get_broker(self) -> Any:
            broker = super().get_broker()
            if sentinel:
                # Flower's own Sentinel client asks only the first sentinel of the URL.
                broker.redis = async_sentinel_client(settings)
            return broker

        def get_active_queue_names(self) -> list[str]:
            names = set(super().get_active_queue_names())
            try:
                names.update(route_queue_names(settings))
            except Exception as exc:  # Redis away: the page shows what Flower knows
                log.warning("cannot list the route queues: %s", exc)
            return sorted(names)

    # Tornado takes the first rule that matches: ours goes before Flower's own.
    flower_app.wildcard_router.rules.insert(
        0, Rule(PathMatches(r"/broker"), RouteQueuesBrokerView, name="broker"))


def run_flower(settings: Settings, opts: FlowerOptions) -> int:
    """Serve Flower until SIGTERM or SIGINT; returns the process exit code."""
    flower_app = build_flower(settings, opts)
    if not flower_app.options.basic_auth:
        log.warning("Flower runs WITHOUT authentication (--insecure)%s",
                    "" if opts.address in _LOOPBACK else
                    f" on {opts.address}: anyone who reaches this port can control workers")
    try:
        port = flower_app.start_http_server()
    except OSError as exc:
        print(f"pipeq flower: cannot listen on {opts.address}:{opts.port}: {exc}",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_signal)
    log.info("pipeq flower listening on http://%s:%d/ (%s), Redis at %s",
             opts.address or "0.0.0.0", port,
             "basic auth" if flower_app.options.basic_auth else "NO AUTH",
             mask_url(settings.redis_url_value()))
    try:
        flower_app.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower_app.stop()
    log.info("pipeq flower stopped")
    return 0


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    # Raised inside the event loop's wait; run_flower catches it and stops Flower cleanly.
    raise SystemExit(0)
