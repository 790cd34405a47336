"""Gateway rows of ``make bench``: what HTTP adds over the Python client, same route, same run.

- light load: one request at a time, the Python client and ``POST /v1/jobs?wait=`` taken in
  turns (so both see the same machine); the gateway's added p50 (goal <= 2 ms);
- throughput: 200 concurrent HTTP clients (closed loop, keep-alive connections) against 200
  Python client threads on the same worker (goal >= 0.9x).

The HTTP clients are a minimal asyncio HTTP/1.1 client (``Connection``): on a 2-core machine
the load generator shares the cores with what it measures, and must not be the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
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
        target = Target(gateway[1], f"Bearer {secret}", model)
        try:
            rows = [asyncio.run(light_row(remote, target, texts[:200]))]
            seconds, lat = concurrent(texts, CLIENTS, lambda t: remote(t))
            python = row(f"{LABEL}: Python client, {CLIENTS} threads", len(texts), seconds, lat)
            seconds, lat = asyncio.run(http_clients(target, texts))
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


@dataclass(frozen=True)
class Target:
    """Where the clients send ``POST /v1/jobs?wait=60``, with which key, for which model."""

    port: int
    authorization: str
    model: str

    def request(self, text: str) -> bytes:
        """One HTTP/1.1 request (keep-alive) submitting ``text`` and waiting for its result."""
        body = json.dumps({"task": TASK, "model": self.model, "inputs": text}).encode()
        head = (f"POST /v1/jobs?wait=60 HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: {self.authorization}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection (asyncio streams).

    The load generator runs on the same 2 cores as the gateway, the worker and Redis, so it
    must cost little: httpx's AsyncClient took ~12 ms of CPU per request at 200 connections
    (measured from /proc), six times the gateway's own, and made the client the bottleneck.
    """

    def __init__(self, target: Target):
        self.target = target
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, text: str) -> tuple[int, bytes]:
        """Submit ``text``; the reply's status and body."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.target.port)
        assert self.reader is not None
        self.writer.write(self.target.request(text))
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        """Close the connection."""
        if self.writer is not None:
            self.writer.close()


async def light_row(remote: Any, target: Target, texts: list[str]) -> dict[str, Any]:
    """One request at a time, the Python client and the gateway in turns; the gateway's row."""
    python_lat, http_lat = [], []
    http = Connection(target)
    status, reply = await http.post(texts[0])
    assert status == 200, reply
    for text in texts:
        t0 = time.perf_counter()
        remote(text)  # blocking, and alone: nothing else runs on this loop meanwhile
        python_lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        status, reply = await http.post(text)
        http_lat.append(time.perf_counter() - t0)
        assert status == 200, reply
    http.close()
    added = 1000 * (percentile(http_lat, 50) - percentile(python_lat, 50))
    return row(f"{LABEL}: HTTP light load (1 at a time)", len(texts), sum(http_lat), http_lat,
               added_p50_ms=round(added, 2),
               python_p50_ms=round(1000 * percentile(python_lat, 50), 2))


async def http_clients(target: Target, texts: list[str]) -> tuple[float, list[float]]:
    """``CLIENTS`` closed-loop HTTP clients over ``texts``, each on its own keep-alive
    connection; wall time and latencies."""
    latencies: list[float] = []

    async def client(share: list[str]) -> None:
        http = Connection(target)
        try:
            for text in share:
                t0 = time.perf_counter()
                status, reply = await http.post(text)
                latencies.append(time.perf_counter() - t0)
                assert status == 200, reply
        finally:
            http.close()

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
