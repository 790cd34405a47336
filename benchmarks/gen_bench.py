"""Generation workload (suite ``gen``): static micro-batching against continuous batching.

A tiny-but-not-trivial causal LM (GPT-2 shape, 4 layers, 256 wide, random weights: each
decoding step costs something on a CPU) generates greedily for prompts of 2-40 words, each
with its own ``max_new_tokens`` drawn from 8-128 (seeded). Rows, in one run:

- in-process, one request at a time (the local ``pipeline()``);
- pipeq static micro-batching (``--batching static``) and pipeq continuous batching
  (``--batching continuous``), each served to a closed loop of N producers (each sends its
  next request when its answer came).

Each row: generated tokens/s (token counts from the in-process run: greedy decoding gives
the same tokens everywhere, which the rows check) and p50/p99 time to first token. TTFT
comes from ``remote.stream()`` where the client has it; without it, it is the time to the
whole result, and the row says so (``ttft_is``).
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Setup, percentile, pipeq_worker
from benchmarks.workload import sentences

LABEL = "generation (GPT-2 4x256, greedy)"
GREEDY = {"do_sample": False}


def generation_model(setup: Setup) -> str:
    """The benchmark's model (tests/tiny_models.py), built into the work folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build_generation_model

    return str(build_generation_model(setup.workdir / "models", "gpt2", layers=4, hidden=256))


def workload(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, max_new_tokens) pairs: prompts of mixed length, 8-128 new tokens each."""
    rng = random.Random(seed)
    return [(prompt, rng.randint(8, 128))
            for prompt in sentences(count, min_words=2, max_words=40, seed=seed)]


def gen_rows(setup: Setup, count: int, producers: int) -> list[dict[str, Any]]:
    """The rows of the generation suite; ratios against pipeq static batching."""
    model = generation_model(setup)
    cases = workload(count)
    rows, expected, tokens = in_process(model, cases, setup.device)
    for mode in ("static", "continuous"):
        with pipeq_worker(setup, "text-generation", model, "--batching", mode) as remote:
            remote(cases[0][0], max_new_tokens=4, timeout=120, **GREEDY)  # warm
            rows.append(closed_loop(remote, cases, expected, tokens, producers,
                                    f"{LABEL}: pipeq {mode} batching, {producers} producers"))
    static, continuous = rows[1], rows[2]
    continuous["x_static_tokens_per_s"] = round(
        continuous["tokens_per_s"] / static["tokens_per_s"], 2)
    continuous["x_static_p99_ttft"] = round(continuous["p99_ttft_ms"] / static["p99_ttft_ms"], 2)
    return rows


def in_process(model: str, cases: list[tuple[str, int]], device: str
               ) -> tuple[list[dict[str, Any]], list[Any], list[int]]:
    """One request at a time through the local pipeline: its row, results and token counts."""
    import torch
    import transformers

    pipe = transformers.pipeline("text-generation", model=model, device=device)
    pipe(cases[0][0], max_new_tokens=4, **GREEDY)
    expected, tokens, latencies = [], [], []
    # On the threads of one of a worker's model instances (cores / 2): the same float
    # reductions, so the same greedy tokens, and no thread-barrier stalls on shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    with torch.inference_mode():
        started = time.perf_counter()
        for prompt, new in cases:
            t0 = time.perf_counter()
            ids = pipe(prompt, max_new_tokens=new, return_tensors=True, **GREEDY)
            latencies.append(time.perf_counter() - t0)
            prompt_len = len(pipe.tokenizer(prompt)["input_ids"])
            new_ids = ids[0]["generated_token_ids"][prompt_len:]
            tokens.append(len(new_ids))
            # What pipe(prompt, ...) returns (its postprocess), without generating twice.
            text = pipe.tokenizer.decode(new_ids, skip_special_tokens=True)
            expected.append([{"generated_text": prompt + text}])
        seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    row = gen_row(f"{LABEL}: in-process, one request at a time", len(cases), sum(tokens),
                  seconds, latencies, "time to result")
    return [row], expected, tokens


def closed_loop(remote: Any, cases: list[tuple[str, int]], expected: list[Any],
                tokens: list[int], producers: int, name: str) -> dict[str, Any]:
    """``producers`` threads, each sending its share of the cases one after another."""
    streams = hasattr(remote, "stream")
    ttfts: list[float] = []
    mismatches = []
    lock = threading.Lock()

    def produce(indexes: list[int]) -> None:
        for i in indexes:
            prompt, new = cases[i]
            t0 = time.perf_counter()
            if streams:
                first, text = None, ""
                for piece in remote.stream(prompt, max_new_tokens=new, timeout=300, **GREEDY):
                    first = first or time.perf_counter()
                    text += piece
                result = [{"generated_text": prompt + text}]  # what the job's result holds
            else:
                result = remote(prompt, max_new_tokens=new, timeout=300, **GREEDY)
                first = time.perf_counter()
            with lock:
                ttfts.append((first or time.perf_counter()) - t0)
                if result is not None and result != expected[i]:
                    mismatches.append(i)
                    if os.environ.get("PIPEQ_BENCH_DEBUG"):
                        print("MISMATCH", i, cases[i][1], repr(result), repr(expected[i]))

    threads = [threading.Thread(target=produce, args=(list(range(p, len(cases), producers)),))
               for p in range(producers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    row = gen_row(name, len(cases), sum(tokens), seconds, ttfts,
                  "first streamed text" if streams else "time to result (no stream())")
    row["equal_local"] = not mismatches
    if mismatches:  # greedy tokens flip on float noise only where two logits (nearly) tie
        row["not_equal_local"] = len(mismatches)
    return row


def gen_row(name: str, requests: int, tokens: int, seconds: float, ttfts: list[float],
            ttft_is: str) -> dict[str, Any]:
    """One row: tokens/s and time-to-first-token percentiles (seconds in, ms out)."""
    return {"row": name, "requests": requests, "tokens": tokens, "seconds": round(seconds, 3),
            "req_per_s": round(requests / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "p50_ttft_ms": round(1000 * percentile(ttfts, 50), 1),
            "p99_ttft_ms": round(1000 * percentile(ttfts, 99), 1), "ttft_is": ttft_is}


def print_gen_rows(rows: list[dict[str, Any]]) -> None:
    """The generation rows on stdout."""
    print(f"\n{'row':72} {'tokens/s':>9} {'p50 TTFT':>9} {'p99 TTFT':>9}  TTFT is")
    for r in rows:
        notes = "".join(f"  {k}={r[k]}" for k in ("x_static_tokens_per_s", "x_static_p99_ttft",
                                                   "equal_local") if k in r)
        print(f"{r['row']:72} {r['tokens_per_s']:>9} {r['p50_ttft_ms']:>9} "
              f"{r['p99_ttft_ms']:>9}  {r['ttft_is']}{notes}")


if __name__ == "__main__":  # the suite alone: python benchmarks/gen_bench.py [count producers]
    import json
    import tempfile

    from pipeq.ops.embedded import start_redis_server

    work = Path(tempfile.mkdtemp(prefix="pipeq-gen-"))
    proc, url = start_redis_server(work / "redis")
    try:
        args = [int(a) for a in sys.argv[1:3]] or [96, 16]
        result = gen_rows(Setup(url, work, batch=16), *args)
    finally:
        proc.terminate()
    print_gen_rows(result)
    print(json.dumps(result, indent=2))
