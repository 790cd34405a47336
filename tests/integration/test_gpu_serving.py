"""pipeq on a real NVIDIA GPU (``pytest -m gpu``; ``make gpu-check`` runs these first).

Each test runs a real ``pipeq worker`` on ``cuda:0`` with all-MiniLM-L6-v2 as
feature-extraction and compares what a caller gets with the local ``transformers.pipeline()``
on the same GPU in the same dtype:

- fp32 within ``FP32_TOL``, fp16 (``--dtype float16``) within ``FP16_TOL`` (relative or
  absolute, whichever is larger: batching pads inputs, which moves the last bits);
- a real CUDA out-of-memory batch: the worker's allocator is capped with
  ``torch.cuda.set_per_process_memory_fraction`` below what one batch of long inputs needs,
  the batch is split in halves, and every input still gets its own right answer;
- ``--gpus 0``: one pinned process on the real device, and its GPU memory in the heartbeat
  (``pipeq status``) and the Prometheus metrics.

Skipped without a CUDA device. Measured figures go to the JSON-lines file named by
``PIPEQ_GPU_FIGURES`` when set (``benchmarks/gpu_check.py`` puts them in its results).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Deployment, WorkerProcess, wait_until

pytestmark = pytest.mark.gpu

TASK = "feature-extraction"
FP32_TOL = 1e-3
FP16_TOL = 2e-2
TEXTS = ["A man is eating food.", "Someone is riding a horse on a beach at sunset.",
         "GPU", "The quick brown fox jumps over the lazy dog " * 6,
         "pipeq runs transformers pipelines as a batched job service on Celery and Redis."]
#: Single-token words: inputs made of them all have the same length (one planned call).
WORDS = ["apple", "river", "stone", "green", "house", "music", "water", "light", "paper",
         "table", "north", "cloud"]


def record(**figures: Any) -> None:
    """Append measured figures to ``PIPEQ_GPU_FIGURES`` (JSON lines), when set."""
    path = os.environ.get("PIPEQ_GPU_FIGURES")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(figures) + "\n")


@pytest.fixture(scope="module")
def torch() -> Any:
    """torch, with a CUDA device (else the module is skipped)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


def local_pipeline(torch: Any, model: str, dtype: str) -> Any:
    import transformers

    return transformers.pipeline(TASK, model=model, device="cuda:0",
                                 dtype=getattr(torch, dtype))


def max_difference(remote: list[Any], local: list[Any], tol: float) -> float:
    """Largest |remote - local| over every value; fails past ``tol`` (relative or absolute)."""
    assert len(remote) == len(local)
    worst = 0.0
    for i, (r, loc) in enumerate(zip(remote, local, strict=True)):
        got, want = np.asarray(r, dtype=np.float64), np.asarray(loc, dtype=np.float64)
        assert got.shape == want.shape, f"input #{i}: shape {got.shape} != {want.shape}"
        diff = np.abs(got - want)
        allowed = np.maximum(tol, tol * np.maximum(np.abs(got), np.abs(want)))
        assert (diff <= allowed).all(), f"input #{i}: off by up to {diff.max():.3g}"
        worst = max(worst, float(diff.max()))
    return worst


@pytest.mark.parametrize("dtype,tol", [("float32", FP32_TOL), ("float16", FP16_TOL)])
def test_cuda_worker_equals_local_pipeline(deployment: Deployment, minilm_path: str,
                                           torch: Any, dtype: str, tol: float) -> None:
    deployment.start_worker(TASK, minilm_path, "--device", "cuda:0", "--dtype", dtype)
    remote = deployment.remote(TASK, minilm_path)
    local = local_pipeline(torch, minilm_path, dtype)
    worst = max_difference(remote(TEXTS), local(TEXTS), tol)
    single = max_difference([remote(TEXTS[1])], [local(TEXTS[1])], tol)
    record(check=f"{dtype} equals local", max_abs_difference=max(worst, single), tol=tol)


CAPPED_WORKER = """\
import sys
import torch
cap = int(sys.argv.pop(1))
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(cap / total, 0)
from pipeq.ops.cli import main
sys.exit(main())
"""


def memory_needs(torch: Any, local: Any, texts: list[str]) -> dict[str, int]:
    """Bytes the local fp32 pipeline holds loaded, and its peaks for one input and for all
    of ``texts`` in one batch (over the loaded amount)."""
    local(texts[:1])
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated()
    peaks = {}
    for name, batch in (("one", texts[:1]), ("all", texts)):
        torch.cuda.reset_peak_memory_stats()
        local(batch, batch_size=len(batch))
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - loaded
    return {"loaded": loaded, "peak_one": peaks["one"], "peak_all": peaks["all"]}


