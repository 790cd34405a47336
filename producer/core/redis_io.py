"""Talking to Redis the same way everywhere: clients, text replies, bounded retries.

Redis restarting is not an error anyone should see; Redis staying away is, after a bounded
wait, as :class:`~pipeq.errors.BrokerUnavailable`, never a hang. Every retry in pipeq goes
through :func:`call_with_retry` (a call that must succeed) or :class:`Backoff` (a loop that
keeps going).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

import redis

from pipeq.core.secrets import mask_url
from pipeq.errors import BrokerUnavailable

T = TypeVar("T")

#: What a lost or refused connection looks like (redis-py wraps most, not all, OSErrors).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, OSError)


def is_redis_full(exc: BaseException) -> bool:
    """True for Redis refusing a write at ``maxmemory`` (noeviction), also when the refusal
    comes from inside a Lua script (Redis 6 wraps it in a script error)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc))


def as_text(value: Any) -> str:
    """A Redis reply (bytes or str) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def load_lua(name: str, package: str = "pipeq.core") -> str:
    """The text of the Lua script ``lua/<name>`` shipped in ``package``."""
    return (resources.files(package) / "lua" / name).read_text()


def redis_client(url: str, *, ssl_cert_reqs: str = "required", connect_timeout_s: float = 10.0,
                 socket_timeout_s: float | None = None, **kwargs: Any) -> redis.Redis:
    """A client for ``url``; ``rediss://`` URLs verify certificates unless told otherwise."""
    if url.startswith("rediss://"):
        kwargs.setdefault("ssl_cert_reqs", ssl_cert_reqs)
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                socket_timeout=socket_timeout_s, **kwargs)


def async_redis_client(url: str, *, ssl_cert_reqs: str = "required",
                       connect_timeout_s: float = 10.0, socket_timeout_s: float | None = None,
                       **kwargs: Any) -> Any:
    """An asyncio client (``redis.asyncio``) for ``url``, configured as :func:`redis_client`."""
    import redis.asyncio

    if url.startswith("rediss://"):
        kwargs.setdefault("ssl_cert_reqs", ssl_cert_reqs)
    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                        socket_timeout=socket_timeout_s, **kwargs)


class Backoff:
    """Exponential delays with jitter for a loop that retries Redis: 50 ms, 100 ms ... max_s."""

    def __init__(self, first_s: float = 0.05, max_s: float = 2.0):
        self.first_s = first_s
        self.max_s = max_s
        self._next = first_s

    def next_delay(self) -> float:
        """The next delay (the one after it doubles), without sleeping."""
        delay = self._next * random.uniform(0.75, 1.25)
        self._next = min(self._next * 2, self.max_s)
        return delay

    def sleep(self) -> float:
        """Sleep for the next delay; returns it."""
        delay = self.next_delay()
        time.sleep(delay)
        return delay

    def reset(self) -> None:
        """Back to the first delay (after a success)."""
        self._next = self.first_s


def call_with_retry(action: Callable[[], T], *, timeout_s: float, url: str | None = None,
                    what: str = "reach Redis") -> T:
    """``action()``, retried on connection errors for up to ``timeout_s`` seconds.

    Raises BrokerUnavailable (naming ``url`` with its password masked) when Redis stays away.
    """
    deadline = time.monotonic() + timeout_s
    backoff = Backoff(max_s=1.0)
    while True:
        began = time.monotonic()
        try:
            return action()
        except CONNECTION_ERRORS as exc:
            # No attempt that, lasting as long as this one, would end after the deadline:
            # on a host cut off from Redis (packets vanish) an attempt lasts up to a whole
            # connect timeout, and one begun just before the deadline made the caller wait
            # half as long again (measured: 3.1 s for a 2 s timeout). Refused connections
            # (a restarting Redis) fail at once and are retried until the deadline.
            now = time.monotonic()
            took = now - began
            if now + backoff.first_s + took > deadline:
                where = f" at {mask_url(url)}" if url else ""
                raise BrokerUnavailable(
                    f"cannot {what}{where} (retried {timeout_s:g}s): {exc}") from exc
            time.sleep(min(backoff.next_delay(), deadline - now - took))
