"""The gateway's Prometheus metrics, in the text exposition format.

Request and job counts are this process's; webhook figures are the deployment's (read from
Redis, shared by every replica).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeq.gateway.service import GatewayService


class Metrics:
    """Counters of one gateway process."""

    def __init__(self, service: GatewayService):
        self.service = service
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._submits: Counter[str] = Counter()

    def count_request(self, key_name: str) -> None:
        """One authenticated request of ``key_name``."""
        with self._lock:
            self._requests[key_name] += 1

    def count_submit(self, final: bool) -> None:
        """One job submitted (``final``: answered with its result within the wait)."""
        with self._lock:
            self._submits["inline" if final else "accepted"] += 1

    async def render(self) -> str:
        """The metrics page."""
        with self._lock:
            requests, submits = dict(self._requests), dict(self._submits)
        outbox = self.service.outbox
        try:
            depth, dead, stats = await self.service.redis(
                lambda: (outbox.depth(), outbox.dead_count(), outbox.stats()))
        except Exception:  # Redis away: the process's own figures still show
            depth, dead, stats = None, None, {}
        lines = ["# HELP pipeq_gateway_requests_total Authenticated requests, by API key.",
                 "# TYPE pipeq_gateway_requests_total counter"]
        lines += [f'pipeq_gateway_requests_total{{key="{k}"}} {v}' for k, v in
                  sorted(requests.items())]
        lines += ["# HELP pipeq_gateway_jobs_submitted_total Jobs submitted, by how answered.",
                  "# TYPE pipeq_gateway_jobs_submitted_total counter"]
        lines += [f'pipeq_gateway_jobs_submitted_total{{answer="{k}"}} {v}' for k, v in
                  sorted(submits.items())]
        if depth is not None:
            lines += ["# HELP pipeq_webhooks_pending Webhooks not yet delivered.",
                      "# TYPE pipeq_webhooks_pending gauge", f"pipeq_webhooks_pending {depth}",
                      "# HELP pipeq_webhooks_dead Webhooks given up on (dead-lettered).",
                      "# TYPE pipeq_webhooks_dead gauge", f"pipeq_webhooks_dead {dead}"]
        for name in ("delivered", "attempts", "failed_attempts"):
            lines += [f"# TYPE pipeq_webhooks_{name}_total counter",
                      f"pipeq_webhooks_{name}_total {stats.get(name, 0)}"]
        return "\n".join(lines) + "\n"
