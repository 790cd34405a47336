"""Starting ``pipeq worker``: one process on one device, or one pinned process per GPU.

``WorkerRun`` resolves the device (without initialising CUDA in a process that will fork:
see ``pipeq.worker.ops.devices``), then either serves the route in this process
(``pipeq.worker.serve``) or supervises one child per GPU, each started as
``python -P -m pipeq worker ... --gpu-slot N`` with ``CUDA_VISIBLE_DEVICES=N`` (``-P``: a
``worker.py`` or ``pipeq.py`` in the current folder can never shadow pipeq's own modules).
"""

from __future__ import annotations

import logging
from typing import Any

import click

from pipeq.core.config import RouteSpec, Settings
from pipeq.core.logs import setup_logging
from pipeq.ops.exits import Exit
from pipeq.worker.ops.devices import (
    DeviceError,
    parse_gpus,
    resolve_device,
    short_openmp_spin,
    visible_gpu_ids,
)

log = logging.getLogger("pipeq.worker")


class WorkerRun:
    """One ``pipeq worker`` command: its route spec, settings and options."""

    def __init__(self, spec: RouteSpec, settings: Settings, options: dict[str, Any],
                 argv: list[str]):
        self.spec = spec
        self.settings = settings
        self.options = options
        self.argv = argv

    def run(self) -> int:
        """Serve (or supervise) until stopped; returns the process exit code."""
        setup_logging(self.settings.log_level, self.settings.log_json)
        short_openmp_spin()  # before torch loads libgomp, which reads it once
        try:
            gpus = self.gpu_ids()
            if gpus is not None:
                return self.supervise(gpus)
            device = resolve_device(self.spec.device)
        except DeviceError as exc:
            click.echo(f"pipeq worker: {exc}", err=True)
            return Exit.USAGE
        from pipeq.worker.serve import default_hostname, serve

        slot = self.options.get("gpu_slot")
        hostname = self.options.get("hostname")
        if slot is not None and not hostname:
            hostname = default_hostname(self.spec, f"gpu{slot}")
        metrics_port = self.options.get("metrics_port")
        if metrics_port and slot is not None:
            metrics_port += slot  # one port per pinned process
        return serve(self.spec, self.settings, device, hostname=hostname,
                     prefetch=self.options.get("prefetch"), metrics_port=metrics_port,
                     metrics_address=self.options.get("metrics_address") or "0.0.0.0")

    def gpu_ids(self) -> list[int] | None:
        """The GPUs to run one pinned process each on (None: serve in this process)."""
        requested = self.options.get("gpus") or self.spec.gpus
        if not requested:
            return None
        text = requested if isinstance(requested, str) else ",".join(map(str, requested))
        if self.pin_only:
            try:
                return [int(g) for g in text.split(",")]
            except ValueError:
                raise DeviceError(f"--gpus takes ids like 0,1, not {text!r}") from None
        return parse_gpus(text, visible_gpu_ids())

    @property
    def pin_only(self) -> bool:
        """``--device cpu`` with ``--gpus``: pin processes without using the GPUs (tests)."""
        return (self.options.get("device") or "").lower() == "cpu"

    def supervise(self, gpus: list[int]) -> int:
        """Run one pinned child per GPU until stopped."""
        from pipeq.worker.ops.supervisor import Supervisor

        child_argv = strip_options(self.argv, {"--gpus", "--device"})
        return Supervisor(child_argv, gpus, "cpu" if self.pin_only else "cuda:0").run()


def strip_options(argv: list[str], options: set[str]) -> list[str]:
    """``argv`` without the named options and their values."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out
