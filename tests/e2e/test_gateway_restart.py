"""A webhook outlives a Redis crash: its outbox entry is in Redis, kept by the persistence of
``settings/redis.conf`` (AOF, fsync every second), and the gateway reconnects by itself.

This module runs its own redis-server on a fixed port and directory so that it can be
crashed (SIGKILL) and started again in place.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Deployment
from gateway_support import SECRET_A, WEBHOOK_SECRET, GatewayProcess, Receiver, curl
from redis_server import RedisServer
from standardwebhooks import Webhook
from tiny_models import build_text_model

TASK = "text-classification"
@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    yield redis_server
    redis_server.close()


def test_a_pending_webhook_survives_a_redis_crash(server: RedisServer, tmp_path: Path,
                                                  models_dir: Path) -> None:
    dep = Deployment(server.url, tmp_path, connect_timeout_s=2)
    receiver = Receiver()
    hooks = receiver.start()
    model = str(build_text_model(TASK, models_dir))
    gateway = None
    try:
        frozen = dep.start_worker(TASK, model)
        gateway = GatewayProcess(dep, env={
            "PIPEQ_GATEWAY_API_KEYS": f"key-a:{SECRET_A}", "PIPEQ_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "PIPEQ_WEBHOOK_ALLOW_PRIVATE": "true", "PIPEQ_WEBHOOK_BACKOFF_S": "0.3"}
        ).wait_ready()
        frozen.proc.send_signal(signal.SIGSTOP)  # its heartbeat still counts for a moment
        reply = curl(gateway.url + "/v1/jobs", "POST", {
            "task": TASK, "model": model, "inputs": "through a crash",
            "webhook": hooks + "/crash"})
        assert reply.status == 202, reply.text
        job = reply.json()
        time.sleep(1.5)  # appendfsync everysec: what is older than a second is on disk
        server.stop(signal.SIGKILL)
        frozen.proc.kill()
        frozen.stop()
        server.start()
        dep.start_worker(TASK, model)
        (delivery,) = receiver.wait_for("/crash", 1, timeout=120)
        event = Webhook(WEBHOOK_SECRET).verify(delivery.body, delivery.headers)
        assert event["data"]["id"] == job["id"] and event["data"]["status"] == "SUCCESS"
    finally:
        if gateway is not None:
            gateway.stop()
        receiver.server.shutdown()
        dep.close()
