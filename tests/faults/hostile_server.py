"""A misbehaving HTTP server for the URL probes of tests/faults/test_hostile_media.py.

It answers from raw sockets, so it can send what no well-behaved server library would: a
garbage status line, a 70 KiB header line, a body dripped one byte a second, a body larger
than it said, redirects to other schemes and to addresses the worker must not reach.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def ok(body: bytes, content_type: str = "image/png") -> bytes:
    """A well-formed 200 answer with ``body``."""
    return (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def redirect(location: str, status: int = 302) -> bytes:
    """A redirect to ``location``."""
    return (f"HTTP/1.1 {status} Found\r\nLocation: {location}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n").encode()


Answer = bytes | Callable[[socket.socket], None]


@dataclass
class HostileServer:
    """Serves ``routes`` (path -> raw answer, or a function writing to the socket) on
    ``host``; ``hits`` counts the requests each path received."""

    host: str
    routes: dict[str, Answer]
    hits: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(10)
                try:
                    head = sock.recv(65536).split(b"\r\n", 1)[0].decode(errors="replace")
                    path = head.split(" ")[1] if head.count(" ") >= 2 else "/"
                    outer.hits[path] = outer.hits.get(path, 0) + 1
                    answer = outer.routes.get(path, b"HTTP/1.1 404 Not Found\r\n"
                                                     b"Content-Length: 0\r\n\r\n")
                    if callable(answer):
                        answer(sock)
                    else:
                        sock.sendall(answer)
                except OSError:
                    pass  # the worker hung up: what it should do with most of these

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((self.host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server."""
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        """Stop serving (drips end at their next byte)."""
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def drip(stop: threading.Event, prefix: bytes, every_s: float = 1.0) -> Callable[[socket.socket],
                                                                                   None]:
    """An answer that sends ``prefix`` and then one byte every ``every_s`` seconds, for up to
    two minutes (the worker must give up long before)."""
    def send(sock: socket.socket) -> None:
        sock.sendall(prefix)
        ends = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < ends:
            sock.sendall(b"x")
            time.sleep(every_s)
    return send


def endless(stop: threading.Event) -> Callable[[socket.socket], None]:
    """A 200 answer without a length whose body never ends (64 KiB at a time)."""
    def send(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
        chunk = b"\x00" * 65536
        while not stop.is_set():
            sock.sendall(chunk)
    return send


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
