"""Open loop: requests arriving at random (Poisson) at rising rates, as from a web app.

Closed-loop producers wait for each answer before asking again, so they never overload a
server; real traffic does not wait. Each rate is a fraction of the workload's in-process
limit; requests arrive with exponential gaps, each is sent at its arrival time from a large
thread pool, and its latency counts from its arrival. Reported: p50/p99 per rate, and the
highest rate whose p99 stays under the target (100 ms), to a tenth of the limit (steps of
0.2 could not tell 0.2x from 0.39x).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import percentile, row

P99_TARGET_S = 0.100
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def open_loop_rows(remote: Any, texts: list[str], limit_rps: float, label: str,
                   duration_s: float = 6.0, seed: int = 0) -> list[dict[str, Any]]:
    """One row per rate, and a summary row with the highest rate meeting the p99 target
    (it and every lower rate: a miss below it means the rate is not sustained)."""
    rows = []
    best = 0.0
    missed = False
    for fraction in FRACTIONS:
        rate = fraction * limit_rps
        latencies, seconds = _run(remote, texts, rate, duration_s, random.Random(seed))
        met = percentile(latencies, 99) < P99_TARGET_S
        rows.append(row(f"{label}: open loop at {fraction:.1f}x limit ({rate:.0f} req/s)",
                        len(latencies), seconds, latencies, offered_fraction=fraction,
                        p99_under_target=met))
        if met and not missed:
            best = fraction
        missed = missed or not met
    summary = {"row": f"{label}: open loop, highest rate with p99 < "
                      f"{1000 * P99_TARGET_S:.0f} ms", "x_limit": best,
               "req_per_s": round(best * limit_rps, 1)}
    return [*rows, summary]


def _run(remote: Any, texts: list[str], rate: float, duration_s: float, rng: random.Random
         ) -> tuple[list[float], float]:
    arrivals = []
    t = 0.0
    while t < duration_s:
        t += rng.expovariate(rate)
        arrivals.append(t)
    latencies: list[float] = []
    lock = threading.Lock()

    def send(text: str, due: float) -> None:
        remote(text, timeout=60)
        with lock:
            latencies.append(time.perf_counter() - due)

    with ThreadPoolExecutor(256) as pool:
        start = time.perf_counter()
        for i, at in enumerate(arrivals):
            due = start + at
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, texts[i % len(texts)], due)
    return latencies, time.perf_counter() - start
