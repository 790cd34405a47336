"""Flower's credentials and the route totals a worker keeps between flushes (no services)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from pipeq.core.config import Settings
from pipeq.errors import ConfigError
from pipeq.ops.embedded import free_port
from pipeq.ops.exporter import DeploymentCollector
from pipeq.ops.flower import basic_auth
from pipeq.worker.ops.metrics import RouteTotals


@pytest.fixture(autouse=True)
def _no_flower_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PIPEQ_FLOWER_USER", "PIPEQ_FLOWER_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def settings(**values: str) -> Settings:
    return Settings(redis_url="redis://127.0.0.1:1/0", **values)  # type: ignore[arg-type]


def test_flower_uses_the_configured_credentials() -> None:
    configured = settings(flower_user="ops", flower_password="pa:ss")
    assert basic_auth(configured, insecure=False) == ["ops:pa:ss"]
    assert basic_auth(configured, insecure=True) == ["ops:pa:ss"]  # never weaker than asked


@pytest.mark.parametrize("values", [{}, {"flower_user": "ops"}, {"flower_password": "pw"}])
def test_flower_without_credentials_needs_insecure(values: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"PIPEQ_FLOWER_PASSWORD.*--insecure"):
        basic_auth(settings(**values), insecure=False)
    assert basic_auth(settings(**values), insecure=True) == []


def test_flower_user_cannot_contain_the_separator() -> None:
    with pytest.raises(ConfigError, match="must not contain ':'"):
        basic_auth(settings(flower_user="a:b", flower_password="pw"), insecure=False)


def test_route_totals_kept_after_a_failed_flush_add_up() -> None:
    kept = RouteTotals(inputs=3, batches=1, batch_capacity=8, inference_seconds=0.5)
    newer = RouteTotals(inputs=2, batches=2, batch_capacity=16, jobs_started=2,
                        queue_wait_seconds=0.25)
    assert RouteTotals().empty() and not newer.empty()
    newer.add(kept)
    assert newer == RouteTotals(inputs=5, batches=3, batch_capacity=24, inference_seconds=0.5,
                                jobs_started=2, queue_wait_seconds=0.25)


def test_exporter_says_when_redis_does_not_answer(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    collector = DeploymentCollector(
        Settings(redis_url=dead, routes_file=tmp_path / "none.toml"),  # type: ignore[arg-type]
        redis.Redis.from_url(dead, socket_connect_timeout=1, socket_timeout=1))
    families = list(collector.collect())
    assert [f.name for f in families] == ["pipeq_redis_up"]
    assert families[0].samples[0].value == 0
