"""What streaming costs and what it buys, on the tiny Llama-style model (CPU by default).

1. Worker side, in process: one batched ``generate`` call (``--batch`` prompts,
   ``--new-tokens`` greedy tokens) without a streamer, and with every row streaming into
   Redis Streams through the worker's own writer; the ratio is the streaming overhead, and
   the Redis round trips per call show one pipelined write per decoding step.
2. Through a real pipeq worker: one job at a time, ``remote(prompt)`` (the whole text at
   the end) against ``remote.stream(prompt)``: time to the first piece and to the last.

    .venv/bin/python benchmarks/stream_bench.py [--batch 8] [--new-tokens 64] [--device cpu]

Prints one JSON object. Timings on a shared machine are noisy: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import redis
import transformers
from common import Setup, pipeq_worker
from tiny_models import CORPUS, build_llama_model

from pipeq.core.keys import Keys
from pipeq.ops.embedded import start_redis_server
from pipeq.worker.batching.textsinks import TextStreams
from pipeq.worker.model.streamer import BatchTextStreamer, TextTarget

PROMPT = "Once upon a time there was"


class CountingRedis(redis.Redis):
    """A client that counts pipelined round trips."""

    trips = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = super().pipeline(*args, **kwargs)
        execute = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            CountingRedis.trips += 1
            return execute(*a, **k)

        pipe.execute = counted
        return pipe


def worker_side(model: str, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    pipe = transformers.pipeline("text-generation", model=model, device=args.device)
    pipe.tokenizer.pad_token = pipe.tokenizer.eos_token
    pipe.model.generation_config.pad_token_id = pipe.tokenizer.pad_token_id
    prompts = [CORPUS[i % len(CORPUS)] for i in range(args.batch)]
    params = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
              "do_sample": False}
    client = CountingRedis.from_url(redis_url)
    streams = TextStreams(client, Keys("streambench"), ttl_s=60, maxlen=10_000)

    def call(stream: bool) -> float:
        extra = {}
        if stream:
            sinks = [streams.sink(f"job{i}", 1) for i in range(args.batch)]
            targets = [TextTarget(s, 0) for s in sinks]
            extra["streamer"] = BatchTextStreamer(pipe.tokenizer, targets,
                                                  {"skip_special_tokens": True})
        started = time.perf_counter()
        pipe(prompts, batch_size=len(prompts), **params, **extra)
        return time.perf_counter() - started

    call(False), call(True)  # warm-up
    plain, streamed, trips = [], [], []
    for _ in range(args.repeat):  # interleaved: load changes hit both alike
        plain.append(call(False))
        before = CountingRedis.trips
        streamed.append(call(True))
        trips.append(CountingRedis.trips - before)
    for i in range(args.batch):
        client.delete(f"streambench:stream:job{i}")
    return {"batch": args.batch, "new_tokens": args.new_tokens,
            "call_s_plain_p50": round(statistics.median(plain), 4),
            "call_s_streaming_p50": round(statistics.median(streamed), 4),
            "streaming_over_plain": round(statistics.median(streamed)
                                          / statistics.median(plain), 3),
            "redis_round_trips_per_call": statistics.median(trips)}


def end_to_end(model: str, setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    params = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
              "do_sample": False}
    with pipeq_worker(setup, "text-generation", model) as remote:
        remote(PROMPT, **params)  # warm-up
        whole, first, last = [], [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            remote(PROMPT, **params)
            whole.append(time.perf_counter() - started)
            started = time.perf_counter()
            for count, _piece in enumerate(remote.stream(PROMPT, **params)):
                if count == 0:
                    first.append(time.perf_counter() - started)
            last.append(time.perf_counter() - started)
    return {"new_tokens": args.new_tokens,
            "result_s_p50": round(statistics.median(whole), 4),
            "stream_first_piece_s_p50": round(statistics.median(first), 4),
            "stream_last_piece_s_p50": round(statistics.median(last), 4),
            "first_piece_over_result": round(statistics.median(first)
                                             / statistics.median(whole), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="prompts per call (default 8)")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens generated per prompt (default 64)")
    parser.add_argument("--repeat", type=int, default=7, help="runs per row (default 7)")
    parser.add_argument("--device", default="cpu", help="device (default cpu)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pipeq-stream-bench-"))
    redis_proc, redis_url = start_redis_server(workdir / "redis")
    try:
        model = str(build_llama_model(workdir / "models"))
        out = {"worker_side": worker_side(model, redis_url, args),
               "end_to_end": end_to_end(model, Setup(redis_url, workdir, args.device,
                                                     cpu_instances=1), args)}
    finally:
        redis_proc.terminate()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
