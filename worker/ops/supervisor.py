"""One pinned worker process per GPU: start, restart on death, stop all on SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from pipeq.ops.exits import Exit

log = logging.getLogger("pipeq.supervisor")

#: A child exiting with one of these will not do better if restarted (bad usage or
#: settings, a model that cannot be loaded or a device that is missing).
FATAL_EXIT_CODES = {Exit.USAGE, Exit.MODEL_LOAD_FAILED}
MAX_RESTART_DELAY_S = 30.0


class Supervisor:
    """Runs ``argv`` once per GPU id with CUDA_VISIBLE_DEVICES pinned to that id."""

    def __init__(self, argv: list[str], gpu_ids: list[int], child_device: str):
        self.argv = argv
        self.gpu_ids = gpu_ids
        self.child_device = child_device
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts: dict[int, int] = dict.fromkeys(gpu_ids, 0)
        self._stopping = False

    def _spawn(self, gpu: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
        # -P: the current folder is not on sys.path, so no worker.py or pipeq.py there can
        # shadow pipeq's own modules.
        cmd = [sys.executable, "-P", "-m", "pipeq", "worker", *self.argv,
               "--device", self.child_device, "--gpu-slot", str(gpu)]
        proc = subprocess.Popen(cmd, env=env)
        log.info("started worker for GPU %d (pid %d, CUDA_VISIBLE_DEVICES=%d)", gpu, proc.pid, gpu)
        return proc

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (exit 0) or a child fails fatally (its code)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for gpu in self.gpu_ids:
            self.children[gpu] = self._spawn(gpu)
        fatal = 0
        while self.children:
            time.sleep(0.2)
            for gpu, proc in list(self.children.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self.children[gpu]
                if self._stopping:
                    continue
                if code in FATAL_EXIT_CODES:
                    log.error("worker for GPU %d exited with %d (fatal); stopping all", gpu, code)
                    fatal = code
                    self._on_signal(signal.SIGTERM, None)
                    continue
                self.restarts[gpu] += 1
                delay = min(2 ** self.restarts[gpu] / 4, MAX_RESTART_DELAY_S)
                log.warning("worker for GPU %d died (exit %s); restart #%d in %.1fs", gpu, code,
                            self.restarts[gpu], delay)
                time.sleep(delay)
                if not self._stopping:
                    self.children[gpu] = self._spawn(gpu)
        return fatal
