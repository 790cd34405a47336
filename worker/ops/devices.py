"""Device discovery and pinning, without initialising CUDA in a process that forks.

``torch.cuda.is_available()`` in a parent breaks CUDA in forked children, so the parent
(supervisor) never asks torch: it counts GPUs with ``nvidia-smi`` and pins each child with
``CUDA_VISIBLE_DEVICES`` before the child imports torch.
"""

from __future__ import annotations

import shutil
import subprocess


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


def resolve_device(requested: str) -> str:
    """The torch device string for ``--device`` ("auto" picks cuda:0 when a GPU exists)."""
    name = requested.strip().lower()
    if name == "auto":
        return "cuda:0" if visible_gpu_ids() else "cpu"
    if name == "cpu" or name.startswith("cuda") or name == "mps":
        return name
    raise DeviceError(f"--device takes cpu, cuda, cuda:N, mps or auto, not {requested!r}")
