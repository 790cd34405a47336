"""The Celery configuration of a deployment, built once from Settings.

Workers build their app from it (adding their route's task and pipeq's transport), and so
do Flower, ``celery -A`` and ``celery inspect``: every key Celery writes lives under the
deployment's prefix, and a tool started with a bare ``--broker`` URL would see nothing.
Producers do not need Celery to publish (``pipeq.core.publish``). Job records are not Celery
results: pipeq stores them itself (``pipeq.core.store``), a whole batch in one Redis round
trip, so Celery's per-task result backend is off.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import quote, urlsplit

from celery import Celery

from pipeq.core.config import Settings
from pipeq.core.redis_io import sentinel_options
from pipeq.core.sentinel import is_sentinel_url, parse_sentinel_url

_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def celery_config(settings: Settings, redis_url: str) -> dict[str, Any]:
    """Celery settings that make the safe path the default (see ARCHITECTURE.md)."""
    transport = {
        # Redis has no acks: a message a dead worker held comes back after this long.
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 10,
        # Every key Celery writes (queues, unacked, bindings, events) lives under our prefix:
        # deployments sharing one Redis database stay apart.
        "global_keyprefix": settings.keys.broker_prefix,
        # Look for messages of dead workers often (cheap: one ZRANGE under a mutex), so they
        # come back soon after the visibility timeout rather than up to 100 s later.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
        # The restore sweep holds a Redis mutex for a few ms; kombu lets it expire after 300 s,
        # so a worker killed while holding it stopped every restore for 5 minutes (seen as a
        # flaky fault test). Concurrent sweeps are safe anyway (each restore is a WATCH
        # transaction on the unacked hash).
        "unacked_mutex_expire": 10,
        # pipeq sends no message priorities: one list per queue (kombu's default keeps four,
        # and a worker would watch all of them).
        "priority_steps": [0],
    }
    broker_url, sentinel_options = broker_connection(settings, redis_url)
    transport.update(sentinel_options)
    config: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "result_backend": None,
        "task_ignore_result": True,
        # JSON only: a pickled message is code execution on the worker.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # Ack after the job's record is stored; a killed worker's jobs are redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        # Each worker thread holds one message; the batcher, not prefetch, forms batches.
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": settings.events,
        # Not the producer's task-sent event: it doubles the Redis writes of every submit
        # (measured: 1.8 -> 1.05 ms per submit) and Flower lists a job from the worker's
        # task-received event anyway.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_create_missing_queues": True,
        "enable_utc": True,
    }
    if redis_url.startswith("rediss://") or (is_sentinel_url(redis_url) and settings.sentinel_tls):
        tls = {"ssl_cert_reqs": _CERT_REQS[settings.redis_ssl_cert_reqs]}
        config["broker_use_ssl"] = tls
    return config


#: The transport option listing the sentinels as [host, port] pairs (read by pipeq's worker
#: transport, which is given one URL: see ``pipeq.worker.broker.transport``).
SENTINELS_OPTION = "pipeq_sentinels"


def broker_connection(settings: Settings, redis_url: str) -> tuple[str, dict[str, Any]]:
    """kombu's broker URL for ``redis_url`` and the transport options it needs.

    A ``sentinel://h1,h2/0?master=NAME`` URL becomes kombu's form, one ``sentinel://`` URL per
    sentinel joined by ``;`` with the master's name and the sentinels' password as transport
    options. PIPEQ_REDIS_PASSWORD goes into the URL where it carries none (kombu reads the
    password from the URL only).
    """
    password = settings.redis_password_value()
    if not is_sentinel_url(redis_url):
        parts = urlsplit(redis_url)
        if password and parts.scheme in ("redis", "rediss") and "@" not in parts.netloc:
            redis_url = parts._replace(netloc=f":{quote(password, safe='')}@{parts.netloc}"
                                       ).geturl()
        return redis_url, {}
    target = parse_sentinel_url(redis_url)
    # The sentinels' options as pipeq's own clients use them (the Redis servers' come from
    # the URL and broker_use_ssl).
    sentinel_kwargs, _ = sentinel_options(
        password=password, sentinel_password=settings.sentinel_password_value(),
        tls=settings.sentinel_tls, ssl_cert_reqs=settings.redis_ssl_cert_reqs,
        connect_timeout_s=settings.connect_timeout_s, socket_timeout_s=None)
    options = {"master_name": target.master, "sentinel_kwargs": sentinel_kwargs,
               SENTINELS_OPTION: [[host, port] for host, port in target.sentinels]}
    return ";".join(target.kombu_urls(password)), options


def make_celery(settings: Settings, redis_url: str | None = None) -> Celery:
    """A Celery app for this deployment (``redis_url`` defaults to the settings')."""
    app = Celery("pipeq", set_as_current=False)
    url = redis_url or settings.redis_url_value()
    app.conf.update(celery_config(settings, url))
    return app
