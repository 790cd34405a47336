"""Gateway rows of ``make bench``: what HTTP adds over the Python client, same route, same run.

- light load: one request at a time, the Python client and ``POST /v1/jobs?wait=`` taken in
  turns (so both see the same machine); the gateway's added p50 (goal <= 2 ms);
- throughput: 200 concurrent HTTP clients (closed loop, keep-alive connections) against 200
  Python client threads on the same worker (goal >= 0.9x).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from typing import Any

import httpx

from benchmarks.common import ROOT, Setup, concurrent, percentile, pipeq_worker, row

TASK = "text-classification"
LABEL = "gateway, text-classification (MiniLM)"
CLIENTS = 200


def gateway_rows(setup: Setup, model: str, texts: list[str]) -> list[dict[str, Any]]:
    """Light-load latency and 200-client throughput, gateway against the Python client."""
    with pipeq_worker(setup, TASK, model) as remote:
        remote(texts[:16])
        secret = secrets.token_hex(24)
        gateway = start_gateway(setup, remote.client.settings.queue_prefix, secret)
        url = f"http://127.0.0.1:{gateway[1]}/v1/jobs?wait=60"
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"task": TASK, "model": model}
        try:
            with httpx.Client(headers=headers, timeout=120) as http:
                http.post(url, json={**body, "inputs": texts[0]}).raise_for_status()
                rows = [light_rows(remote, http, url, body, texts[:200])]
            seconds, lat = concurrent(texts, CLIENTS, lambda t: remote(t))
            python = row(f"{LABEL}: Python client, {CLIENTS} threads", len(texts), seconds, lat)
            seconds, lat = asyncio.run(http_clients(url, headers, body, texts))
            http_row = row(f"{LABEL}: HTTP, {CLIENTS} concurrent clients", len(texts), seconds,
                           lat)
            http_row["x_python_client"] = round(http_row["req_per_s"] / python["req_per_s"], 2)
            rows += [python, http_row]
        finally:
            gateway[0].terminate()
            gateway[0].wait(30)
    for r in rows:
        r["x_limit"] = ""
    return rows


def light_rows(remote: Any, http: httpx.Client, url: str, body: dict[str, Any],
               texts: list[str]) -> dict[str, Any]:
    """One request at a time, Python client and gateway in turns; the gateway's row."""
    python_lat, http_lat = [], []
    for text in texts:
        t0 = time.perf_counter()
        remote(text)
        python_lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reply = http.post(url, json={**body, "inputs": text})
        http_lat.append(time.perf_counter() - t0)
        assert reply.status_code == 200, reply.text
    added = 1000 * (percentile(http_lat, 50) - percentile(python_lat, 50))
    return row(f"{LABEL}: HTTP light load (1 at a time)", len(texts), sum(http_lat), http_lat,
               added_p50_ms=round(added, 2),
               python_p50_ms=round(1000 * percentile(python_lat, 50), 2))


async def http_clients(url: str, headers: dict[str, str], body: dict[str, Any],
                       texts: list[str]) -> tuple[float, list[float]]:
    """``CLIENTS`` closed-loop HTTP clients over ``texts``; wall time and latencies."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    latencies: list[float] = []
    async with httpx.AsyncClient(headers=headers, timeout=300, limits=limits) as http:
        async def client(share: list[str]) -> None:
            for text in share:
                t0 = time.perf_counter()
                reply = await http.post(url, json={**body, "inputs": text})
                latencies.append(time.perf_counter() - t0)
                assert reply.status_code == 200, reply.text

        started = time.perf_counter()
        await asyncio.gather(*(client(texts[i::CLIENTS]) for i in range(CLIENTS)))
        return time.perf_counter() - started, latencies


def start_gateway(setup: Setup, prefix: str, secret: str) -> tuple[subprocess.Popen[bytes], int]:
    """``pipeq gateway`` on the worker's deployment; waits for /healthz."""
    from pipeq.ops.embedded import free_port

    port = free_port()
    env = dict(os.environ, PIPEQ_REDIS_URL=setup.redis_url, PIPEQ_QUEUE_PREFIX=prefix,
               PIPEQ_ROUTES_FILE=str(setup.workdir / "none.toml"), PIPEQ_LOG_LEVEL="WARNING",
               PIPEQ_GATEWAY_API_KEYS=f"bench:{secret}",
               PIPEQ_GATEWAY_RATE_LIMIT_PER_MINUTE=str(10**9))
    log = open(setup.workdir / f"gateway-{port}.log", "wb")  # noqa: SIM115 - with the process
    proc = subprocess.Popen([sys.executable, "-P", "-m", "pipeq", "gateway", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"gateway did not start: see {setup.workdir}/gateway-{port}.log")
