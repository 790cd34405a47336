"""`pipeq worker --gpus`: one pinned process per GPU, restarted when it dies, stopped on SIGTERM.

Pinning is proven on the CPU (`--gpus 0,1 --device cpu` pins without using GPUs): each
child announces the CUDA_VISIBLE_DEVICES it runs with. The GPU-marked test runs a real
CUDA worker where a GPU exists and compares with the local pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Deployment, wait_until
from tiny_models import build_text_model


def live_workers(deployment: Deployment, task: str, model: str) -> list[dict[str, Any]]:
    """The registry's view of the route's live workers."""
    remote = deployment.remote(task, model)
    return remote.client.registry.workers(remote.route)


def test_one_pinned_process_per_gpu(deployment: Deployment, models_dir: Path) -> None:
    model = str(build_text_model("text-classification", models_dir))
    supervisor = deployment.start_worker("text-classification", model, "--gpus", "0,1",
                                         "--device", "cpu", ready=False)

    def two_ready() -> list[dict[str, Any]]:
        workers = [w for w in live_workers(deployment, "text-classification", model)
                   if w["ready"]]
        return workers if len(workers) == 2 else []

    workers = wait_until(two_ready, 120, "two pinned children to be ready")
    assert sorted(w["cuda_visible_devices"] for w in workers) == ["0", "1"]
    assert len({w["hostname"] for w in workers}) == 2
    remote = deployment.remote("text-classification", model)
    assert len(remote(["good", "bad", "fine"])) == 3

    # A child that dies is restarted, pinned to the same GPU.
    victim = next(w for w in workers if w["cuda_visible_devices"] == "1")
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> list[dict[str, Any]]:
        now = [w for w in live_workers(deployment, "text-classification", model)
               if w["ready"] and w["pid"] != victim["pid"]]
        return now if sorted(w["cuda_visible_devices"] for w in now) == ["0", "1"] else []

    wait_until(replaced, 120, "the killed child to be replaced")
    assert "restart #1" in supervisor.log()

    # SIGTERM stops every child, and the supervisor exits 0.
    assert supervisor.stop(signal.SIGTERM, timeout=60) == 0
    wait_until(lambda: not live_workers(deployment, "text-classification", model), 30,
               "the children to withdraw")
    for w in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(w["pid"], 0)


SHADOW = "raise SystemExit('the user\'s {name}.py was imported instead of pipeq')\n"


def test_a_users_own_producer_and_worker_modules_change_nothing(
        deployment: Deployment, models_dir: Path, tmp_path: Path) -> None:
    """A web app's folder with producer.py and worker.py in it: the pinned children and a
    client started there still run pipeq's own code (the children even with a pipeq.py
    beside them: they start with ``python -P``)."""
    app, serving = tmp_path / "webapp", tmp_path / "serving"
    for folder, names in ((app, ("producer", "worker")), (serving, ("producer", "worker",
                                                                     "pipeq"))):
        folder.mkdir()
        for name in names:
            (folder / f"{name}.py").write_text(SHADOW.format(name=name))
    model = str(build_text_model("text-classification", models_dir))
    supervisor = deployment.start_worker("text-classification", model, "--gpus", "0",
                                         "--device", "cpu", ready=False, cwd=serving)
    wait_until(lambda: [w for w in live_workers(deployment, "text-classification", model)
                        if w["ready"]], 120, "the worker started from the user's folder")
    (app / "client.py").write_text(
        "import json\n"
        "from pipeq import pipeline\n"
        f"remote = pipeline('text-classification', model={model!r})\n"
        "print(json.dumps(remote(['good', 'bad'])))\n")
    done = subprocess.run([sys.executable, "client.py"], cwd=app, env=deployment.env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 2
    assert "was imported" not in supervisor.log()
    assert supervisor.stop(signal.SIGTERM, timeout=60) == 0


def test_missing_gpus_fail_clearly(deployment: Deployment, models_dir: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has NVIDIA GPUs")
    model = str(build_text_model("text-classification", models_dir))
    worker = deployment.start_worker("text-classification", model, "--gpus", "0,1", ready=False)
    assert worker.wait_exit(60) == 2
    assert "GPU 0, 1 not found on this machine" in worker.log()


@pytest.mark.gpu
def test_cuda_worker_matches_local(deployment: Deployment, minilm_path: str) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import transformers
    from compare import assert_same

    deployment.start_worker("feature-extraction", minilm_path, "--device", "cuda:0")
    remote = deployment.remote("feature-extraction", minilm_path)
    local = transformers.pipeline("feature-extraction", model=minilm_path, device="cuda:0")
    texts = ["A man is eating food.", "Someone is riding a horse on a beach at sunset."]
    assert_same(remote(texts), json.loads(json.dumps(local(texts))), tol=1e-3)
