"""Flower's credentials and the route totals a worker keeps between flushes (no services)."""

from __future__ import annotations

import pytest

from producer.config import Settings
from producer.errors import ConfigError
from producer.metrics import RouteTotals
from producer.monitor import basic_auth


def settings(**values: str) -> Settings:
    return Settings(redis_url="redis://127.0.0.1:1/0", **values)  # type: ignore[arg-type]


def test_flower_uses_the_configured_credentials() -> None:
    configured = settings(flower_user="ops", flower_password="pa:ss")
    assert basic_auth(configured, insecure=False) == ["ops:pa:ss"]
    assert basic_auth(configured, insecure=True) == ["ops:pa:ss"]  # never weaker than asked


@pytest.mark.parametrize("values", [{}, {"flower_user": "ops"}, {"flower_password": "pw"}])
def test_flower_without_credentials_needs_insecure(values: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="PIPEQ_FLOWER_PASSWORD.*--insecure"):
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
