"""Fetching a media input's http(s) URL for a route that allows it (``--allow-urls``).

A URL comes from whoever can submit a job, so the fetch is bounded and fenced:

- one total deadline for the whole fetch (connect, headers, body, redirects): a timer shuts
  the socket down when it passes, so a server dripping a byte every few seconds cannot hold
  the job (or a stopping worker) past it;
- the body stops at the route's payload limit (``Content-Length`` checked first);
- at most ``MAX_REDIRECTS`` redirects, never to another scheme (no ``ftp:``, no https->http);
- every address a host name resolves to must be public: loopback, private, link-local (cloud
  metadata at 169.254.169.254), shared, reserved, multicast and unspecified addresses are
  refused unless the ``url_allow_networks`` setting names them. The connection goes to the
  address that was checked (no second lookup an attacker's DNS could answer differently);
- whatever goes wrong, the job's error is one generic sentence (it must not tell an open port
  from a closed one); the worker's log has the detail.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from pipeq.core.secrets import mask_url
from pipeq.errors import ValidationError

log = logging.getLogger("pipeq.worker.fetch")

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """How a route fetches URLs: the total deadline, the size cap, the allowed networks."""

    deadline_s: float = 15.0
    max_bytes: int = 32 * 1024 * 1024
    allow_networks: tuple[IpNetwork, ...] = field(default_factory=tuple)


def parse_networks(values: Sequence[str]) -> tuple[IpNetwork, ...]:
    """CIDR texts (``10.0.0.0/8``, ``127.0.0.1``) as networks; ValueError names a bad one."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


class FetchRefused(Exception):
    """Why a fetch was refused or failed (logged by the worker, never shown to the caller)."""


def fetch_url(url: str, where: str, policy: FetchPolicy) -> bytes:
    """The body of ``url`` (at most ``policy.max_bytes``), or ValidationError.

    The error says only that the URL could not be fetched (or that its body is over the
    limit); the reason goes to the worker's log.
    """
    try:
        return _fetch(url, policy)
    except _TooLarge:
        raise ValidationError(f"{where}: the URL's content is larger than this route's payload "
                              f"limit of {policy.max_bytes:,} bytes") from None
    except Exception as exc:  # any failure, same words: nothing to learn about the network
        log.info("%s: fetch of %.200s refused or failed: %s: %s", where, mask_url(url),
                 type(exc).__name__, exc)
        raise ValidationError(
            f"{where}: cannot fetch the URL: it must be a public http(s) address that answers "
            f"200 with the file within {policy.deadline_s:g}s (redirects: at most "
            f"{MAX_REDIRECTS}, same scheme)") from None


class _TooLarge(Exception):
    pass


def _fetch(url: str, policy: FetchPolicy) -> bytes:
    deadline = time.monotonic() + policy.deadline_s
    scheme = urlsplit(url).scheme.lower()
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme.lower() != scheme or scheme not in ("http", "https"):
            raise FetchRefused(f"scheme {parts.scheme!r} (started as {scheme!r})")
        host = parts.hostname
        if not host:
            raise FetchRefused("no host")
        port = parts.port or (443 if scheme == "https" else 80)  # ValueError: a bad port
        address = checked_address(host, port, policy.allow_networks, _remaining(deadline))
        conn = _connection(scheme, host, port, address, _remaining(deadline))
        timer = threading.Timer(_remaining(deadline), _cut, (conn,))
        timer.daemon = True
        timer.start()
        try:
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            conn.request("GET", target, headers={"User-Agent": "pipeq-worker",
                                                 "Accept-Encoding": "identity"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise FetchRefused(f"redirect {response.status} without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchRefused(f"HTTP status {response.status}")
            return _body(response, policy.max_bytes, deadline)
        finally:
            timer.cancel()
            conn.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


def checked_address(host: str, port: int, allowed: Sequence[IpNetwork],
                    timeout: float = 10.0) -> str:
    """The address to connect to for ``host``: every address it resolves to must be public
    or in ``allowed`` (FetchRefused otherwise)."""
    addresses = [str(info[4][0]) for info in _lookup(host, port, timeout)]
    if not addresses:
        raise FetchRefused(f"{host} has no address")
    for text in addresses:
        if not address_allowed(ipaddress.ip_address(text.split("%")[0]), allowed):
            raise FetchRefused(f"{host} resolves to {text}, not a public address (allow it "
                               "with url_allow_networks)")
    return addresses[0]


def _lookup(host: str, port: int, timeout: float) -> list[Any]:
    """getaddrinfo within ``timeout``: a slow resolver cannot hold the job (the lookup goes on
    in a daemon thread, which never holds up the worker's exit)."""
    found: list[Any] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the fetching thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="pipeq-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise FetchRefused(f"no address for {host} within {timeout:.1f}s")
    if failed:
        raise failed[0]
    return found


def address_allowed(address: IpAddress, allowed: Sequence[IpNetwork]) -> bool:
    """True for a public address, or one inside an allowed network."""
    if any(address.version == net.version and address in net for net in allowed):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (
            address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return address_allowed(embedded, allowed)
    return address.is_global and not (address.is_multicast or address.is_unspecified
                                      or address.is_reserved)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchRefused("deadline passed")
    return left


def _cut(conn: http.client.HTTPConnection) -> None:
    """At the deadline: shut the socket down, which ends a blocked read in the fetching
    thread at once (a close from another thread would not)."""
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _body(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _TooLarge()
    chunks: list[bytes] = []
    size = 0
    while True:
        _remaining(deadline)
        chunk = response.read1(CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
    if time.monotonic() > deadline:
        raise FetchRefused("deadline passed")  # the timer cut the body short
    if length is not None and length.strip().isdigit() and size != int(length):
        raise FetchRefused(f"body of {size} bytes, Content-Length said {length}")
    return b"".join(chunks)


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to an address checked in advance (the Host header keeps the name)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is checked for the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        context: Any = self._context  # type: ignore[attr-defined]
        self.sock = context.wrap_socket(sock, server_hostname=self.host)


def _connection(scheme: str, host: str, port: int, address: str,
                timeout: float) -> http.client.HTTPConnection:
    cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    return cls(host, port, address, min(timeout, 10.0))
