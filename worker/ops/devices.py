"""Device discovery and pinning, without initialising CUDA in a process that forks.

``torch.cuda.is_available()`` in a parent breaks CUDA in forked children, so the parent
(supervisor) never asks torch: it counts GPUs with ``nvidia-smi`` and pins each child with
``CUDA_VISIBLE_DEVICES`` before the child imports torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess

#: How long torch's OpenMP threads spin-wait after a parallel region before they sleep, in
#: libgomp's spins (about 100,000 per ms). See ``short_openmp_spin``.
WORKER_OPENMP_SPIN = 20_000


class DeviceError(Exception):
    """Raised when the requested devices do not exist on this machine."""


def visible_gpu_ids() -> list[int]:
    """GPU ids this machine has, from nvidia-smi (empty without an NVIDIA driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


def parse_gpus(spec: str, available: list[int]) -> list[int]:
    """Parse ``--gpus`` ("0,1", "all") against the GPUs available; DeviceError if absent."""
    if spec.strip().lower() == "all":
        if not available:
            raise DeviceError("--gpus all: this machine has no NVIDIA GPU (nvidia-smi found none)")
        return available
    try:
        wanted = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise DeviceError(f"--gpus takes ids like 0,1 or 'all', not {spec!r}") from None
    if not wanted:
        raise DeviceError("--gpus needs at least one GPU id")
    missing = [g for g in wanted if g not in available]
    if missing:
        have = ", ".join(map(str, available)) or "none"
        raise DeviceError(
            f"--gpus {spec}: GPU {', '.join(map(str, missing))} not found on this machine "
            f"(GPUs present: {have}); use --device cpu to serve on the CPU"
        )
    if len(set(wanted)) != len(wanted):
        raise DeviceError(f"--gpus {spec} names a GPU twice")
    return wanted


def short_openmp_spin() -> None:
    """Make torch's OpenMP threads sleep ~0.2 ms after a parallel region, not ~3 ms.

    libgomp (torch's CPU threads on Linux) spins ``GOMP_SPINCOUNT`` times (300,000: ~3 ms)
    before a thread waits in the kernel. In-process, back-to-back calls keep the team hot;
    in a worker the gap between two calls is the queue's own work (store the result, wake
    the caller, claim the next job), which that spinning slows down: on 2 cores one core
    spun while that work ran on the other, and a lone MiniLM request paid +5.0 ms over the
    in-process call instead of +3.8 ms (text-classification: +4.0 against +3.3). 20,000
    still covers the gaps inside one model call (1,000 made calls slower). Call it before
    torch is imported; a ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set by the operator wins.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", str(WORKER_OPENMP_SPIN))


def resolve_device(requested: str) -> str:
    """The torch device string for ``--device`` ("auto" picks cuda:0 when a GPU exists)."""
    name = requested.strip().lower()
    if name == "auto":
        return "cuda:0" if visible_gpu_ids() else "cpu"
    if name == "cpu" or name.startswith("cuda") or name == "mps":
        return name
    raise DeviceError(f"--device takes cpu, cuda, cuda:N, mps or auto, not {requested!r}")
