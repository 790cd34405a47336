"""Helpers of the gateway tests: a real ``pipeq gateway`` process, curl, a webhook receiver.

Requests go through ``curl`` (a subprocess, as a non-Python web app would send them), so
what is asserted is what goes over the wire: status, headers, body.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from conftest import ROOT, Deployment

from pipeq.ops.embedded import free_port

SECRET_A = "a" * 24 + "-secret-of-key-a"
SECRET_B = "b" * 24 + "-secret-of-key-b"
SECRET_SLOW = "s" * 24 + "-secret-of-slow"
SECRET_NARROW = "n" * 24 + "-secret-of-narrow"
SECRET_FUZZ = "f" * 24 + "-secret-of-fuzzer"
SECRET_HOOKED = "h" * 24 + "-secret-of-hooked"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@dataclass
class Reply:
    """One HTTP response as curl saw it."""

    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def curl(url: str, method: str = "GET", body: Any = None, secret: str | None = SECRET_A,
         headers: dict[str, str] | None = None, timeout: float = 60) -> Reply:
    """One request through the curl command."""
    argv = ["curl", "-sS", "-X", method, "-D", "-", "--max-time", str(timeout), url]
    if secret:
        argv += ["-H", f"Authorization: Bearer {secret}"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json",
                 "--data-binary", body if isinstance(body, str) else json.dumps(body)]
    out = subprocess.run(argv, capture_output=True, timeout=timeout + 10, check=True)
    head, _, text = out.stdout.decode().partition("\r\n\r\n")
    while head.startswith("HTTP/1.1 100"):
        head, _, text = text.partition("\r\n\r\n")
    lines = head.split("\r\n")
    parsed = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), parsed, text)


def keys_file(path: Path, model: str, hooks: str = "http://127.0.0.1:9/none") -> Path:
    """An API keys file: A and B (every route), a slow key (3/min), a narrow key (another
    route), a fuzzer's key (the served route only, no real limit), one with a default webhook."""
    path.write_text(f'''
[[key]]
name = "key-a"
secret = "{SECRET_A}"

[[key]]
name = "key-b"
secret_sha256 = "{__import__('hashlib').sha256(SECRET_B.encode()).hexdigest()}"

[[key]]
name = "slow"
secret = "{SECRET_SLOW}"
rate_limit_per_minute = 3

[[key]]
name = "narrow"
secret = "{SECRET_NARROW}"
routes = ["text-classification:{model}-elsewhere"]

[[key]]
name = "fuzz"
secret = "{SECRET_FUZZ}"
routes = ["text-classification:{model}"]
rate_limit_per_minute = 1000000

[[key]]
name = "hooked"
secret = "{SECRET_HOOKED}"
webhook_url = "{hooks}/default"
''')
    return path


class GatewayProcess:
    """``pipeq gateway`` as a subprocess of a test deployment."""

    def __init__(self, dep: Deployment, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = dep.workdir / f"gateway-{self.port}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "pipeq", "gateway", "--port", str(self.port), *args],
            env=dep.env(**(env or {})), stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> GatewayProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            try:
                if curl(self.url + "/healthz", secret=None, timeout=2).status == 200:
                    return self
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"gateway not up after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@dataclass
class Delivery:
    """One POST the receiver got."""

    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A webhook receiver on loopback: fails the first ``fail_first[path]`` POSTs of a path."""

    fail_first: dict[str, int] = field(default_factory=dict)
    deliveries: dict[str, list[Delivery]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    seen = receiver.deliveries.setdefault(self.path, [])
                    status = 500 if len(seen) < receiver.fail_first.get(self.path, 0) else 204
                    seen.append(Delivery({k.lower(): v for k, v in self.headers.items()}, body,
                                         status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, path: str, count: int, timeout: float = 60) -> list[Delivery]:
        """The deliveries of ``path`` once there are ``count`` that were answered 2xx."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = list(self.deliveries.get(path, []))
            if sum(d.answered < 300 for d in got) >= count:
                return got
            time.sleep(0.1)
        raise AssertionError(f"{path}: {len(got)} deliveries after {timeout}s, wanted {count} ok")


def node_available() -> bool:
    """True when a ``node`` with fetch (18+) is on the PATH."""
    try:
        out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and int(out.stdout.strip().lstrip("v").split(".")[0]) >= 18