def test_real_out_of_memory_batch_is_split_and_every_input_answered(
        deployment: Deployment, minilm_path: str, torch: Any) -> None:
    batch = 64
    texts = [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(400)) for i in range(batch)]
    local = local_pipeline(torch, minilm_path, "float32")
    needs = memory_needs(torch, local, texts)
    # Room for the weights and a quarter of the full batch: 64 inputs (and 32) cannot fit,
    # 16 can; 32 MiB more for the allocator's rounding and cuBLAS's workspace.
    cap = needs["loaded"] + needs["peak_all"] // 4 + 32 * 2**20
    assert needs["peak_all"] // 2 > needs["peak_all"] // 4 + 32 * 2**20, needs  # sure to OOM
    argv = [sys.executable, "-P", "-c", CAPPED_WORKER, str(cap), "worker", "--task", TASK,
            "--model", minilm_path, "--device", "cuda:0", "--max-batch-size", str(batch),
            "--max-wait-ms", "200"]
    worker = WorkerProcess(argv, deployment.env(), deployment.workdir / "capped.log")
    deployment.workers.append(worker)
    worker.wait_ready()
    remote = deployment.remote(TASK, minilm_path)
    outputs = remote(texts, timeout=300)  # one job: one planned call of all 64
    worst = max_difference(outputs, local(texts), FP32_TOL)
    log = worker.log()
    splits = re.findall(r"batch of (\d+) failed \((\w*OutOfMemoryError)", log)
    record(check="CUDA out-of-memory split", cap_bytes=cap, **needs,
           failed_batches=[int(n) for n, _ in splits], max_abs_difference=worst)
    assert splits and int(splits[0][0]) == batch, log[-3000:]
    assert "does not fit in device memory" not in log
    # Separate jobs at once: each still gets its own answer, and the worker serves on.
    jobs = [remote.submit(text) for text in texts[:8]]
    max_difference([job.result(timeout=300) for job in jobs], local(texts[:8]), FP32_TOL)
    assert worker.proc.poll() is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gpu_memory_metrics(port: int) -> dict[str, float]:
    """``pipeq_worker_device_memory_bytes`` by kind, from a worker's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("pipeq_worker_device_memory_bytes{") and 'device="cuda:0"' in line:
            kind = re.search(r'kind="(\w+)"', line)
            if kind:
                found[kind.group(1)] = float(line.rsplit(" ", 1)[1])
    return found


def test_gpus_0_pins_one_worker_to_the_real_gpu_and_reports_its_memory(
        deployment: Deployment, minilm_path: str, torch: Any) -> None:
    port = free_port()
    supervisor = deployment.start_worker(TASK, minilm_path, "--gpus", "0", "--metrics-port",
                                         str(port), ready=False)
    remote = deployment.remote(TASK, minilm_path)

    def ready() -> list[dict[str, Any]]:
        return [w for w in remote.client.registry.workers(remote.route) if w["ready"]]

    (child,) = wait_until(ready, 180, "the pinned GPU child to be ready")
    assert child["cuda_visible_devices"] == "0" and child["device"] == "cuda:0"
    assert child["pid"] != supervisor.pid
    local = local_pipeline(torch, minilm_path, "float32")
    worst = max_difference(remote(TEXTS), local(TEXTS), FP32_TOL)
    weights = sum(f.stat().st_size for f in Path(minilm_path).glob("*.safetensors"))
    # The weights' bytes on the GPU (stored fp16 in the GPU bundle, loaded as fp32).
    at_least = weights // 2

    def beat_memory() -> int:
        workers = ready()
        memory = workers[0].get("device_memory_bytes") if workers else None
        return int(memory) if memory and memory >= at_least else 0

    beat = wait_until(beat_memory, 30, "GPU memory in the heartbeat")
    status = deployment.cli("status")
    assert "device=cuda:0" in status.stdout and "memory=" in status.stdout, status.stdout
    metrics = wait_until(lambda: gpu_memory_metrics(port).get("allocated") and
                         gpu_memory_metrics(port), 30, "GPU memory in the metrics")
    assert metrics["allocated"] >= at_least and metrics["reserved"] >= metrics["allocated"]
    record(check="--gpus 0 pinning and GPU memory", heartbeat_memory_bytes=beat,
           metrics_allocated_bytes=metrics["allocated"],
           metrics_reserved_bytes=metrics["reserved"], max_abs_difference=worst)
    assert supervisor.stop(timeout=60) == 0
