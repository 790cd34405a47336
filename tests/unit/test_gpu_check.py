"""`make gpu-check` where there is no GPU (CUDA_VISIBLE_DEVICES='' hides one that is there):
the script says clearly that it found none and exits 77, writing nothing; the make target
says it skipped and exits 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_gpu_check_without_a_gpu_says_so_and_exits_77(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out)],
                          cwd=ROOT, env=NO_GPU, capture_output=True, text=True, timeout=120)
    assert done.returncode == 77, done.stderr
    assert done.stderr.startswith("gpu-check: no GPU found: ")
    assert "sees no CUDA device" in done.stderr and "CUDA_VISIBLE_DEVICES=''" in done.stderr
    assert "Nothing was measured" in done.stderr
    assert not out.exists()


def test_make_gpu_check_without_a_gpu_skips_with_exit_0() -> None:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    # BIN: this interpreter's folder; -o: its set-up stamp counts as done (no reinstall).
    done = subprocess.run(["make", "-s", "-o", ".venv/.pipeq-installed", "gpu-check",
                           f"BIN={Path(sys.executable).parent}"],
                          cwd=ROOT, env=NO_GPU, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu-check: no GPU found" in done.stderr
    assert "gpu-check: SKIPPED - no GPU found on this machine" in done.stdout


def test_results_are_named_after_the_card() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import card_slug
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert card_slug("NVIDIA H200") == "nvidia-h200"
    assert card_slug("NVIDIA GeForce RTX 4090 (24GB)") == "nvidia-geforce-rtx-4090-24gb"
